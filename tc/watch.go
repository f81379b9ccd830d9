package tc

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// The NAT program must be on every interface where clients' packets or the
// nodes' replies arrive. On a container host or in a lab, veths come and go
// while the daemon runs, so a listen namespace's set of interfaces is
// followed, not read once: an ifaceWatcher per namespace subscribes to the
// namespace's link notifications and attaches the program to an Ethernet
// interface when it comes up, and detaches it when the interface goes down,
// is deleted or moves to another namespace, so the loader forgets its
// ifindex and removes its link pin.

const (
	// watchStopTimeout bounds how long stopping a watcher waits for its
	// goroutine (and for a dead subscription's reader to drain).
	watchStopTimeout = 5 * time.Second
	// resubscribeMin and resubscribeMax bound the pause before the
	// watcher re-subscribes after it lost its subscription; the pause
	// doubles while re-subscribing keeps failing.
	resubscribeMin = 100 * time.Millisecond
	resubscribeMax = 5 * time.Second
	// watchRcvBuf is the receive buffer asked for the notification
	// socket (the kernel caps it at net.core.rmem_max): a burst of
	// interfaces, such as many containers starting at once, overruns the
	// default sooner. An overrun is survived anyway (re-subscribe and
	// re-list), this only makes it rarer.
	watchRcvBuf = 1 << 20
	// watchQueue is how many notifications may wait for the watcher.
	watchQueue = 64
)

// attacher is what the watcher needs of a *loader.Loader.
type attacher interface {
	Attach(ns netns.NS, ifname string) (loader.Attachment, error)
	Detach(ifname string) error
	SetPeerRedirect(ifname string, on bool) (bool, error)
	RefreshRouteHints() (int, error)
}

// linkState is what decides whether an interface carries the program, as a
// notification or a listing reports it.
type linkState struct {
	Index    int
	Name     string
	Gone     bool // deleted, or moved to another namespace (RTM_DELLINK)
	Up       bool // administratively up
	Ethernet bool // the program parses an Ethernet header at offset 0
	Splice   bool // a splice link: its owner attaches to it, never the watcher
	// PeerElsewhere: a veth whose peer is in another namespace.
	PeerElsewhere bool
}

func linkStateOf(lnk netlink.Link) linkState {
	attrs := lnk.Attrs()
	return linkState{
		PeerElsewhere: loader.PeerElsewhere(lnk),
		Index:         attrs.Index,
		Name:          attrs.Name,
		Up:            attrs.Flags&net.FlagUp != 0,
		Ethernet:      attrs.EncapType == "ether",
		// One of another instance is no place for our clients, and one
		// a crashed run of ours left is about to go.
		Splice: splice.IsSpliceLink(attrs),
	}
}

// wanted reports whether the program belongs on the interface.
func (s linkState) wanted() bool { return !s.Gone && s.Up && s.Ethernet && !s.Splice }

// whyNot says why an attached interface loses the program, for the log.
func (s linkState) whyNot(attachedName string) string {
	switch {
	case s.Gone:
		return "deleted or moved to another namespace"
	case s.Name != attachedName:
		return "renamed to " + s.Name
	case !s.Up:
		return "down"
	}
	return "not Ethernet"
}

type actionKind int

const (
	attachIface actionKind = iota + 1
	detachIface
)

// action is one Attach or Detach the watcher decided on.
type action struct {
	kind   actionKind
	name   string
	index  int
	reason string // why a detach, for the log
}

