package test

import (
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// TestSeed000CommandLine runs the examples of GOST's netns page in their
// command-line form, `ebpfwd -L ... [-F ...]` as `gost -L ... [-F ...]`,
// on the seed's topology (a namespace plays the default one), and pushes
// bytes through each; `-O yaml` prints what runs.
func TestSeed000CommandLine(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	host := testutil.NewNS(t, "e2e-cli-host")
	ns1 := testutil.NewNS(t, "e2e-cli-ns1")
	ns2 := testutil.NewNS(t, "e2e-cli-ns2")
	testutil.Veth(t, host, "veth0", "10.0.0.11/24", ns1, "veth1", "10.0.0.1/24")
	testutil.Veth(t, host, "veth2", "10.0.1.11/24", ns2, "veth3", "10.0.1.1/24")
	v6 := seedFamilies[1]
	for _, a := range []struct {
		ns      *topo.NS
		dev, ip string
	}{{host, "veth0", v6.veth0}, {ns1, "veth1", v6.ns1}, {host, "veth2", v6.veth2}, {ns2, "veth3", v6.ns2}} {
		if err := a.ns.AddAddr(a.dev, a.ip+"/"+v6.bits); err != nil {
			t.Fatal(err)
		}
	}
	// Go listens on 0.0.0.0 dual stack: these take IPv6 too.
	inHost := e2e.EchoIn(t, host, "0.0.0.0:8000") // also 10.0.1.11:8000
	inNS2 := e2e.EchoIn(t, ns2, "0.0.0.0:8000")
	ns1v6, hostv6 := net.JoinHostPort(v6.ns1, "8000"), net.JoinHostPort(v6.veth2, "8000")
	e2e.Start(t, "cli-hop", e2e.Config(seedHopProxy, map[string]string{"NS2": ns2.Name}), e2e.Options{})
	// The page's examples as written, but for the namespace names; they
	// run one after the other, so they share port 8000 as on the page.

	tests := []struct {
		name   string
		cmd    []string
		dialNS string // where the client is
		addr   string
		target *e2e.AcceptLog
		from   string // the address the target sees, "" = any
	}{
		{"listen in ns1, forward in the default namespace",
			[]string{"-L", "tcp://:8000/:8000?netns=" + ns1.Name}, ns1.Name, "127.0.0.1:8000", inHost, ""},
		{"netns.out: ns1:8000 to ns2:8000",
			[]string{"-L", "tcp://:8000/:8000?netns=" + ns1.Name + "&netns.out=" + ns2.Name}, ns1.Name, "127.0.0.1:8000", inNS2, ""},
		{"a chain through the HTTP proxy in ns2",
			[]string{"-L", "tcp://10.0.0.1:8000/10.0.1.11:8000?netns=" + ns1.Name, "-F", "http://10.0.1.1:8080?netns=" + ns2.Name},
			host.Name, "10.0.0.1:8000", inHost, "10.0.1.1"},
		// The same over IPv6, with the addresses written out (a
		// wildcard listener and ":8000" would be IPv4's loopback): the
		// first two are direct forwards to an address of netns.out, so
		// auto runs them on tc, over a splice link.
		{"IPv6: listen in ns1, forward in the default namespace",
			[]string{"-L", "tcp://" + ns1v6 + "/" + hostv6 + "?netns=" + ns1.Name}, host.Name, ns1v6, inHost, spliceListenAddr6},
		{"IPv6: netns.out: ns1:8000 to ns2:8000",
			[]string{"-L", "tcp://" + ns1v6 + "/" + net.JoinHostPort(v6.ns2, "8000") + "?netns=" + ns1.Name + "&netns.out=" + ns2.Name},
			host.Name, ns1v6, inNS2, spliceListenAddr6},
		{"IPv6: a chain through the HTTP proxy in ns2",
			[]string{"-L", "tcp://" + ns1v6 + "/" + hostv6 + "?netns=" + ns1.Name, "-F", "http://" + net.JoinHostPort(v6.ns2, "8080") + "?netns=" + ns2.Name},
			host.Name, ns1v6, inHost, v6.ns2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := exec.Command(e2e.Bin, append(slices.Clone(tt.cmd), "-O", "yaml")...).CombinedOutput()
			if err != nil || !strings.Contains(string(out), "services:") {
				t.Fatalf("ebpfwd %s -O yaml: %v\n%s", strings.Join(tt.cmd, " "), err, out)
			}
			d := e2e.Start(t, "cli", "", e2e.Options{In: host, CommandLine: tt.cmd})
			client := host
			if tt.dialNS == ns1.Name {
				client = ns1
			}
			before := tt.target.Count()
			if err := e2e.Exchange(t, client, tt.addr, 1<<20, 30*time.Second); err != nil {
				t.Fatalf("1 MiB through `ebpfwd %s`: %v", strings.Join(tt.cmd, " "), err)
			}
			if tt.target.Count() != before+1 {
				t.Fatalf("the target got %d connections, want 1", tt.target.Count()-before)
			}
			if tt.from != "" {
				if srcs := tt.target.Sources(); !slices.Contains(srcs, tt.from) {
					t.Fatalf("target saw %v, want connections from %s (the hop)", srcs, tt.from)
				}
			}
			if code, err := d.Stop(); err != nil || code != 0 {
				t.Fatalf("stop: %d, %v", code, err)
			}
		})
	}

	// A URL ebpfwd cannot run is refused, naming it.
	out, err := exec.Command(e2e.Bin, "-L", "socks5://:1080").CombinedOutput()
	if exitCode(err) != 2 || !strings.Contains(string(out), `scheme "socks5"`) {
		t.Fatalf("ebpfwd -L socks5://:1080: exit %d, %s", exitCode(err), out)
	}
}
