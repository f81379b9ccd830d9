package test

import (
	"context"
	"strconv"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// GOST's port-forwarding page (gost.run, tutorials/port-forwarding), its
// local TCP and UDP examples as the page gives them. The page's markdown
// indents the two TCP files partly with tabs, which no YAML parser takes
// (GOST's neither); the rendered page shows them with spaces, as here.
// The UDP file is byte for byte the page's.
var gostPortForwarding = []struct {
	name    string
	yaml    string
	cli     []string
	network string
	addr    string   // where a client reaches the service
	targets []string // the targets the clients must reach, in order
}{
	{
		name: "tcp one-to-one",
		yaml: `services:
- name: service-0
  addr: :8080
  handler:
    type: tcp
  listener:
    type: tcp
  forwarder:
    nodes:
    - name: target-0
      addr: 192.168.1.1:80
`,
		cli:     []string{"-L", "tcp://:8080/192.168.1.1:80"},
		network: "tcp", addr: "127.0.0.1:8080",
		targets: []string{"192.168.1.1:80", "192.168.1.1:80"},
	},
	{
		name: "tcp one-to-many, round robin",
		yaml: `services:
- name: service-0
  addr: :8080
  handler:
    type: tcp
  listener:
    type: tcp
  forwarder:
    nodes:
    - name: target-0
      addr: 192.168.1.1:80
    - name: target-1
      addr: 192.168.1.2:80
    - name: target-2
      addr: 192.168.1.3:8080
    selector:
      strategy: round
      maxFails: 1
      failTimeout: 30s
`,
		cli:     []string{"-L", "tcp://:8080/192.168.1.1:80,192.168.1.2:80,192.168.1.3:8080?strategy=round&maxFails=1&failTimeout=30s"},
		network: "tcp", addr: "127.0.0.1:8080",
		targets: []string{"192.168.1.1:80", "192.168.1.2:80", "192.168.1.3:8080"},
	},
	{
		name: "udp one-to-many",
		yaml: `services:
- name: service-0
  addr: :10053
  handler:
    type: udp
  listener:
    type: udp
    metadata:
      keepAlive: true
      ttl: 5s
      readBufferSize: 4096
  forwarder:
    nodes:
    - name: target-0
      addr: 192.168.1.1:53
    - name: target-1
      addr: 192.168.1.2:53
    - name: target-2
      addr: 192.168.1.3:53
`,
		cli:     []string{"-L", "udp://:10053/192.168.1.1:53,192.168.1.2:53,192.168.1.3:53?keepAlive=true&ttl=5s&readBufferSize=4096"},
		network: "udp", addr: "127.0.0.1:10053",
	},
}

// TestGOSTPortForwardingPage runs the local port-forwarding examples of
// GOST's documentation unchanged, as files and as command lines: the
// daemon runs inside a test namespace (the page's "local" host), whose
// 192.168.1.0/24 leads to a second namespace holding the page's targets.
// Bytes are checked both ways; the round robin reaches every target in
// order.
func TestGOSTPortForwardingPage(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	host := testutil.NewNS(t, "e2e-gdoc-host")
	lan := testutil.NewNS(t, "e2e-gdoc-lan")
	testutil.Veth(t, host, "eth0", "192.168.1.254/24", lan, "eth0", "192.168.1.1/24")
	for _, a := range []string{"192.168.1.2/24", "192.168.1.3/24"} {
		if err := lan.AddAddr("eth0", a); err != nil {
			t.Fatal(err)
		}
	}
	logs := map[string]*e2e.AcceptLog{}
	for _, a := range []string{"192.168.1.1:80", "192.168.1.2:80", "192.168.1.3:8080"} {
		logs[a] = e2e.EchoIn(t, lan, a)
	}
	for _, a := range []string{"192.168.1.1:53", "192.168.1.2:53", "192.168.1.3:53"} {
		e2e.UDPEchoIn(t, lan, a)
	}
	for _, ex := range gostPortForwarding {
		for _, form := range []string{"file", "command line"} {
			t.Run(ex.name+"/"+form, func(t *testing.T) {
				opts := e2e.Options{In: host}
				if form == "command line" {
					opts.CommandLine = ex.cli
				}
				before := map[string]int{}
				for a, l := range logs {
					before[a] = l.Count()
				}
				d := e2e.Start(t, "gost-docs", ex.yaml, opts)
				defer d.Stop()
				if ex.network == "udp" {
					ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
					defer cancel()
					// Three clients: with keepAlive each keeps its
					// session; the datagrams stay under readBufferSize.
					for range 3 {
						conn, err := e2e.DialFrom(ctx, t, host, "udp", ex.addr)
						if err != nil {
							t.Fatal(err)
						}
						if err := peer.UDPExchange(ctx, conn, 4, 1024); err != nil {
							t.Fatal(err)
						}
					}
					return
				}
				for i, want := range ex.targets {
					if err := e2e.Exchange(t, host, ex.addr, 64<<10, trafficTimeout); err != nil {
						t.Fatalf("connection %d: %v", i, err)
					}
					if got := logs[want].Count() - before[want]; got < 1 {
						t.Fatalf("connection %d did not reach %s (the round robin's turn); reached: %v", i, want, counts(logs, before))
					}
					before[want]++
				}
			})
		}
	}
}

// counts says how many connections each target got since before.
func counts(logs map[string]*e2e.AcceptLog, before map[string]int) string {
	var b strings.Builder
	for a, l := range logs {
		b.WriteString(a + "=" + strconv.Itoa(l.Count()-before[a]) + " ")
	}
	return b.String()
}