// actionsFor decides what one link's state asks of the watcher, given the
// attachments it holds (ifindex -> name).
//
// The loader keys attachments by name, while the kernel identifies an
// interface by its index and lets its name change, so both are compared: a
// rename is a detach of the old name and an attach of the new one, and an
// attachment of the same name on another index (an interface deleted and
// re-created whose deletion was not seen) is detached first, or Attach
// would take it for the new interface. A notification about an index the
// watcher holds under another name than the interface still has never
// detaches what it holds under that name for another index.
func actionsFor(attached map[int]string, s linkState) []action {
	if s.Splice {
		// Their owner (acquireSplice) attaches and detaches them.
		return nil
	}
	var out []action
	if name, ok := attached[s.Index]; ok {
		if s.wanted() && name == s.Name {
			return nil
		}
		out = append(out, action{kind: detachIface, name: name, index: s.Index, reason: s.whyNot(name)})
	}
	if !s.wanted() {
		return out
	}
	for _, idx := range slices.Sorted(maps.Keys(attached)) {
		if attached[idx] == s.Name && idx != s.Index {
			out = append(out, action{kind: detachIface, name: s.Name, index: idx,
				reason: fmt.Sprintf("replaced by a new interface of that name (ifindex %d)", s.Index)})
		}
	}
	return append(out, action{kind: attachIface, name: s.Name, index: s.Index})
}

// reconcileActions compares the attachments held (ifindex -> name) with a
// complete listing of the namespace's links, as after the watcher missed
// notifications: an attached interface missing from the listing is gone,
// every other one is decided as its notification would be.
func reconcileActions(attached map[int]string, links []linkState) []action {
	held := map[int]string{}
	maps.Copy(held, attached)
	listed := map[int]bool{}
	for _, s := range links {
		listed[s.Index] = true
	}
	var out []action
	// The plan assumes every action succeeds; a failed attach is simply
	// not recorded when the plan is applied.
	follow := func(s linkState) {
		for _, a := range actionsFor(held, s) {
			if a.kind == attachIface {
				held[a.index] = a.name
			} else {
				delete(held, a.index)
			}
			out = append(out, a)
		}
	}
	for _, idx := range slices.Sorted(maps.Keys(attached)) {
		if !listed[idx] {
			follow(linkState{Index: idx, Name: attached[idx], Gone: true})
		}
	}
	for _, s := range links {
		follow(s)
	}
	return out
}

// linkSubscription is one netlink socket subscribed to a namespace's link
// notifications.
type linkSubscription struct {
	updates chan netlink.LinkUpdate
	done    chan struct{}
	once    sync.Once

	mu  sync.Mutex
	err error // the last error its reader reported
}

// subscribeLinks subscribes to the link notifications of ns. The socket is
// created inside the namespace, which binds it there for its life.
func subscribeLinks(ns netns.NS) (*linkSubscription, error) {
	s := &linkSubscription{updates: make(chan netlink.LinkUpdate, watchQueue), done: make(chan struct{})}
	err := ns.Do(func() error {
		return netlink.LinkSubscribeWithOptions(s.updates, s.done, netlink.LinkSubscribeOptions{
			ErrorCallback:     s.setErr,
			ReceiveBufferSize: watchRcvBuf,
		})
	})
	if err != nil {
		s.once.Do(func() { close(s.done) })
		return nil, fmt.Errorf("subscribe to link notifications in netns %s: %w", ns, err)
	}
	return s, nil
}

func (s *linkSubscription) setErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.err = err
}

func (s *linkSubscription) lastErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// close closes the socket and waits (bounded) for its reader to end.
func (s *linkSubscription) close() {
	s.once.Do(func() { close(s.done) })
	// The reader sends every notification it had read before it sees the
	// socket closed; it ends (closing updates) only once they are taken.
	timeout := time.NewTimer(watchStopTimeout)
	defer timeout.Stop()
	for {
		select {
		case _, ok := <-s.updates:
			if !ok {
				return
			}
		case <-timeout.C:
			return
		}
	}
}

// ifaceWatcher keeps the program attached to the Ethernet interfaces that
// are up in one namespace, as they appear, change and disappear. It never
// touches splice links. Stopping it detaches nothing: the loader's Close
// (a full stop) detaches every interface, its Release (restart in place)
// keeps every attachment for the next run.
type ifaceWatcher struct {
	ns  netns.NS
	l   attacher
	log *slog.Logger
	// subscribe and list reach the kernel; tests replace them.
	subscribe func() (*linkSubscription, error)
	list      func() ([]linkState, error)

	// attached (ifindex -> name) is written by one goroutine at a time
	// (start, then run) under mu; interfaces reads it under mu.
	mu       sync.Mutex
	attached map[int]string
	// attachFailures counts interfaces the program could not be attached
	// to after start; each is logged with the count so far.
	attachFailures uint64

	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}
}

