package test

import (
	"context"
	"net"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
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
// (10.0.1.1:8080 in ns2, and [fd10:0:1::1]:8080 for the IPv6 twin),
// played by a second ebpfwd. It dials the target from ns2 too, where
// 10.0.1.11 (fd10:0:1::11) is the other end of veth3.
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
- name: hop-proxy6
  addr: "[fd10:0:1::1]:8080"
  handler:
    type: http
    metadata: {allowOpenProxy: true}
  listener:
    type: tcp
  metadata:
    netns: $NS2
    netns.out: $NS2
`

// seedAddrs are one family's addresses of the seed's topology: ns1's
// veth1 and the default namespace's veth0, ns2's veth3 and the default
// namespace's veth2, each pair in a subnet of prefix bits.
type seedAddrs struct {
	family         string
	ns1, veth0     string
	ns2, veth2     string
	bits           string
	spliceListenIP string // the source a node sees over a splice link
}

// seedFamilies are the seed's IPv4 addresses and their IPv6 twins
// (10.0.0.0/24 is fd10::/64, 10.0.1.0/24 fd10:0:1::/64).
var seedFamilies = []seedAddrs{
	{family: "IPv4", ns1: "10.0.0.1", veth0: "10.0.0.11", ns2: "10.0.1.1", veth2: "10.0.1.11", bits: "24", spliceListenIP: spliceListenAddr},
	{family: "IPv6", ns1: "fd10::1", veth0: "fd10::11", ns2: "fd10:0:1::1", veth2: "fd10:0:1::11", bits: "64", spliceListenIP: spliceListenAddr6},
}

// seedYAMLIn is the seed's example with a's addresses: the IPv4 one is
// the seed's text.
func seedYAMLIn(a seedAddrs) string {
	return strings.NewReplacer(
		`"10.0.0.1:8000"`, `"`+net.JoinHostPort(a.ns1, "8000")+`"`,
		"addr: 10.0.1.11:8000", `addr: "`+net.JoinHostPort(a.veth2, "8000")+`"`,
		"addr: 10.0.1.1:8080", `addr: "`+net.JoinHostPort(a.ns2, "8080")+`"`,
	).Replace(seedYAML)
}

// seedForward is the page's first two forms as YAML, a TCP and a UDP
// service listening in ns1 ($OUT: the netns.out line, or none for the
// daemon's own namespace, the seed's default one).
const seedForward = `- name: $NAME-tcp
  addr: "$ADDR"
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "$NODE"}
  metadata: {netns: $NS1$OUT, datapath: $DP}
- name: $NAME-udp
  addr: "$ADDR"
  handler: {type: udp}
  # Sessions kept after a reply, so tc can carry them (GOST's default
  # ends a session with its first reply, which tc cannot do).
  listener: {type: udp, metadata: {keepAlive: true}}
  forwarder:
    nodes:
    - {name: target-0, addr: "$NODE"}
  metadata: {netns: $NS1$OUT, datapath: $DP}
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

