package test

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// seedPath is GOST's netns documentation page, whose chain example ebpfwd
// must run unchanged.
const seedPath = "/work/shared/seeds/000_bf2b42013c9efffc.txt"

// seedYAML is the seed's "使用转发链" (forwarding chain) example as written,
// indented as GOST's page shows it (the seed's text copy lost the
// indentation; TestSeedYAMLIsTheSeeds proves nothing else differs).
const seedYAML = `services:
- name: service-0
  addr: "10.0.0.1:8000"
  handler:
    type: tcp
    chain: chain-0
  listener:
    type: tcp
  forwarder:
    nodes:
    - name: target-0
      addr: 10.0.1.11:8000
  metadata:
    netns: ns1
chains:
- name: chain-0
  hops:
  - name: hop-0
    metadata:
      netns: ns2
    nodes:
    - name: node-0
      addr: 10.0.1.1:8080
      connector:
        type: http
      dialer:
        type: tcp
`

// seedHopProxy is the HTTP proxy the seed's chain points at
// (10.0.1.1:8080 in ns2), played by a second ebpfwd. It dials the target
// from ns2 too, where 10.0.1.11 is the other end of veth3.
const seedHopProxy = `services:
- name: hop-proxy
  addr: "10.0.1.1:8080"
  handler:
    type: http
    # A hop inside ns2, reached only over veth3: no auth on purpose.
    metadata: {allowOpenProxy: true}
  listener:
    type: tcp
  metadata:
    netns: $NS2
    netns.out: $NS2
`

// TestSeedYAMLIsTheSeeds compares seedYAML with the seed file line by line,
// ignoring only indentation.
func TestSeedYAMLIsTheSeeds(t *testing.T) {
	data, err := os.ReadFile(seedPath)
	if err != nil {
		t.Skipf("seed file not available: %v", err)
	}
	lines := strings.Split(string(data), "\n")
	start := slices.Index(lines, "services:")
	if start < 0 {
		t.Fatalf("%s has no line \"services:\"", seedPath)
	}
	var seed []string
	for _, l := range lines[start:] {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "监听在") { // the prose after the example
			break
		}
		if l != "" {
			seed = append(seed, l)
		}
	}
	var ours []string
	for _, l := range strings.Split(seedYAML, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			ours = append(ours, l)
		}
	}
	if !slices.Equal(seed, ours) {
		t.Fatalf("seedYAML differs from the seed's example:\nseed: %q\nours: %q", seed, ours)
	}
}

// TestSeed000 builds the seed's topology and runs its YAML: a namespace
// plays the seed's default namespace (the target lives there and ebpfwd
// runs there), ns1 and ns2 hang off it by veth pairs as the seed's ip
// commands describe, and a second ebpfwd is the HTTP proxy hop in ns2.
func TestSeed000(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	host := testutil.NewNS(t, "e2e-seed-host")
	ns1 := testutil.NewNS(t, "e2e-seed-ns1")
	ns2 := testutil.NewNS(t, "e2e-seed-ns2")
	testutil.Veth(t, host, "veth0", "10.0.0.11/24", ns1, "veth1", "10.0.0.1/24")
	testutil.Veth(t, host, "veth2", "10.0.1.11/24", ns2, "veth3", "10.0.1.1/24")
	target := e2e.EchoIn(t, host, "10.0.1.11:8000")

	proxy := e2e.Start(t, "hop-proxy", e2e.Config(seedHopProxy, map[string]string{"NS2": ns2.Name}), e2e.Options{})
	seed := strings.NewReplacer("netns: ns1", "netns: "+ns1.Name, "netns: ns2", "netns: "+ns2.Name).Replace(seedYAML)
	fwd := e2e.Start(t, "seed", seed, e2e.Options{In: host})

	if err := e2e.Exchange(t, host, "10.0.0.1:8000", 1<<20, 30*time.Second); err != nil {
		t.Fatalf("1 MiB through the seed's chain: %v", err)
	}
	// The target must have been reached through the hop in ns2, not
	// directly from the default namespace where it is local.
	if got := target.Sources(); !slices.Equal(got, []string{"10.0.1.1"}) {
		t.Errorf("target saw connections from %v, want only the hop 10.0.1.1", got)
	}

	for _, d := range []*e2e.Daemon{fwd, proxy} {
		code, err := d.Stop()
		if err != nil {
			t.Fatalf("stop daemon %s: %v", d.Name, err)
		}
		if code != 0 {
			t.Errorf("daemon %s exited with status %d after SIGTERM, want 0", d.Name, code)
		}
	}
}
