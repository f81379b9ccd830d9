package tc

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
)

func up(index int, name string) linkState {
	return linkState{Index: index, Name: name, Up: true, Ethernet: true}
}

func attachOf(index int, name string) action {
	return action{kind: attachIface, name: name, index: index}
}

func detachOf(index int, name, reason string) action {
	return action{kind: detachIface, name: name, index: index, reason: reason}
}

func TestActionsFor(t *testing.T) {
	down := up(5, "eth1")
	down.Up = false
	gone := up(5, "eth1")
	gone.Gone = true
	tun := up(5, "tun0")
	tun.Ethernet = false
	spliceLink := up(5, "ebs0123456789ab")
	spliceLink.Splice = true
	tests := []struct {
		name     string
		attached map[int]string
		state    linkState
		want     []action
	}{
		{name: "new interface up", attached: map[int]string{}, state: up(5, "eth1"),
			want: []action{attachOf(5, "eth1")}},
		{name: "already attached", attached: map[int]string{5: "eth1"}, state: up(5, "eth1")},
		{name: "new interface down", attached: map[int]string{}, state: down},
		{name: "set down", attached: map[int]string{5: "eth1"}, state: down,
			want: []action{detachOf(5, "eth1", "down")}},
		{name: "deleted or moved away", attached: map[int]string{5: "eth1", 6: "eth2"}, state: gone,
			want: []action{detachOf(5, "eth1", "deleted or moved to another namespace")}},
		{name: "deleted, never attached", attached: map[int]string{6: "eth2"}, state: gone},
		{name: "not Ethernet", attached: map[int]string{}, state: tun},
		{name: "splice link is left to its owner", attached: map[int]string{}, state: spliceLink},
		{name: "splice link deleted is left to its owner", attached: map[int]string{}, state: func() linkState {
			s := spliceLink
			s.Gone = true
			return s
		}()},
		{name: "renamed while up", attached: map[int]string{5: "eth1"}, state: up(5, "uplink"),
			want: []action{detachOf(5, "eth1", "renamed to uplink"), attachOf(5, "uplink")}},
		{name: "renamed while down", attached: map[int]string{5: "eth1"}, state: func() linkState {
			s := down
			s.Name = "uplink"
			return s
		}(), want: []action{detachOf(5, "eth1", "renamed to uplink")}},
		{name: "name reused by a new interface", attached: map[int]string{5: "eth1"}, state: up(9, "eth1"),
			want: []action{detachOf(5, "eth1", "replaced by a new interface of that name (ifindex 9)"), attachOf(9, "eth1")}},
		{name: "late deletion of an interface whose name was reused", attached: map[int]string{9: "eth1"}, state: gone},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := maps.Clone(tt.attached)
			got := actionsFor(tt.attached, tt.state)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("actionsFor(%v, %+v)\n got  %+v\n want %+v", tt.attached, tt.state, got, tt.want)
			}
			if !maps.Equal(before, tt.attached) {
				t.Errorf("actionsFor changed its input: %v, was %v", tt.attached, before)
			}
		})
	}
}

func TestReconcileActions(t *testing.T) {
	down := up(6, "eth2")
	down.Up = false
	spliceLink := up(8, "ebs0123456789ab")
	spliceLink.Splice = true
	lo := linkState{Index: 1, Name: "lo", Up: true}
	tests := []struct {
		name     string
		attached map[int]string
		links    []linkState
		want     []action
	}{
		{name: "first listing", attached: nil, links: []linkState{lo, up(5, "eth1"), down, spliceLink, up(7, "eth3")},
			want: []action{attachOf(5, "eth1"), attachOf(7, "eth3")}},
		{name: "nothing missed", attached: map[int]string{5: "eth1"}, links: []linkState{lo, up(5, "eth1"), spliceLink}},
		{name: "missed a deletion and an addition", attached: map[int]string{5: "eth1", 6: "eth2"},
			links: []linkState{lo, up(5, "eth1"), up(7, "eth3")},
			want:  []action{detachOf(6, "eth2", "deleted or moved to another namespace"), attachOf(7, "eth3")}},
		{name: "missed a down", attached: map[int]string{5: "eth1", 6: "eth2"}, links: []linkState{up(5, "eth1"), down},
			want: []action{detachOf(6, "eth2", "down")}},
		{name: "missed a rename", attached: map[int]string{5: "eth1"}, links: []linkState{up(5, "uplink")},
			want: []action{detachOf(5, "eth1", "renamed to uplink"), attachOf(5, "uplink")}},
		{name: "missed a re-creation under the same name", attached: map[int]string{5: "eth1"}, links: []linkState{up(9, "eth1")},
			want: []action{detachOf(5, "eth1", "deleted or moved to another namespace"), attachOf(9, "eth1")}},
		// Once b has moved to 5, the attachment of b on 6 is gone
		// already: deciding 6 (now a) only attaches.
		{name: "names swapped", attached: map[int]string{5: "a", 6: "b"}, links: []linkState{up(5, "b"), up(6, "a")},
			want: []action{detachOf(5, "a", "renamed to b"),
				detachOf(6, "b", "replaced by a new interface of that name (ifindex 5)"),
				attachOf(5, "b"), attachOf(6, "a")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := reconcileActions(tt.attached, tt.links)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("reconcileActions(%v, ...)\n got  %+v\n want %+v", tt.attached, got, tt.want)
			}
		})
	}
}

