package loader

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/netns"
)

func TestNetnsDirRoundTrip(t *testing.T) {
	for _, id := range []netns.ID{{}, {Dev: 4, Ino: 4026531833}, {Dev: 1<<64 - 1, Ino: 1<<64 - 1}} {
		dir := NetnsDir(id)
		if dir != filepath.Base(dir) || dir == "." || dir == ".." {
			t.Errorf("NetnsDir(%v) = %q: not a single path element", id, dir)
		}
		got, ok := netnsOfDir(dir)
		if !ok || got != id {
			t.Errorf("netnsOfDir(NetnsDir(%v) = %q) = %v, %v", id, dir, got, ok)
		}
	}
	// Names NetnsDir never makes are not namespace directories: the
	// layout before identities (own, ns-<spec>) among them.
	for _, name := range []string{"", "own", "gw", "ns-", "ns-ns1", "ns-1", "ns-1-", "ns-a-b", "ns-1-2-3", "ns-01-2", "link_g0_3", "ebpfwd_services"} {
		if id, ok := netnsOfDir(name); ok {
			t.Errorf("netnsOfDir(%q) = %v, true; want not a namespace directory", name, id)
		}
	}
}

// legacyFilterIDs lists the programs of the cls_bpf filters at our
// priority on ifname's ingress in ns.
func legacyFilterIDs(t *testing.T, ns netns.NS, ifname string) []int {
	t.Helper()
	var ids []int
	err := ns.Do(func() error {
		lnk, err := netlink.LinkByName(ifname)
		if err != nil {
			return err
		}
		filters, err := netlink.FilterList(lnk, netlink.HANDLE_MIN_INGRESS)
		if err != nil {
			return err
		}
		for _, f := range filters {
			if bf, ok := f.(*netlink.BpfFilter); ok && bf.Priority == legacyFilterPriority {
				ids = append(ids, bf.Id)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("list filters of %s: %v", ifname, err)
	}
	return ids
}

// attachedPrograms lists the program IDs attached at ifname's ingress in
// the given mode.
func attachedPrograms(t *testing.T, ns netns.NS, ifname string, mode AttachMode) []ebpf.ProgramID {
	t.Helper()
	if mode == AttachTCX {
		return tcxProgramIDs(t, ns, ifname)
	}
	var ids []ebpf.ProgramID
	for _, id := range legacyFilterIDs(t, ns, ifname) {
		ids = append(ids, ebpf.ProgramID(id))
	}
	return ids
}

// TestPruneNamespaces: a run that crashed while serving a namespace the
// next configuration drops leaves its program translating there; the next
// run's PruneNamespaces detaches it (tcx links and cls_bpf filters alike)
// and removes its pins, and leaves alone the namespaces this run serves
// and those another process holds.
func TestPruneNamespaces(t *testing.T) {
	testutil.RequireRoot(t)
	for _, mode := range []struct {
		name   string
		attach AttachMode
	}{{"tcx", AttachTCX}, {"legacy tc", AttachLegacy}} {
		t.Run(mode.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			tp := newGatewayTopology(t)
			instance := testutil.UniqueName(t, "test")
			t.Cleanup(func() { os.RemoveAll(Config{Instance: instance}.instanceDir()) }) // if the test failed half way
			crashed, err := Load(Config{Instance: instance, Netns: tp.gateway, Attach: mode.attach})
			if err != nil {
				t.Fatal(err)
			}
			for _, ifname := range []string{"g0", "g1"} {
				if _, err := crashed.Attach(tp.gateway, ifname); err != nil {
					t.Fatal(err)
				}
			}
			vip := netip.MustParseAddrPort("10.20.1.1:8000")
			node := netip.MustParseAddrPort("10.20.2.2:9000")
			if _, err := crashed.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}}); err != nil {
				t.Fatal(err)
			}
			tp.serveEcho(ctx, t, node)
			c := tp.dial(ctx, t, vip)
			echoRound(t, c, "through the run that will crash")
			c.Close()
			// A crash: the process is gone, its lock with it, and the
			// kernel keeps what it attached and pinned.
			if err := crashed.Release(); err != nil {
				t.Fatal(err)
			}

			// The next run serves its own namespace only, and another
			// process holds a third namespace's directory.
			served, err := Load(Config{Instance: instance})
			if err != nil {
				t.Fatal(err)
			}
			defer served.Close()
			_, heldElsewhere := testutil.NewNSHandle(t, "held", netns.Parse)
			busy, err := Load(Config{Instance: instance, Netns: heldElsewhere})
			if err != nil {
				t.Fatal(err)
			}
			defer busy.Close()

			own, err := netns.NS{}.ID()
			if err != nil {
				t.Fatal(err)
			}
			pruned, err := PruneNamespaces(Config{Instance: instance}, []netns.ID{own})
			if err != nil {
				t.Fatalf("PruneNamespaces: %v", err)
			}
			if len(pruned) != 1 || pruned[0].Spec() != tp.gateway.Spec() {
				t.Errorf("pruned %v, want only the dropped namespace %s", pruned, tp.gateway)
			}
			for _, ifname := range []string{"g0", "g1"} {
				if ids := attachedPrograms(t, tp.gateway, ifname, mode.attach); len(ids) != 0 {
					t.Errorf("programs %v still attached to %s after pruning", ids, ifname)
				}
			}
			if _, err := os.Stat(Config{Instance: instance, Netns: tp.gateway}.pinDir()); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("pins of the dropped namespace still there (stat: %v)", err)
			}
			for _, l := range []*Loader{served, busy} {
				if _, err := os.Stat(l.PinDir()); err != nil {
					t.Errorf("pins of %s went: %v", l.PinDir(), err)
				}
			}
			// Nothing translates the service address any more: the
			// gateway's stack answers it, and nothing listens there.
			dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
			defer dcancel()
			if c, err := tp.client.Dial(dctx, "tcp", vip.String()); err == nil {
				c.Close()
				t.Error("the pruned namespace still forwards the dropped service")
			}
		})
	}
}

