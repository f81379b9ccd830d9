package splice

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/netns"
)

// newLinks makes the splice links of instance, or of a fresh unique
// instance if it is "".
func newLinks(t *testing.T, instance string) *Links {
	t.Helper()
	if instance == "" {
		instance = testutil.UniqueName(t, "test")
	}
	s, err := NewLinks(instance, Pool{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// linkIn describes interface name in ns, or returns nil if there is none.
func linkIn(t *testing.T, ns netns.NS, name string) (attrs *netlink.LinkAttrs, addrs []string) {
	t.Helper()
	err := ns.Do(func() error {
		lnk, err := netlink.LinkByName(name)
		if _, missing := err.(netlink.LinkNotFoundError); missing {
			return nil
		}
		if err != nil {
			return err
		}
		attrs = lnk.Attrs()
		list, err := netlink.AddrList(lnk, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range list {
			if !a.IP.IsLinkLocalUnicast() || a.IP.To4() != nil {
				addrs = append(addrs, a.IPNet.String())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("look up %s in netns %s: %v", name, ns, err)
	}
	return attrs, addrs
}

func TestCreateAndDelete(t *testing.T) {
	_, a := testutil.NewNSHandle(t, "ebpfwd-splice-a", netns.Parse)
	_, b := testutil.NewNSHandle(t, "ebpfwd-splice-b", netns.Parse)
	s := newLinks(t, "")
	l, err := s.Create(a, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Name) > 15 || !strings.HasPrefix(l.Name, NamePrefix) {
		t.Errorf("name %q: want %s... of at most 15 characters", l.Name, NamePrefix)
	}
	for _, tt := range []struct {
		end       End
		ns        netns.NS
		wantAddrs []string
	}{
		{l.Listen, a, []string{"169.254.200.1/30", "fd65:6270:6677::1/126"}},
		{l.Out, b, []string{"169.254.200.2/30", "fd65:6270:6677::2/126"}},
	} {
		attrs, addrs := linkIn(t, tt.ns, l.Name)
		if attrs == nil {
			t.Fatalf("no %s in netns %s", l.Name, tt.ns)
		}
		if attrs.Alias != "ebpfwd splice "+s.instance || attrs.Flags&net.FlagUp == 0 {
			t.Errorf("%s in %s: alias %q, flags %v; want this instance's alias and up", l.Name, tt.ns, attrs.Alias, attrs.Flags)
		}
		if attrs.Index != tt.end.Ifindex || !bytes.Equal(attrs.HardwareAddr, tt.end.MAC) {
			t.Errorf("%s in %s: ifindex %d MAC %s, Link says %d %s", l.Name, tt.ns, attrs.Index, attrs.HardwareAddr, tt.end.Ifindex, tt.end.MAC)
		}
		if !equalSets(addrs, tt.wantAddrs) {
			t.Errorf("%s in %s: addresses %v, want %v", l.Name, tt.ns, addrs, tt.wantAddrs)
		}
	}
	// Each end knows the other's MAC for good: nothing on the link waits
	// on ARP or neighbour discovery.
	requirePermanentNeighbours(t, l)
	if got, err := l.Addr(netip.MustParseAddr("10.0.1.11")); err != nil || got != netip.MustParseAddr("169.254.200.1") {
		t.Errorf("Addr(IPv4 node) = %s, %v", got, err)
	}
	if got, err := l.Addr(netip.MustParseAddr("fd00::11")); err != nil || got != netip.MustParseAddr("fd65:6270:6677::1") {
		t.Errorf("Addr(IPv6 node) = %s, %v", got, err)
	}

	// The link carries traffic both ways at once, over both IP versions.
	for _, addr := range []string{"169.254.200.2:7000", "[fd65:6270:6677::2]:7000"} {
		exchangeOver(t, a, b, addr)
	}

	if err := s.Delete(l); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []netns.NS{a, b} {
		if attrs, _ := linkIn(t, ns, l.Name); attrs != nil {
			t.Errorf("%s still in netns %s after Delete", l.Name, ns)
		}
	}
	// Deleting what is gone is fine (the namespace may have taken it).
	if err := s.Delete(l); err != nil {
		t.Errorf("second Delete: %v", err)
	}
}

// requirePermanentNeighbours checks that each end of l has a permanent
// neighbour entry for each of the other end's addresses, with its MAC.
func requirePermanentNeighbours(t *testing.T, l *Link) {
	t.Helper()
	for _, e := range []struct{ at, peer End }{{l.Listen, l.Out}, {l.Out, l.Listen}} {
		var neighs []netlink.Neigh
		err := e.at.NS.Do(func() (err error) {
			neighs, err = netlink.NeighList(e.at.Ifindex, netlink.FAMILY_ALL)
			return err
		})
		if err != nil {
			t.Fatalf("neighbours of %s in %s: %v", l.Name, e.at.NS, err)
		}
		for _, want := range []netip.Addr{e.peer.Addr4, e.peer.Addr6} {
			found := false
			for _, n := range neighs {
				if ip, _ := netip.AddrFromSlice(n.IP); ip.Unmap() == want {
					found = n.State == netlink.NUD_PERMANENT && bytes.Equal(n.HardwareAddr, e.peer.MAC)
					if !found {
						t.Errorf("%s in %s: neighbour %s is %s state %#x, want %s permanent", l.Name, e.at.NS, want, n.HardwareAddr, n.State, e.peer.MAC)
					}
					break
				}
			}
			if !found {
				t.Errorf("%s in %s: no permanent neighbour entry for the peer's %s (entries %v)", l.Name, e.at.NS, want, neighs)
			}
		}
	}
}

// exchangeOver listens at addr in b, dials it from a and echoes a line.
func exchangeOver(t *testing.T, a, b netns.NS, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ln, err := b.Listen(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("listen %s in %s: %v", addr, b, err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	c, err := a.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s from %s over the splice link: %v", addr, a, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	want := []byte("over the splice link\n")
	if _, err := c.Write(want); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("echo over %s: %q, %v", addr, got, err)
	}
}

func TestSubnetsAndNamesPerPair(t *testing.T) {
	_, a := testutil.NewNSHandle(t, "ebpfwd-splice-a", netns.Parse)
	_, b := testutil.NewNSHandle(t, "ebpfwd-splice-b", netns.Parse)
	_, c := testutil.NewNSHandle(t, "ebpfwd-splice-c", netns.Parse)
	s := newLinks(t, "")
	ab, err := s.Create(a, b)
	if err != nil {
		t.Fatal(err)
	}
	// a already has slot 0: the second link from it takes slot 1.
	ac, err := s.Create(a, c)
	if err != nil {
		t.Fatal(err)
	}
	if ab.Name == ac.Name {
		t.Fatalf("two pairs share the name %s", ab.Name)
	}
	if ac.Listen.Addr4 != netip.MustParseAddr("169.254.200.5") || ac.Out.Addr4 != netip.MustParseAddr("169.254.200.6") {
		t.Errorf("second link %s <-> %s, want slot 1 (169.254.200.5, .6)", ac.Listen.Addr4, ac.Out.Addr4)
	}
	// Another instance sharing the namespaces keeps clear of both.
	other := newLinks(t, "")
	ab2, err := other.Create(a, b)
	if err != nil {
		t.Fatal(err)
	}
	if ab2.Name == ab.Name || ab2.Listen.Addr4 != netip.MustParseAddr("169.254.200.9") {
		t.Errorf("other instance's link %s at %s, want its own name and slot 2", ab2.Name, ab2.Listen.Addr4)
	}
	if _, err := s.Create(a, b); err == nil {
		t.Error("a second link for the same pair was created")
	}
	for _, del := range []struct {
		s *Links
		l *Link
	}{{s, ab}, {s, ac}, {other, ab2}} {
		if err := del.s.Delete(del.l); err != nil {
			t.Error(err)
		}
	}
}

// TestRestartAdoptsAndRemovesUnused: the next run of an instance adopts
// the link of a pair it needs again (same interface, so flows over it keep
// going), and RemoveUnused deletes the instance's other leftovers but not
// another instance's links.
func TestRestartAdoptsAndRemovesUnused(t *testing.T) {
	_, a := testutil.NewNSHandle(t, "ebpfwd-splice-a", netns.Parse)
	_, b := testutil.NewNSHandle(t, "ebpfwd-splice-b", netns.Parse)
	_, c := testutil.NewNSHandle(t, "ebpfwd-splice-c", netns.Parse)
	crashed := newLinks(t, "")
	stale, err := crashed.Create(a, b)
	if err != nil {
		t.Fatal(err)
	}
	staleOther, err := crashed.Create(a, c) // a pair the next run does not use
	if err != nil {
		t.Fatal(err)
	}
	foreign := newLinks(t, "")
	kept, err := foreign.Create(a, b)
	if err != nil {
		t.Fatal(err)
	}

	// A run before links had permanent neighbours left none: the
	// adopting run adds them.
	for _, e := range []struct{ at, peer End }{{stale.Listen, stale.Out}, {stale.Out, stale.Listen}} {
		err := e.at.NS.Do(func() error {
			for _, addr := range []netip.Addr{e.peer.Addr4, e.peer.Addr6} {
				if err := netlink.NeighDel(&netlink.Neigh{LinkIndex: e.at.Ifindex, IP: net.IP(addr.AsSlice())}); err != nil {
					return fmt.Errorf("delete neighbour %s: %w", addr, err)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}

	// The next run of the same instance knows nothing of the old links.
	restarted := newLinks(t, crashed.instance)
	adopted, err := restarted.Create(a, b)
	if err != nil {
		t.Fatalf("Create over a previous run's link: %v", err)
	}
	requirePermanentNeighbours(t, adopted)
	if adopted.Name != stale.Name || adopted.Listen.Ifindex != stale.Listen.Ifindex || adopted.Out.Ifindex != stale.Out.Ifindex ||
		adopted.Listen.Addr4 != stale.Listen.Addr4 || adopted.Out.Addr4 != stale.Out.Addr4 ||
		adopted.Listen.Addr6 != stale.Listen.Addr6 || adopted.Out.Addr6 != stale.Out.Addr6 ||
		!bytes.Equal(adopted.Listen.MAC, stale.Listen.MAC) || !bytes.Equal(adopted.Out.MAC, stale.Out.MAC) {
		t.Errorf("adopted link %+v, want the previous run's %+v", adopted, stale)
	}
	// Nothing is removed before RemoveUnused: the stale pair may still be
	// needed by a service set up later.
	if attrs, _ := linkIn(t, a, staleOther.Name); attrs == nil {
		t.Fatalf("link %s removed before RemoveUnused", staleOther.Name)
	}
	if err := restarted.RemoveUnused(a); err != nil {
		t.Fatal(err)
	}
	if attrs, _ := linkIn(t, a, staleOther.Name); attrs != nil {
		t.Errorf("stale link %s survived RemoveUnused", staleOther.Name)
	}
	if attrs, _ := linkIn(t, a, adopted.Name); attrs == nil || attrs.Index != adopted.Listen.Ifindex {
		t.Errorf("the adopted link is gone from netns %s", a)
	}
	if attrs, _ := linkIn(t, a, kept.Name); attrs == nil {
		t.Errorf("another instance's link %s was removed", kept.Name)
	}
	exchangeOver(t, a, b, netip.AddrPortFrom(adopted.Out.Addr4, 9400).String())
	if err := restarted.Delete(adopted); err != nil {
		t.Error(err)
	}
	if err := foreign.Delete(kept); err != nil {
		t.Error(err)
	}
}

// TestRestartReplacesBrokenLink: a leftover link that is not as Create
// makes it is deleted and built anew, never adopted.
func TestRestartReplacesBrokenLink(t *testing.T) {
	testutil.RequireRoot(t)
	tests := []struct {
		name   string
		damage func(t *testing.T, l *Link)
	}{
		{"listen end down", func(t *testing.T, l *Link) {
			t.Helper()
			mustDo(t, l.Listen.NS, func() error {
				lnk, err := netlink.LinkByName(l.Name)
				if err != nil {
					return err
				}
				return netlink.LinkSetDown(lnk)
			})
		}},
		{"out end lost its address", func(t *testing.T, l *Link) {
			t.Helper()
			mustDo(t, l.Out.NS, func() error {
				lnk, err := netlink.LinkByName(l.Name)
				if err != nil {
					return err
				}
				addr, err := netlink.ParseAddr(netip.PrefixFrom(l.Out.Addr4, subnetBits4).String())
				if err != nil {
					return err
				}
				return netlink.AddrDel(lnk, addr)
			})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, a := testutil.NewNSHandle(t, "ebpfwd-splice-a", netns.Parse)
			_, b := testutil.NewNSHandle(t, "ebpfwd-splice-b", netns.Parse)
			first := newLinks(t, "")
			old, err := first.Create(a, b)
			if err != nil {
				t.Fatal(err)
			}
			tt.damage(t, old)
			next := newLinks(t, first.instance)
			fresh, err := next.Create(a, b)
			if err != nil {
				t.Fatalf("Create over a broken link: %v", err)
			}
			if fresh.Listen.Ifindex == old.Listen.Ifindex && bytes.Equal(fresh.Listen.MAC, old.Listen.MAC) {
				t.Errorf("the broken link was adopted: %+v", fresh)
			}
			exchangeOver(t, a, b, netip.AddrPortFrom(fresh.Out.Addr4, 9401).String())
			if err := next.Delete(fresh); err != nil {
				t.Error(err)
			}
		})
	}
}

func mustDo(t *testing.T, ns netns.NS, f func() error) {
	t.Helper()
	if err := ns.Do(f); err != nil {
		t.Fatalf("in netns %s: %v", ns, err)
	}
}

func equalSets(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[string]int{}
	for _, s := range a {
		seen[s]++
	}
	for _, s := range b {
		seen[s]--
	}
	for _, n := range seen {
		if n != 0 {
			return false
		}
	}
	return true
}