// fakeLoader stands in for the loader: it keys attachments by name as the
// loader does and finds the ifindex in the namespace as Attach does.
type fakeLoader struct {
	mu       sync.Mutex
	attached map[string]int
	refuse   map[string]bool // names whose Attach fails
}

func (f *fakeLoader) Attach(ns netns.NS, ifname string) (loader.Attachment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if idx, ok := f.attached[ifname]; ok {
		return loader.Attachment{Interface: ifname, Ifindex: idx}, nil
	}
	if f.refuse[ifname] {
		return loader.Attachment{}, fmt.Errorf("attach %s: refused by the test", ifname)
	}
	var idx int
	err := ns.Do(func() error {
		l, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find interface: %w", err)
		}
		idx = l.Attrs().Index
		return nil
	})
	if err != nil {
		return loader.Attachment{}, err
	}
	f.attached[ifname] = idx
	return loader.Attachment{Interface: ifname, Ifindex: idx}, nil
}

func (f *fakeLoader) Detach(ifname string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.attached, ifname)
	return nil
}

func (f *fakeLoader) SetPeerRedirect(ifname string, on bool) (bool, error) { return false, nil }

func (f *fakeLoader) RefreshRouteHints() (int, error) { return 0, nil }

func (f *fakeLoader) names() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Sorted(maps.Keys(f.attached))
}

