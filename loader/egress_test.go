package loader

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/netns"
)

// interfaceIn returns ifindex and MAC of ifname in ns.
func interfaceIn(t *testing.T, ns netns.NS, ifname string) (int, net.HardwareAddr) {
	t.Helper()
	var iface *net.Interface
	err := ns.Do(func() error {
		var err error
		iface, err = net.InterfaceByName(ifname)
		return err
	})
	if err != nil {
		t.Fatalf("look up %s in %s: %v", ifname, ns, err)
	}
	return iface.Index, iface.HardwareAddr
}

// TestFixedEgressReachesUnroutedNode forwards to a node the gateway has no
// route to, the way a splice link reaches netns.out: the node's fixed
// egress (g1 and both its MACs) is the only way there.
func TestFixedEgressReachesUnroutedNode(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tp := newGatewayTopology(t)
	// 10.20.9.9 lives on the server's loopback: local there, unknown to
	// the gateway's FIB.
	node := netip.MustParseAddrPort("10.20.9.9:9000")
	if err := tp.server.Do(func() error { return addLoopbackAddr("10.20.9.9/32") }); err != nil {
		t.Fatal(err)
	}
	l := load(t, Config{})
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := l.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	vip := netip.MustParseAddrPort("10.20.1.1:8000")
	if _, err := l.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}}); err == nil ||
		!strings.Contains(err.Error(), "route") {
		t.Fatalf("PutService of an unrouted node without egress: %v, want a route error", err)
	}
	g1, g1MAC := interfaceIn(t, tp.gateway, "g1")
	_, s0MAC := interfaceIn(t, tp.server, "s0")
	egress := &Egress{Ifindex: g1, SrcMAC: g1MAC, DstMAC: s0MAC}
	if _, err := l.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node, Egress: egress}}}); err == nil ||
		!strings.Contains(err.Error(), "SNAT") {
		t.Fatalf("PutService with egress but no SNAT address: %v, want an error", err)
	}
	snat := netip.MustParseAddr("10.20.2.1")
	id, err := l.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node, SNAT: snat, Egress: egress}}})
	if err != nil {
		t.Fatal(err)
	}

	tp.serveEcho(ctx, t, node)
	c := tp.dial(ctx, t, vip)
	if err := peer.Exchange(ctx, c, 256<<10); err != nil {
		t.Fatal(err)
	}
	cnt, err := l.Counters(id)
	if err != nil {
		t.Fatal(err)
	}
	if cnt.NewFlows != 1 || cnt.RedirectPeer == 0 || cnt.RedirectNeigh != 0 || cnt.PassNoRoute != 0 {
		t.Errorf("counters %+v: want one flow, all peer redirects, nothing passed", cnt)
	}
}

// addLoopbackAddr adds cidr to lo in the calling thread's namespace.
func addLoopbackAddr(cidr string) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return err
	}
	return netlink.AddrAdd(lo, addr)
}

// TestDetach removes one attachment and leaves the others.
func TestDetach(t *testing.T) {
	testutil.RequireRoot(t)
	tp := newGatewayTopology(t)
	l := load(t, Config{Attach: AttachTCX})
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := l.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	g1, _ := interfaceIn(t, tp.gateway, "g1")
	if err := l.Detach("g1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Detach("g1"); err != nil {
		t.Errorf("second Detach: %v", err)
	}
	programs := func(ifname string) int {
		t.Helper()
		idx, _ := interfaceIn(t, tp.gateway, ifname)
		var n int
		err := tp.gateway.Do(func() error {
			res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: ebpf.AttachTCXIngress})
			if err != nil {
				return err
			}
			n = len(res.Programs)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := programs("g1"); n != 0 {
		t.Errorf("%d programs on g1 after Detach", n)
	}
	if n := programs("g0"); n != 1 {
		t.Errorf("%d programs on g0, want 1", n)
	}
	entries, err := os.ReadDir(l.PinDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "link_g1_") {
			t.Errorf("pin %s left after Detach", e.Name())
		}
	}
	var flags uint32
	if err := l.objs.EbpfwdIfaces.Lookup(uint32(g1), &flags); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("ifaces map still has g1 (flags %#x, %v)", flags, err)
	}
	// It can be attached again.
	if _, err := l.Attach(tp.gateway, "g1"); err != nil {
		t.Errorf("attach after Detach: %v", err)
	}
}