// TestLegacyReleaseAndTakeOver is TestReleaseAndTakeOver for the cls_bpf
// attachment: filters cannot be pinned, so a restart relies on the filter
// staying on its interface and the next run replacing it in place.
func TestLegacyReleaseAndTakeOver(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tp := newGatewayTopology(t)
	instance := testutil.UniqueName(t, "test")
	t.Cleanup(func() { os.RemoveAll(Config{Instance: instance}.instanceDir()) })
	cfg := Config{Instance: instance, Attach: AttachLegacy}

	first, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := first.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	vip := netip.MustParseAddrPort("10.20.1.1:8000")
	node := netip.MustParseAddrPort("10.20.2.2:9000")
	id, err := first.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}})
	if err != nil {
		t.Fatal(err)
	}
	tp.serveEcho(ctx, t, node)
	c := tp.dial(ctx, t, vip)
	echoRound(t, c, "before release")
	oldProgram := programID(t, first)
	if err := first.Release(); err != nil {
		t.Fatal(err)
	}
	echoRound(t, c, "with no Loader")

	next, err := Load(cfg)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			next.Close()
		}
	})
	if !next.Reused() {
		t.Error("Load did not reuse the pinned maps")
	}
	newProgram := programID(t, next)
	if newProgram == oldProgram {
		t.Fatal("the next run loaded no program of its own")
	}
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := next.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
		// Replaced in place: one filter, the new program's.
		if ids := legacyFilterIDs(t, tp.gateway, ifname); !slices.Equal(ids, []int{int(newProgram)}) {
			t.Errorf("filters on %s after the restart: programs %v, want only the new one %d", ifname, ids, newProgram)
		}
	}
	if gotID, err := next.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}}); err != nil || gotID != id {
		t.Errorf("PutService after restart = %d, %v; want the same ID %d", gotID, err, id)
	}
	echoRound(t, c, "after the restart")

	closed = true
	if err := next.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	for _, ifname := range []string{"g0", "g1"} {
		if ids := legacyFilterIDs(t, tp.gateway, ifname); len(ids) != 0 {
			t.Errorf("filters %v left on %s after Close", ids, ifname)
		}
	}
	if _, err := os.Stat(Config{Instance: instance}.instanceDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("instance pin directory still there after Close (stat: %v)", err)
	}
}