func newIfaceWatcher(ns netns.NS, l attacher, log *slog.Logger) *ifaceWatcher {
	return &ifaceWatcher{
		ns: ns, l: l, log: log,
		subscribe: func() (*linkSubscription, error) { return subscribeLinks(ns) },
		list:      func() ([]linkState, error) { return listLinks(ns) },
		attached:  map[int]string{},
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
	}
}

// start subscribes, attaches to every interface that qualifies now and
// follows the namespace from then on. It subscribes before it lists, so an
// interface that appears in between is not missed. An interface it cannot
// attach to now is an error (the caller closes the loader, which detaches
// the others); later ones are logged and counted instead.
func (w *ifaceWatcher) start() error {
	sub, err := w.subscribe()
	if err != nil {
		return err
	}
	links, err := w.list()
	if err != nil {
		sub.close()
		return err
	}
	for _, a := range reconcileActions(nil, links) {
		att, err := w.l.Attach(w.ns, a.name)
		if errors.As(err, &netlink.LinkNotFoundError{}) {
			continue // deleted since the listing: its notification is queued
		}
		if err != nil {
			sub.close()
			return err
		}
		w.record(att)
	}
	go w.run(sub)
	return nil
}

// close stops the watcher and waits (bounded) for its goroutine. Only a
// watcher whose start succeeded may be closed.
func (w *ifaceWatcher) close() {
	w.stopOnce.Do(func() { close(w.stop) })
	select {
	case <-w.done:
	case <-time.After(watchStopTimeout):
		// The loader refuses Attach once closed or released, so a
		// straggler cannot attach behind the caller's back.
		w.log.Error("tc interface watch did not stop in time", "netns", w.ns.String(), "timeout", watchStopTimeout)
	}
}

// interfaces lists the interfaces the watcher holds the program on.
func (w *ifaceWatcher) interfaces() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	names := slices.Collect(maps.Values(w.attached))
	slices.Sort(names)
	return names
}

// run follows notifications until stopped or the namespace is gone. A lost
// subscription (socket error, ENOBUFS overrun) is replaced, and the
// interfaces re-listed, so missed notifications cost a delay, never an
// interface left without the program or a stale attachment.
func (w *ifaceWatcher) run(sub *linkSubscription) {
	defer close(w.done)
	backoff := resubscribeMin
	for {
		since := time.Now()
		lost := w.follow(sub)
		sub.close()
		if !lost {
			return
		}
		if time.Since(since) > resubscribeMax {
			// It served a while: this loss is not a repeat of the last.
			backoff = resubscribeMin
		}
		w.log.Warn("tc interface watch lost its netlink subscription: re-subscribing and re-listing interfaces",
			"netns", w.ns.String(), "err", sub.lastErr(), "retry_in", backoff)
		for sub = nil; sub == nil; {
			if !w.sleep(backoff) {
				return
			}
			var err error
			if sub, err = w.resync(); err != nil {
				if errors.Is(err, netns.ErrGone) {
					w.log.Info("tc interface watch ends: netns is gone", "netns", w.ns.String(), "err", err)
					return
				}
				backoff = min(2*backoff, resubscribeMax)
				w.log.Warn("tc interface watch cannot re-subscribe", "netns", w.ns.String(), "err", err, "retry_in", backoff)
			}
		}
	}
}

// follow applies notifications until the subscription ends (lost: true) or
// the watcher is stopped (false).
func (w *ifaceWatcher) follow(sub *linkSubscription) (lost bool) {
	for {
		select {
		case <-w.stop:
			return false
		case u, ok := <-sub.updates:
			if !ok {
				return true
			}
			s := linkStateOf(u.Link)
			s.Gone = u.Header.Type == unix.RTM_DELLINK
			actions := actionsFor(w.attached, s)
			if len(actions) == 0 && s.wanted() && w.attached[s.Index] == s.Name {
				w.refreshPeer(s)
			}
			w.apply(actions)
		}
	}
}