// waitAttached waits until the loader and the watcher both hold exactly
// want.
func waitAttached(t *testing.T, f *fakeLoader, w *ifaceWatcher, want ...string) {
	t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, held := f.names(), w.interfaces()
		if slices.Equal(got, want) && slices.Equal(held, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("attached to %v (watcher holds %v), want %v", got, held, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// gatedWatcher is a watcher whose subscriptions the test can cut, and
// whose re-subscription waits until the test opens the gate, so that
// changes can happen while no subscription exists.
type gatedWatcher struct {
	*ifaceWatcher
	mu       sync.Mutex
	current  *linkSubscription
	gate     chan struct{}
	gateOnce sync.Once
}

func newGatedWatcher(t *testing.T, ns netns.NS, l attacher) *gatedWatcher {
	g := &gatedWatcher{
		ifaceWatcher: newIfaceWatcher(ns, l, slog.New(slog.NewTextHandler(t.Output(), nil))),
		gate:         make(chan struct{}),
	}
	first := true
	g.subscribe = func() (*linkSubscription, error) {
		if !first {
			select {
			case <-g.gate:
			case <-time.After(10 * time.Second):
				return nil, errors.New("test gate never opened")
			}
		}
		first = false
		sub, err := subscribeLinks(ns)
		g.mu.Lock()
		g.current = sub
		g.mu.Unlock()
		return sub, err
	}
	t.Cleanup(g.open)
	return g
}

// cut ends the current subscription as an overrun would: its channel
// closes without the watcher being stopped.
func (g *gatedWatcher) cut() {
	g.mu.Lock()
	sub := g.current
	g.mu.Unlock()
	sub.close()
}

func (g *gatedWatcher) open() { g.gateOnce.Do(func() { close(g.gate) }) }

// addVeth adds interface name (up or not) to ns, as one end of a veth pair
// whose other end ("p" + name, or "peer" for long names) stays down there:
// Ethernet, like the interfaces the watcher is for. Deleting name deletes
// both.
func addVeth(t *testing.T, ns *topo.NS, name string, up bool) {
	t.Helper()
	peer := "p" + name
	if len(peer) > 15 {
		peer = "peer"
	}
	args := []string{"link", "add", name}
	if up {
		args = append(args, "up")
	}
	ipIn(t, ns, append(args, "type", "veth", "peer", "name", peer)...)
}

func ipIn(t *testing.T, ns *topo.NS, args ...string) {
	t.Helper()
	if err := ns.IP(args...); err != nil {
		t.Fatal(err)
	}
}

// TestIfaceWatcherFollowsNamespace runs a watcher over a real namespace:
// interfaces are attached as they come up and detached as they go down,
// are renamed or deleted; splice links and interfaces that are down are
// left alone; a failed attach is counted and not fatal; changes made
// while the subscription was lost are caught up by the re-listing; and a
// stopped watcher detaches nothing and acts no more.
func TestIfaceWatcherFollowsNamespace(t *testing.T) {
	ns, h := testutil.NewNSHandle(t, "tcw", netns.Parse)
	addVeth(t, ns, "d0", true)
	addVeth(t, ns, "idle0", false)
	addVeth(t, ns, "ebs0123456789ab", false)
	ipIn(t, ns, "link", "set", "ebs0123456789ab", "alias", "ebpfwd splice other", "up")

	f := &fakeLoader{attached: map[string]int{}, refuse: map[string]bool{"bad0": true}}
	w := newGatedWatcher(t, h, f)
	if err := w.start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			w.close()
		}
	})
	waitAttached(t, f, w.ifaceWatcher, "d0")

	addVeth(t, ns, "d1", true)
	waitAttached(t, f, w.ifaceWatcher, "d0", "d1")

	ipIn(t, ns, "link", "set", "d1", "down")
	waitAttached(t, f, w.ifaceWatcher, "d0")

	ipIn(t, ns, "link", "set", "d1", "name", "d2")
	ipIn(t, ns, "link", "set", "d2", "up")
	waitAttached(t, f, w.ifaceWatcher, "d0", "d2")

	addVeth(t, ns, "bad0", true)
	ipIn(t, ns, "link", "del", "d0")
	waitAttached(t, f, w.ifaceWatcher, "d2")
	w.mu.Lock()
	failures := w.attachFailures
	w.mu.Unlock()
	if failures == 0 {
		t.Error("the refused attach to bad0 was not counted")
	}

	// Lose the subscription, change the namespace while none exists,
	// then let the watcher re-subscribe: only the re-listing can tell.
	w.cut()
	addVeth(t, ns, "d4", true)
	ipIn(t, ns, "link", "del", "d2")
	time.Sleep(300 * time.Millisecond) // past the first backoff: the watcher waits at the gate
	w.open()
	waitAttached(t, f, w.ifaceWatcher, "d4")

	w.close()
	stopped = true
	select {
	case <-w.done:
	default:
		t.Fatal("close returned before the watcher's goroutine ended")
	}
	addVeth(t, ns, "d5", true)
	ipIn(t, ns, "link", "del", "d4")
	time.Sleep(300 * time.Millisecond)
	if got := f.names(); !slices.Equal(got, []string{"d4"}) {
		t.Fatalf("after stop: attached to %v, want [d4] (a stopped watcher neither detaches nor attaches)", got)
	}
}

// TestIfaceWatcherEndsWithNamespace: a watcher whose namespace was
// deleted while its subscription was lost ends on its own.
func TestIfaceWatcherEndsWithNamespace(t *testing.T) {
	ns, h := testutil.NewNSHandle(t, "tcw-gone", netns.Parse)
	addVeth(t, ns, "d0", true)
	f := &fakeLoader{attached: map[string]int{}}
	w := newGatedWatcher(t, h, f)
	if err := w.start(); err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Cleanup(w.close)
	waitAttached(t, f, w.ifaceWatcher, "d0")

	w.cut()
	if err := ns.Delete(); err != nil {
		t.Fatal(err)
	}
	w.open()
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher did not end after its namespace was deleted")
	}
}