// TestSeed000 builds the seed's topology and runs the page's three forms
// in IPv4 (the seed's addresses) and IPv6: a namespace plays the seed's
// default namespace (the targets live there and ebpfwd runs there), ns1
// and ns2 hang off it by veth pairs as the seed's ip commands describe,
// and a second ebpfwd is the HTTP proxy hop in ns2. Every form is reached
// from the default namespace, over veth0 into ns1, where the service
// listens, and carries TCP (1 MiB each way) and UDP, on each datapath that
// applies; the chain is the seed's YAML as written (IPv4) and with the
// IPv6 addresses.
func TestSeed000(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	host := testutil.NewNS(t, "e2e-seed-host")
	ns1 := testutil.NewNS(t, "e2e-seed-ns1")
	ns2 := testutil.NewNS(t, "e2e-seed-ns2")
	testutil.Veth(t, host, "veth0", "", ns1, "veth1", "")
	testutil.Veth(t, host, "veth2", "", ns2, "veth3", "")
	// targets in the default namespace (veth2's address) and in ns2
	// (veth3's), by family.
	inHost, inNS2 := map[string]*e2e.AcceptLog{}, map[string]*e2e.AcceptLog{}
	for _, a := range seedFamilies {
		for _, step := range []struct {
			ns      *topo.NS
			dev, ip string
			target  map[string]*e2e.AcceptLog
		}{
			{host, "veth0", a.veth0, nil},
			{ns1, "veth1", a.ns1, nil},
			{host, "veth2", a.veth2, inHost},
			{ns2, "veth3", a.ns2, inNS2},
		} {
			if err := step.ns.AddAddr(step.dev, step.ip+"/"+a.bits); err != nil {
				t.Fatal(err)
			}
			if step.target != nil {
				step.target[a.family] = e2e.EchoIn(t, step.ns, net.JoinHostPort(step.ip, "8000"))
				e2e.UDPEchoIn(t, step.ns, net.JoinHostPort(step.ip, "8000"))
			}
		}
	}
	proxy := e2e.Start(t, "hop-proxy", e2e.Config(seedHopProxy, map[string]string{"NS2": ns2.Name}), e2e.Options{})
	rename := strings.NewReplacer("netns: ns1", "netns: "+ns1.Name, "netns: ns2", "netns: "+ns2.Name)

	const (
		chainOnTC  = "tc: a chain's connections are terminated in userspace (HTTP CONNECT hops); auto runs the seed's YAML there"
		chainOnUDP = "UDP through a chain is impossible with HTTP CONNECT hops (a udp handler with a chain is refused)"
	)
	forms := []struct {
		name string
		// yaml is the configuration for datapath dp in family a.
		yaml func(dp string, a seedAddrs) string
		// target is the echo behind the service; from is the source it
		// must see on datapath dp.
		target map[string]*e2e.AcceptLog
		from   func(dp string, a seedAddrs) string
		skip   map[string]string // by datapath or "udp"
	}{
		{
			name: "listen in ns1, forward in the default namespace",
			yaml: func(dp string, a seedAddrs) string {
				return "services:\n" + e2e.Config(seedForward, map[string]string{"NAME": "default", "ADDR": net.JoinHostPort(a.ns1, "8000"),
					"NODE": net.JoinHostPort(a.veth2, "8000"), "NS1": ns1.Name, "OUT": "", "DP": dp})
			},
			target: inHost,
			// tc crosses over the splice link; the relay dials from the
			// default namespace, where the target's address is local.
			from: func(dp string, a seedAddrs) string {
				return map[string]string{"tc": a.spliceListenIP, "userspace": a.veth2}[dp]
			},
		},
		{
			name: "netns.out: ns1:8000 to ns2:8000",
			yaml: func(dp string, a seedAddrs) string {
				return "services:\n" + e2e.Config(seedForward, map[string]string{"NAME": "out", "ADDR": net.JoinHostPort(a.ns1, "8000"),
					"NODE": net.JoinHostPort(a.ns2, "8000"), "NS1": ns1.Name, "OUT": ", netns.out: " + ns2.Name, "DP": dp})
			},
			target: inNS2,
			from: func(dp string, a seedAddrs) string {
				return map[string]string{"tc": a.spliceListenIP, "userspace": a.ns2}[dp]
			},
		},
		{
			name:   "a chain through the HTTP proxy in ns2",
			yaml:   func(string, seedAddrs) string { return "" }, // below: the seed's YAML
			target: inHost,
			from:   func(_ string, a seedAddrs) string { return a.ns2 }, // the hop
			skip:   map[string]string{"tc": chainOnTC, "udp": chainOnUDP},
		},
	}
	for _, form := range forms {
		t.Run(form.name, func(t *testing.T) {
			for _, a := range seedFamilies {
				t.Run(a.family, func(t *testing.T) {
					for _, dp := range []string{"tc", "userspace"} {
						t.Run(dp, func(t *testing.T) {
							if why := form.skip[dp]; why != "" {
								t.Skip(why)
							}
							yaml := form.yaml(dp, a)
							if yaml == "" {
								yaml = rename.Replace(seedYAMLIn(a))
							}
							d := e2e.Start(t, "seed", yaml, e2e.Options{In: host})
							addr := net.JoinHostPort(a.ns1, "8000")
							t.Run("tcp", func(t *testing.T) {
								target := form.target[a.family]
								before := target.Count()
								if err := e2e.Exchange(t, host, addr, 1<<20, 30*time.Second); err != nil {
									t.Fatalf("1 MiB to %s: %v", addr, err)
								}
								remotes := target.Remotes()
								if len(remotes) != before+1 {
									t.Fatalf("the target got %d connections, want 1", len(remotes)-before)
								}
								// The source tells the path: the splice
								// link (tc), the relay, or the hop.
								if got, _, _ := net.SplitHostPort(remotes[before]); got != form.from(dp, a) {
									t.Errorf("the target saw the connection from %s, want %s", got, form.from(dp, a))
								}
							})
							t.Run("udp", func(t *testing.T) {
								if why := form.skip["udp"]; why != "" {
									t.Skip(why)
								}
								ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
								defer cancel()
								c, err := e2e.DialFrom(ctx, t, host, "udp", addr)
								if err != nil {
									t.Fatal(err)
								}
								if err := peer.UDPExchange(ctx, c, 16, 1400); err != nil {
									t.Fatalf("UDP to %s: %v", addr, err)
								}
							})
							if code, err := d.Stop(); err != nil || code != 0 {
								t.Errorf("daemon %s: exit status %d, %v after SIGTERM, want 0", d.Name, code, err)
							}
						})
					}
				})
			}
		})
	}
	if code, err := proxy.Stop(); err != nil || code != 0 {
		t.Errorf("daemon %s: exit status %d, %v after SIGTERM, want 0", proxy.Name, code, err)
	}
}
