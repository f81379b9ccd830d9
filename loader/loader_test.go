package loader

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpfwd/ebpfwd/bpf"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
)

// load loads an instance and closes it in Cleanup, checking that nothing
// is left in bpffs.
func load(t *testing.T, cfg Config) *Loader {
	t.Helper()
	cfg.Instance = testutil.UniqueName(t, "test")
	l, err := Load(cfg)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		// The instance's directory goes with its last namespace.
		if _, err := os.Stat(filepath.Dir(l.PinDir())); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin directory %s still there after Close (stat: %v)", filepath.Dir(l.PinDir()), err)
		}
	})
	return l
}

// gatewayTopology is client (10.20.1.2) <-> gateway (10.20.1.1, 10.20.2.1)
// <-> server (10.20.2.2), forwarding off in the gateway: whatever crosses
// it was moved by the program.
type gatewayTopology struct {
	client, gateway, server netns.NS
	// gatewayNS is the gateway again, for a test that links more to it.
	gatewayNS *topo.NS
}

func newGatewayTopology(t *testing.T) gatewayTopology {
	t.Helper()
	c, ch := testutil.NewNSHandle(t, "ebpfwd-tcc", netns.Parse)
	g, gh := testutil.NewNSHandle(t, "ebpfwd-tcg", netns.Parse)
	s, sh := testutil.NewNSHandle(t, "ebpfwd-tcs", netns.Parse)
	testutil.Veth(t, c, "c0", "10.20.1.2/24", g, "g0", "10.20.1.1/24")
	testutil.Veth(t, g, "g1", "10.20.2.1/24", s, "s0", "10.20.2.2/24")
	return gatewayTopology{client: ch, gateway: gh, server: sh, gatewayNS: g}
}

// attachedGateway is a gateway topology with an instance loaded (cfg) and
// attached to both of the gateway's interfaces.
func attachedGateway(t *testing.T, cfg Config) (gatewayTopology, *Loader) {
	t.Helper()
	tp := newGatewayTopology(t)
	l := load(t, cfg)
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := l.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	return tp, l
}

func TestForwardBetweenNamespaces(t *testing.T) {
	testutil.RequireRoot(t)
	for _, mode := range []struct {
		name   string
		attach AttachMode
	}{{"tcx", AttachTCX}, {"legacy tc", AttachLegacy}} {
		t.Run(mode.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tp := newGatewayTopology(t)
			l := load(t, Config{Attach: mode.attach})
			for _, ifname := range []string{"g0", "g1"} {
				a, err := l.Attach(tp.gateway, ifname)
				if err != nil {
					t.Fatal(err)
				}
				if !a.PeerRedirect || a.Legacy != (mode.attach == AttachLegacy) {
					t.Errorf("attachment %+v: want peer redirect, legacy=%v", a, mode.attach == AttachLegacy)
				}
			}

			vip := netip.MustParseAddrPort("10.20.1.1:8000")
			node := netip.MustParseAddrPort("10.20.2.2:9000")
			// The SNAT address is left to the route lookup: 10.20.2.1.
			tcpID, err := l.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}})
			if err != nil {
				t.Fatal(err)
			}
			udpID, err := l.PutService(Service{Network: "udp", VIP: vip, Nodes: []Node{{Addr: node}}})
			if err != nil {
				t.Fatal(err)
			}

			ln, err := tp.server.Listen(ctx, "tcp", node.String())
			if err != nil {
				t.Fatal(err)
			}
			defer peer.ServeEcho(ln)()
			pc, err := tp.server.ListenPacket(ctx, "udp", node.String())
			if err != nil {
				t.Fatal(err)
			}
			defer peer.ServeUDPEcho(pc)()

			// Nothing listens on the VIP in the gateway: a connection
			// can only succeed through the program.
			const size = 1 << 20
			c, err := tp.client.Dial(ctx, "tcp", vip.String())
			if err != nil {
				t.Fatalf("dial the service: %v", err)
			}
			if err := peer.Exchange(ctx, c, size); err != nil {
				t.Fatal(err)
			}
			const datagrams, maxSize = 50, 1400
			uc, err := tp.client.Dial(ctx, "udp", vip.String())
			if err != nil {
				t.Fatal(err)
			}
			if err := peer.UDPExchange(ctx, uc, datagrams, maxSize); err != nil {
				t.Fatal(err)
			}

			tc, err := l.Counters(tcpID)
			if err != nil {
				t.Fatal(err)
			}
			// The program counts the payload of every packet it translates:
			// exact, unless TCP retransmitted some (a loaded machine).
			if tc.NewFlows != 1 || !withinRetransmits(tc.BytesUp, size) || !withinRetransmits(tc.BytesDown, size+peer.TrailerSize) {
				t.Errorf("TCP counters %+v: want 1 flow, %d bytes up, %d down (+5%% for retransmissions)", tc, size, size+peer.TrailerSize)
			}
			if tc.RedirectPeer == 0 || tc.PassNoRoute+tc.PassNoFlow+tc.DropRewrite+tc.DropConntrack+tc.SNATFailures != 0 {
				t.Errorf("TCP counters %+v: want peer redirects and no pass/drop", tc)
			}
			var udpBytes uint64
			for seq := range uint64(datagrams) {
				udpBytes += uint64(peer.DatagramSize(uint32(seq), maxSize))
			}
			uc2, err := l.Counters(udpID)
			if err != nil {
				t.Fatal(err)
			}
			// A datagram the exchange resends counts again.
			if uc2.NewFlows != 1 || uc2.BytesUp < udpBytes || uc2.BytesDown < udpBytes || uc2.PacketsUp < datagrams {
				t.Errorf("UDP counters %+v: want 1 flow, >= %d bytes and %d packets each way", uc2, udpBytes, datagrams)
			}

			conns, err := l.Conns()
			if err != nil {
				t.Fatal(err)
			}
			if len(conns) != 2 {
				t.Fatalf("Conns() = %+v, want the TCP and the UDP flow", conns)
			}
			for _, cn := range conns {
				if cn.VIP != vip || cn.Node != node || cn.SNAT.Addr() != netip.MustParseAddr("10.20.2.1") ||
					cn.SNAT.Port() < DefaultSNATPortMin || cn.Expired {
					t.Errorf("conn %+v", cn)
				}
				if cn.Network == "tcp" && cn.State != TCPClosing {
					t.Errorf("TCP flow in state %s after both sides closed, want closing", cn.State)
				}
			}
		})
	}
}