// resync subscribes anew and brings the attachments in line with a fresh
// listing.
func (w *ifaceWatcher) resync() (*linkSubscription, error) {
	sub, err := w.subscribe()
	if err != nil {
		return nil, err
	}
	links, err := w.list()
	if err != nil {
		sub.close()
		return nil, err
	}
	w.apply(reconcileActions(w.attached, links))
	// A veth peer may also have moved while notifications were lost.
	for _, s := range links {
		if s.wanted() && w.attached[s.Index] == s.Name {
			w.refreshPeer(s)
		}
	}
	return sub, nil
}

// sleep waits d, or less when stopped; it reports whether to go on.
func (w *ifaceWatcher) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-w.stop:
		return false
	case <-t.C:
		return true
	}
}

// apply carries out actions. Nothing here is fatal: a service keeps its
// listener, which serves the clients of an interface without the program.
func (w *ifaceWatcher) apply(actions []action) {
	for _, a := range actions {
		switch a.kind {
		case detachIface:
			// The loader forgets the attachment even when Detach fails.
			err := w.l.Detach(a.name)
			w.forget(a.index)
			if err != nil {
				w.log.Warn("tc datapath: detach from interface", "netns", w.ns.String(), "interface", a.name,
					"ifindex", a.index, "reason", a.reason, "err", err)
				continue
			}
			w.log.Info("tc datapath detached from interface", "netns", w.ns.String(), "interface", a.name,
				"ifindex", a.index, "reason", a.reason)
		case attachIface:
			att, err := w.l.Attach(w.ns, a.name)
			if err != nil {
				if errors.As(err, &netlink.LinkNotFoundError{}) {
					// Deleted (or renamed) again before we got to it;
					// its next notification says what became of it.
					w.log.Debug("tc datapath: interface gone before attach", "netns", w.ns.String(), "interface", a.name)
					continue
				}
				w.mu.Lock()
				w.attachFailures++
				n := w.attachFailures
				w.mu.Unlock()
				w.log.Warn("tc datapath cannot attach to new interface: its clients reach the services' listeners instead",
					"netns", w.ns.String(), "interface", a.name, "ifindex", a.index, "err", err, "attach_failures", n)
				continue
			}
			w.record(att)
			w.log.Info("tc datapath attached to new interface", "netns", w.ns.String(), "interface", att.Interface,
				"ifindex", att.Ifindex, "peer_redirect", att.PeerRedirect, "legacy", att.Legacy)
		}
	}
	if len(actions) > 0 {
		w.refreshRouteHints()
	}
}

// refreshRouteHints brings the nodes' route hints (ifindexes) in line with
// the namespace's routes once an interface came or went: one deleted and
// created again has a new ifindex, and the old one leads nowhere.
func (w *ifaceWatcher) refreshRouteHints() {
	n, err := w.l.RefreshRouteHints()
	if err != nil {
		w.log.Warn("tc datapath: refresh the nodes' route hints", "netns", w.ns.String(), "err", err)
	}
	if n > 0 {
		w.log.Info("tc datapath: nodes' route hints updated", "netns", w.ns.String(), "nodes", n)
	}
}

// refreshPeer tells the loader where an attached veth's peer is now: a
// peer moved into another namespace after the program was attached (CNI
// plugins bring the host end up first, then move the container's end)
// makes packets to it eligible for bpf_redirect_peer; one moved back must
// stop taking it.
func (w *ifaceWatcher) refreshPeer(s linkState) {
	changed, err := w.l.SetPeerRedirect(s.Name, s.PeerElsewhere)
	switch {
	case err != nil:
		w.log.Warn("tc datapath: update veth peer of interface", "netns", w.ns.String(), "interface", s.Name, "err", err)
	case changed:
		w.log.Info("tc datapath: veth peer moved", "netns", w.ns.String(), "interface", s.Name,
			"ifindex", s.Index, "peer_redirect", s.PeerElsewhere)
	}
}

func (w *ifaceWatcher) record(att loader.Attachment) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.attached[att.Ifindex] = att.Interface
}

func (w *ifaceWatcher) forget(index int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.attached, index)
}
