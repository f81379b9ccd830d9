// Package topologies runs ebpfwd inside the network layouts the seed
// documents build by hand (/work/shared/seeds/001..004: a namespace router
// with NAT and VXLAN, a Docker-style host, bridge and DNAT port mapping,
// namespace handles), on every datapath that applies, and checks real TCP
// (SHA-256 both ways, half-close) and UDP through each. docs/TOPOLOGIES.md
// draws every layout; `make topologies` runs just these.
//
// Every namespace is created by the test with a unique name and removed in
// its cleanup, pass or fail; iptables runs only inside those namespaces;
// traffic goes only to addresses inside them. They need root; without it
// every test skips.
package topologies

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

func TestMain(m *testing.M) {
	os.Exit(e2e.Main(m))
}

// datapaths are the datapaths a topology is run on, each in its own
// daemon. (sockmap does not exist yet.)
var datapaths = []string{"tc", "userspace"}

const (
	// streamBytes is what one TCP check sends each way: enough for many
	// full-sized segments and several windows, small enough that the whole
	// matrix stays fast.
	streamBytes = 256 << 10
	// udpCount datagrams of sizes cycling up to udpSize are echoed per UDP
	// check; 1400 fits every MTU here, the overlay's included.
	udpCount = 16
	udpSize  = 1400
	// exchangeTimeout bounds one check, dial included.
	exchangeTimeout = 20 * time.Second
)

// forwardTemplate is a TCP and a UDP service on one address forwarding to
// one node: every topology forwards both protocols the same way.
const forwardTemplate = `- name: $NAME-tcp
  addr: "$ADDR"
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: node-0, addr: "$NODE"}
  metadata: {datapath: $DP$META}
- name: $NAME-udp
  addr: "$ADDR"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}} # so tc can carry it
  forwarder:
    nodes:
    - {name: node-0, addr: "$NODE"}
  metadata: {datapath: $DP$META}
`

// services is a configuration of the services forward makes.
func services(forwards ...string) string {
	return "services:\n" + strings.Join(forwards, "")
}

// forward is forwardTemplate filled in; meta is more metadata for both
// services (", netns: NAME"), "" for none: the daemon's own namespace.
func forward(name, addr, node, dp, meta string) string {
	return e2e.Config(forwardTemplate, map[string]string{"NAME": name, "ADDR": addr, "NODE": node, "DP": dp, "META": meta})
}

// must fails the test on a topology step's error: the error carries the
// command line and its output, so the step can be redone by hand.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// family is an IP address family a topology is built in: the name of its
// subtests and the iptables command that writes its rules.
type family struct {
	name     string
	iptables string
}

var (
	ipv4 = family{name: "IPv4", iptables: "iptables"}
	ipv6 = family{name: "IPv6", iptables: "ip6tables"}
)

// iptables applies rules, each one iptables command line ("-t nat -A
// ..."), with fam's command (iptables or ip6tables) inside ns, and never
// anywhere else.
func iptables(t *testing.T, fam family, ns *topo.NS, rules ...string) {
	t.Helper()
	if _, err := exec.LookPath(fam.iptables); err != nil {
		t.Fatalf("this topology needs %s inside its namespaces: apt-get install iptables (.ci/run does): %v", fam.iptables, err)
	}
	for _, r := range rules {
		must(t, ns.Exec(fam.iptables, append([]string{"-w"}, strings.Fields(r)...)...))
	}
}

// path is one way through a topology: a client namespace, the address it
// dials, and what the server must see.
type path struct {
	name  string
	from  *topo.NS
	proto string // "tcp" or "udp"
	addr  string
	// server logs the TCP connections of the echo server behind addr;
	// source is the address that server must see the connection come from
	// (it tells which path carried it: ebpfwd's gateway address, a
	// masquerading router, or the client itself through a plain DNAT).
	// Unchecked when server is nil.
	server *e2e.AcceptLog
	source string
	// kernel: on tc, the program carries this path, so the server sees a
	// source port from tc's SNAT range; otherwise (a client inside the
	// listen namespace, whose packets cross no interface) the relay does,
	// from an ephemeral port. Checked only with server.
	kernel bool
	// skip is why a datapath cannot carry this path ("" when it can).
	skip map[string]string
	// size overrides streamBytes (TCP) or udpSize (UDP).
	size int
}

// check runs every path as a subtest of t for datapath dp.
func check(t *testing.T, dp string, paths []path) {
	t.Helper()
	for _, p := range paths {
		t.Run(p.name, func(t *testing.T) {
			if why := p.skip[dp]; why != "" {
				t.Skip(why)
			}
			switch p.proto {
			case "tcp":
				checkTCP(t, p, dp == "tc" && p.kernel)
			case "udp":
				size := p.size
				if size == 0 {
					size = udpSize
				}
				checkUDP(t, p.from, p.addr, size)
			default:
				t.Fatalf("path %q: protocol %q", p.name, p.proto)
			}
		})
	}
}

// tcSNATLow and tcSNATHigh bound the range the tc program takes source ports from
// (docs/DATAPATHS.md), below the kernel's ephemeral range, which the
// daemon reserves for it: a port in it is the program's work.
const tcSNATLow, tcSNATHigh = 1024, 32767

// checkTCP pushes a verified stream through p and checks who the server
// saw, and, with kernel, that the tc program translated it.
func checkTCP(t *testing.T, p path, kernel bool) {
	t.Helper()
	var before int
	if p.server != nil {
		before = len(p.server.Remotes())
	}
	n := p.size
	if n == 0 {
		n = streamBytes
	}
	if err := e2e.Exchange(t, p.from, p.addr, n, exchangeTimeout); err != nil {
		t.Fatalf("TCP %d bytes from %s to %s: %v", n, p.from.Name, p.addr, err)
	}
	if p.server == nil {
		return
	}
	remotes := p.server.Remotes()
	if len(remotes) <= before {
		t.Fatalf("the server behind %s logged no connection", p.addr)
	}
	host, port, _ := net.SplitHostPort(remotes[before])
	if host != p.source {
		t.Errorf("the server behind %s saw the connection from %s, want %s", p.addr, host, p.source)
	}
	if n, _ := strconv.Atoi(port); kernel && (n < tcSNATLow || n > tcSNATHigh) {
		t.Errorf("the server behind %s saw source port %s, outside tc's SNAT range %d-%d: the program did not carry the flow", p.addr, port, tcSNATLow, tcSNATHigh)
	}
}

// checkUDP echoes udpCount datagrams of up to size bytes from ns through
// addr.
func checkUDP(t *testing.T, ns *topo.NS, addr string, size int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), exchangeTimeout)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, ns, "udp", addr)
	if err != nil {
		t.Fatalf("UDP dial %s from %s: %v", addr, ns.Name, err)
	}
	defer c.Close()
	if err := peer.UDPExchange(ctx, c, udpCount, size); err != nil {
		t.Fatalf("UDP from %s to %s: %v", ns.Name, addr, err)
	}
}

// newNS is testutil.NewNS with the package's prefix, so a leftover is
// recognisable as this package's.
func newNS(t *testing.T, role string) *topo.NS {
	t.Helper()
	return testutil.NewNS(t, "topo-"+role)
}

// hostPort joins an address and a port, bracketing IPv6 addresses.
func hostPort(addr, port string) string {
	return net.JoinHostPort(addr, port)
}

// hostOf is the host part of "host:port".
func hostOf(hostport string) string {
	host, _, _ := net.SplitHostPort(hostport)
	return host
}
