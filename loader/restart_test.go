package loader

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ebpfwd/ebpfwd/bpf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/netns"
)

// echoRound writes a random chunk on c and reads it back from the echo
// server: the flow works end to end.
func echoRound(t *testing.T, c net.Conn, what string) {
	t.Helper()
	want := make([]byte, 16<<10)
	if _, err := rand.Read(want); err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(want); err != nil {
		t.Fatalf("%s: write: %v", what, err)
	}
	got := make([]byte, len(want))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("%s: echo: %v (equal %v)", what, err, bytes.Equal(got, want))
	}
}

// tcxProgramIDs lists the tcx ingress programs on ifname in ns.
func tcxProgramIDs(t *testing.T, ns netns.NS, ifname string) []ebpf.ProgramID {
	t.Helper()
	idx, _ := interfaceIn(t, ns, ifname)
	var ids []ebpf.ProgramID
	err := ns.Do(func() error {
		res, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		for _, p := range res.Programs {
			ids = append(ids, p.ID)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs on %s: %v", ifname, err)
	}
	return ids
}

func programID(t *testing.T, l *Loader) ebpf.ProgramID {
	t.Helper()
	info, err := l.objs.EbpfwdNat.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, ok := info.ID()
	if !ok {
		t.Fatal("program has no ID")
	}
	return id
}

// TestReleaseAndTakeOver is a restart at the loader's level: Release
// leaves the program attached and the maps pinned, a flow keeps going
// with no Loader at all, and the next Load reuses the maps, adopts the
// links with its own program, keeps the service's ID, and prunes the
// service and the interface the next run does not have.
func TestReleaseAndTakeOver(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tp := newGatewayTopology(t)
	// A third interface that the next run will not attach to.
	testutil.Veth(t, tp.gatewayNS, "g2", "10.20.3.1/24", testutil.NewNS(t, "ebpfwd-tcx"), "x0", "10.20.3.2/24")

	instance := testutil.UniqueName(t, "test")
	pinDir := Config{Instance: instance}.pinDir()
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(pinDir)) }) // only if the test failed half way
	first, err := Load(Config{Instance: instance, Attach: AttachTCX})
	if err != nil {
		t.Fatal(err)
	}
	if first.Reused() {
		t.Fatal("a first Load reports reused maps")
	}
	for _, ifname := range []string{"g0", "g1", "g2"} {
		if _, err := first.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
	}
	vip := netip.MustParseAddrPort("10.20.1.1:8000")
	dropped := netip.MustParseAddrPort("10.20.1.1:8001")
	node := netip.MustParseAddrPort("10.20.2.2:9000")
	// Two nodes, of which the next run keeps one: the second slot goes.
	id, err := first.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}, {Addr: node}}})
	if err != nil {
		t.Fatal(err)
	}
	droppedID, err := first.PutService(Service{Network: "tcp", VIP: dropped, Nodes: []Node{{Addr: node}}})
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
	for _, ifname := range []string{"g0", "g1", "g2"} {
		if ids := tcxProgramIDs(t, tp.gateway, ifname); !slices.Equal(ids, []ebpf.ProgramID{oldProgram}) {
			t.Fatalf("programs on %s after Release: %v, want the old one %d", ifname, ids, oldProgram)
		}
	}
	echoRound(t, c, "with no Loader")

	next, err := Load(Config{Instance: instance, Attach: AttachTCX})
	if err != nil {
		t.Fatalf("Load over a released instance: %v", err)
	}
	t.Cleanup(func() {
		if err := next.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin directory %s still there after Close (stat: %v)", pinDir, err)
		}
	})
	if !next.Reused() {
		t.Error("Load did not reuse the pinned maps")
	}
	newProgram := programID(t, next)
	for _, ifname := range []string{"g0", "g1"} {
		if _, err := next.Attach(tp.gateway, ifname); err != nil {
			t.Fatal(err)
		}
		// Adopted and updated: still one program, and it is ours.
		if ids := tcxProgramIDs(t, tp.gateway, ifname); !slices.Equal(ids, []ebpf.ProgramID{newProgram}) {
			t.Errorf("programs on %s after adoption: %v, want only the new one %d", ifname, ids, newProgram)
		}
	}
	echoRound(t, c, "after the links were adopted")
	gotID, err := next.PutService(Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: node}}})
	if err != nil {
		t.Fatal(err)
	}
	if gotID != id {
		t.Errorf("the service got ID %d in the next run, was %d: its flows and counters would be orphaned", gotID, id)
	}

	if n, err := next.PruneServices([]ServiceID{gotID}); err != nil || n != 1 {
		t.Errorf("PruneServices = %d, %v; want the dropped service", n, err)
	}
	var svc bpf.NATService
	if err := next.objs.EbpfwdServices.Lookup(bpf.NATServiceKey{Addr: bpf.Addr(dropped.Addr()), Port: bpf.Port(dropped.Port()),
		Proto: protoTCP, Family: bpf.Family(dropped.Addr())}, &svc); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("the dropped service is still in the map (%+v, %v)", svc, err)
	}
	var n bpf.NATNode
	for _, k := range []bpf.NATNodeKey{{ServiceId: uint32(droppedID)}, {ServiceId: uint32(id), Index: 1}} {
		if err := next.objs.EbpfwdNodes.Lookup(k, &n); !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Errorf("node slot %+v survived pruning (%v)", k, err)
		}
	}
	if err := next.objs.EbpfwdNodes.Lookup(bpf.NATNodeKey{ServiceId: uint32(id)}, &n); err != nil {
		t.Errorf("the kept service's node is gone: %v", err)
	}

	if removed, err := next.PruneLinks(); err != nil || removed != 1 {
		t.Errorf("PruneLinks = %d, %v; want g2's link removed", removed, err)
	}
	if ids := tcxProgramIDs(t, tp.gateway, "g2"); len(ids) != 0 {
		t.Errorf("programs %v left on g2, which the next run does not use", ids)
	}
	g2, _ := interfaceIn(t, tp.gateway, "g2")
	var flags uint32
	if err := next.objs.EbpfwdIfaces.Lookup(uint32(g2), &flags); !errors.Is(err, ebpf.ErrKeyNotExist) {
		t.Errorf("ifaces map still has g2 (%v)", err)
	}

	echoRound(t, c, "after pruning")
	conns, err := next.Conns()
	if err != nil {
		t.Fatal(err)
	}
	if len(conns) != 1 || conns[0].Service != id || conns[0].State != TCPEstablished || conns[0].Client.String() != c.LocalAddr().String() {
		t.Errorf("Conns() = %+v, want the one established flow of service %d from %s", conns, id, c.LocalAddr())
	}
}