// serveEcho runs a TCP echo server on node in the server namespace until
// the test ends.
func (tp gatewayTopology) serveEcho(ctx context.Context, t *testing.T, node netip.AddrPort) {
	t.Helper()
	ln, err := tp.server.Listen(ctx, "tcp", node.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(peer.ServeEcho(ln))
}

// dial connects from the client namespace to addr; the connection is
// closed when the test ends.
func (tp gatewayTopology) dial(ctx context.Context, t *testing.T, addr netip.AddrPort) net.Conn {
	t.Helper()
	c, err := tp.client.Dial(ctx, "tcp", addr.String())
	if err != nil {
		t.Fatalf("dial %s from the client namespace: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestPinDirectory(t *testing.T) {
	testutil.RequireRoot(t)
	l := load(t, Config{})
	if _, err := Load(Config{Instance: l.cfg.Instance}); err == nil {
		t.Fatal("a second Load of a live instance succeeded")
	}

	// A crashed run leaves pins behind, and nobody holds the lock: a new
	// Load must clean them and start over.
	crashed := testutil.UniqueName(t, "test")
	stale := Config{Instance: crashed}.pinDir()
	if err := os.MkdirAll(stale+"/leftover", 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(stale)) })
	l2, err := Load(Config{Instance: crashed})
	if err != nil {
		t.Fatalf("Load over a stale pin directory: %v", err)
	}
	if _, err := os.Stat(stale + "/leftover"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale entry survived Load: %v", err)
	}
	if err := l2.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestGarbageCollectionRemovesExpiredFlows(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tp, l := attachedGateway(t, Config{})
	vip := netip.MustParseAddrPort("10.20.1.1:8000")
	node := netip.MustParseAddrPort("10.20.2.2:9000")
	// A UDP idle timeout short enough to expire within the test.
	const idle = 300 * time.Millisecond
	if _, err := l.PutService(Service{Network: "udp", VIP: vip, Nodes: []Node{{Addr: node}}, IdleTimeout: idle}); err != nil {
		t.Fatal(err)
	}
	pc, err := tp.server.ListenPacket(ctx, "udp", node.String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.ServeUDPEcho(pc)()
	uc, err := tp.client.Dial(ctx, "udp", vip.String())
	if err != nil {
		t.Fatal(err)
	}
	if err := peer.UDPExchange(ctx, uc, 3, 100); err != nil {
		t.Fatal(err)
	}
	if n, err := l.CollectGarbage(); err != nil || n != 0 {
		t.Fatalf("CollectGarbage on a live flow = %d, %v; want 0, nil", n, err)
	}
	time.Sleep(2 * idle)
	conns, err := l.Conns()
	if err != nil || len(conns) != 1 || !conns[0].Expired {
		t.Fatalf("Conns() = %+v, %v; want one expired flow", conns, err)
	}
	if n, err := l.CollectGarbage(); err != nil || n != 1 {
		t.Fatalf("CollectGarbage = %d, %v; want 1, nil", n, err)
	}
	if conns, err := l.Conns(); err != nil || len(conns) != 0 {
		t.Fatalf("Conns() after collection = %+v, %v; want none", conns, err)
	}
}

// TestRefreshRouteHints: a node's route hint follows its interface when
// the interface is deleted (no route: 0) and created again under its name
// (a new ifindex); a refresh with nothing changed changes nothing.
func TestRefreshRouteHints(t *testing.T) {
	testutil.RequireRoot(t)
	tp := newGatewayTopology(t)
	l := load(t, Config{})
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := l.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	id, err := l.PutService(Service{Network: "tcp", VIP: netip.MustParseAddrPort("10.20.1.1:8000"),
		Nodes: []Node{{Addr: netip.MustParseAddrPort("10.20.2.2:9000")}}})
	if err != nil {
		t.Fatal(err)
	}
	hint := func() uint32 {
		t.Helper()
		var n bpf.NATNode
		if err := l.objs.EbpfwdNodes.Lookup(bpf.NATNodeKey{ServiceId: uint32(id), Index: 0}, &n); err != nil {
			t.Fatal(err)
		}
		return n.Ifindex
	}
	ifindex := func() uint32 {
		t.Helper()
		var idx int
		if err := tp.gateway.Do(func() error {
			iface, err := net.InterfaceByName("g1")
			if err == nil {
				idx = iface.Index
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return uint32(idx)
	}
	refresh := func(want int) {
		t.Helper()
		if n, err := l.RefreshRouteHints(); err != nil || n != want {
			t.Fatalf("RefreshRouteHints = %d, %v; want %d, nil", n, err, want)
		}
	}
	if got, want := hint(), ifindex(); got != want {
		t.Fatalf("hint %d at start, want g1's ifindex %d", got, want)
	}
	refresh(0)
	if err := tp.gatewayNS.IP("link", "del", "g1"); err != nil {
		t.Fatal(err)
	}
	refresh(1)
	if got := hint(); got != 0 {
		t.Fatalf("hint %d with no route to the node, want 0", got)
	}
	server := testutil.NewNS(t, "ebpfwd-tcs2")
	testutil.Veth(t, tp.gatewayNS, "g1", "10.20.2.1/24", server, "s0", "10.20.2.2/24")
	refresh(1)
	if got, want := hint(), ifindex(); got != want {
		t.Fatalf("hint %d after g1 came back, want its new ifindex %d", got, want)
	}
}

func TestConfigValidation(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
	}{
		{"empty instance", Config{}},
		{"instance with a slash", Config{Instance: "a/b"}},
		{"dot-dot instance", Config{Instance: ".."}},
		{"inverted SNAT range", Config{Instance: "x", SNATPortMin: 62000, SNATPortMax: 61000}},
		{"SNAT range from 0", Config{Instance: "x", SNATPortMin: 0, SNATPortMax: 61000}},
		{"negative timeout", Config{Instance: "x", TCPResetTimeout: -time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			if err := cfg.setDefaults(); err == nil {
				t.Errorf("setDefaults(%+v) accepted an invalid config", tt.cfg)
			}
		})
	}
}

// TestSNATPortsEnv: the test knob replaces the SNAT range, set in the
// Config or not, and a malformed value is an error.
func TestSNATPortsEnv(t *testing.T) {
	tests := []struct {
		name, env string
		cfg       Config
		min, max  uint16
		wantErr   bool
	}{
		{"unset range", "61000-61001", Config{Instance: "x"}, 61000, 61001, false},
		{"range set in the config", "61000-61001", Config{Instance: "x", SNATPortMin: 2000, SNATPortMax: 3000}, 61000, 61001, false},
		{"malformed", "61000", Config{Instance: "x"}, 0, 0, true},
		{"inverted", "61001-61000", Config{Instance: "x"}, 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(SNATPortsEnv, tt.env)
			cfg := tt.cfg
			err := cfg.setDefaults()
			switch {
			case tt.wantErr && err == nil:
				t.Fatalf("%s=%s accepted: range %d-%d", SNATPortsEnv, tt.env, cfg.SNATPortMin, cfg.SNATPortMax)
			case tt.wantErr:
				if !strings.Contains(err.Error(), SNATPortsEnv) && !strings.Contains(err.Error(), "SNAT port range") {
					t.Errorf("error %q names neither the variable nor the range", err)
				}
			case err != nil:
				t.Fatal(err)
			case cfg.SNATPortMin != tt.min || cfg.SNATPortMax != tt.max:
				t.Errorf("range %d-%d, want %d-%d", cfg.SNATPortMin, cfg.SNATPortMax, tt.min, tt.max)
			}
		})
	}
}

// withinRetransmits: got counts sent bytes, plus at most 5% + 64 KiB that
// TCP sent again.
func withinRetransmits(got, sent uint64) bool { return got >= sent && got <= sent+sent/20+64<<10 }

// TestGarbageCollectionSparesReusedPort: between the walk that finds a
// flow expired and its deletion, the program may give the flow's SNAT port
// to a new flow. Collection must then remove the expired flow only, not
// the reverse entry the new flow's replies need.
func TestGarbageCollectionSparesReusedPort(t *testing.T) {
	testutil.RequireRoot(t)
	l := load(t, Config{})
	tuple := func(src, dst string) bpf.NATTuple {
		s, d := netip.MustParseAddrPort(src), netip.MustParseAddrPort(dst)
		return bpf.NATTuple{Src: bpf.Addr(s.Addr()), Dst: bpf.Addr(d.Addr()), Sport: bpf.Port(s.Port()),
			Dport: bpf.Port(d.Port()), Proto: protoTCP, Family: bpf.Family(s.Addr())}
	}
	expired := tuple("10.0.0.1:1111", "10.0.0.9:80")
	reused := tuple("10.0.0.2:2222", "10.0.0.9:80")
	reply := tuple("10.0.1.1:80", "10.0.1.9:5000") // node -> SNAT port both flows had
	now, err := monotonicNow()
	if err != nil {
		t.Fatal(err)
	}
	// The expired flow's last packet lies an hour back, or at boot on a
	// machine up for less (CLOCK_MONOTONIC starts near 0: now - 1h would
	// wrap around to the far future, and the flow would never expire).
	// Either way it is older than the closing timeout once the machine
	// has been up that long.
	if now <= uint64(DefaultTCPClosingTimeout) {
		t.Skipf("up for %v only: no timestamp lies a closing timeout (%v) back", time.Duration(now), DefaultTCPClosingTimeout)
	}
	// The state the program leaves after reclaim_if_stale gave the port
	// to the new flow while the old one's conntrack entry lingers (as
	// when the walk saw it before the program reclaimed the port).
	entries := []struct {
		key bpf.NATTuple
		ct  bpf.NATCtEntry
	}{
		{expired, bpf.NATCtEntry{Reply: reply, State: uint8(TCPClosing), LastSeenNs: monotonicAgo(now, time.Hour)}},
		{reused, bpf.NATCtEntry{Reply: reply, State: uint8(TCPEstablished), LastSeenNs: now, IdleTimeoutNs: uint64(time.Hour)}},
	}
	for _, e := range entries {
		if err := l.objs.EbpfwdConntrack.Put(e.key, e.ct); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.objs.EbpfwdReverse.Put(reply, reused); err != nil {
		t.Fatal(err)
	}

	if n, err := l.CollectGarbage(); err != nil || n != 1 {
		t.Fatalf("CollectGarbage = %d, %v; want the expired flow removed", n, err)
	}
	var ct bpf.NATCtEntry
	if err := l.objs.EbpfwdConntrack.Lookup(expired, &ct); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("the expired flow is still there (%v)", err)
	}
	if err := l.objs.EbpfwdConntrack.Lookup(reused, &ct); err != nil {
		t.Errorf("the live flow went: %v", err)
	}
	var orig bpf.NATTuple
	if err := l.objs.EbpfwdReverse.Lookup(reply, &orig); err != nil || orig != reused {
		t.Errorf("reverse entry of the live flow = %+v, %v; want it kept, pointing to the live flow", orig, err)
	}
}

// monotonicAgo is the CLOCK_MONOTONIC timestamp d before now, or 0 (boot)
// when the machine has been up for less than d: a timestamp made by
// subtraction must not wrap around to the far future on a fresh machine.
func monotonicAgo(now uint64, d time.Duration) uint64 {
	if uint64(d) > now {
		return 0
	}
	return now - uint64(d)
}

func TestMonotonicAgo(t *testing.T) {
	tests := []struct {
		now  uint64
		d    time.Duration
		want uint64
	}{
		{now: uint64(2 * time.Hour), d: time.Hour, want: uint64(time.Hour)},
		{now: uint64(time.Minute), d: time.Hour, want: 0}, // booted a minute ago
		{now: 5, d: 5, want: 0},
	}
	for _, tt := range tests {
		if got := monotonicAgo(tt.now, tt.d); got != tt.want {
			t.Errorf("monotonicAgo(%d, %v) = %d, want %d", tt.now, tt.d, got, tt.want)
		}
	}
}