// TestIncompatiblePinsWiped: maps pinned by a program whose maps had
// another shape cannot be reused; Load removes every pin of the instance
// (links included) and starts fresh.
func TestIncompatiblePinsWiped(t *testing.T) {
	testutil.RequireRoot(t)
	instance := testutil.UniqueName(t, "test")
	pinDir := Config{Instance: instance}.pinDir()
	if err := os.MkdirAll(pinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(pinDir)) })
	old, err := ebpf.NewMap(&ebpf.MapSpec{Name: "ebpfwd_services", Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := old.Pin(filepath.Join(pinDir, "ebpfwd_services")); err != nil {
		t.Fatal(err)
	}
	oldInfo, err := old.Info()
	if err != nil {
		t.Fatal(err)
	}
	oldID, _ := oldInfo.ID()
	// A link pin of the old run, which must go with the maps.
	staleLink := filepath.Join(pinDir, linkPinName("gone", 99))
	if err := os.Mkdir(staleLink, 0o700); err != nil {
		t.Fatal(err)
	}

	l, err := Load(Config{Instance: instance})
	if err != nil {
		t.Fatalf("Load over incompatible pins: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	if l.Reused() {
		t.Error("Load reports reused maps over incompatible pins")
	}
	info, err := l.objs.EbpfwdServices.Info()
	if err != nil {
		t.Fatal(err)
	}
	if id, _ := info.ID(); id == oldID {
		t.Error("Load kept the incompatible map")
	}
	pinned, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, "ebpfwd_services"), nil)
	if err != nil {
		t.Fatalf("the new services map is not pinned: %v", err)
	}
	defer pinned.Close()
	if pinned.KeySize() == 4 {
		t.Error("the pin still holds the incompatible map")
	}
	if _, err := os.Stat(staleLink); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale link pin survived the wipe (stat: %v)", err)
	}
}

// TestUnknownPinEntriesRemoved: Load keeps a previous run's map and link
// pins but removes anything else in the directory.
func TestUnknownPinEntriesRemoved(t *testing.T) {
	testutil.RequireRoot(t)
	instance := testutil.UniqueName(t, "test")
	pinDir := Config{Instance: instance}.pinDir()
	first, err := Load(Config{Instance: instance})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(pinDir)) })
	if err := first.Release(); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(pinDir, "leftover"), 0o700); err != nil {
		t.Fatal(err)
	}
	next, err := Load(Config{Instance: instance})
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	entries, err := os.ReadDir(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !isMapPin(e.Name()) {
			t.Errorf("entry %s in the pin directory after Load", e.Name())
		}
	}
	if !next.Reused() {
		t.Error("Load did not reuse the released maps")
	}
}

// TestLinkPinNameHasNoDot: bpffs refuses dotted names, and interfaces such
// as eth0.100 or the seeds' veth15.1 have dots; two interfaces never share
// a pin name.
func TestLinkPinNameHasNoDot(t *testing.T) {
	names := map[string]bool{}
	for _, tt := range []struct {
		ifname  string
		ifindex int
	}{{"eth0.100", 2}, {"eth0-100", 3}, {"veth15.1", 4}, {"eth0", 5}} {
		name := linkPinName(tt.ifname, tt.ifindex)
		if strings.Contains(name, ".") || !isLinkPin(name) {
			t.Errorf("linkPinName(%q, %d) = %q: a dot, or not a link pin", tt.ifname, tt.ifindex, name)
		}
		if names[name] {
			t.Errorf("linkPinName(%q, %d) = %q twice", tt.ifname, tt.ifindex, name)
		}
		names[name] = true
	}
}
