package tc

import (
	"context"
	"fmt"
	"maps"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
)

// gcInterval is how often expired flows are removed from the conntrack
// maps: the program ignores them already, this frees their SNAT ports and
// map slots before LRU eviction would.
const gcInterval = 10 * time.Second

// nsLoader is one namespace's BPF instance and the services using it.
type nsLoader struct {
	ns      netns.NS
	id      netns.ID
	l       *loader.Loader
	refs    int
	stopGC  context.CancelFunc
	gcDone  chan struct{}
	watch   *ifaceWatcher           // attaches to interfaces as they come and go
	ports   *portReservation        // nil when the SNAT ports needed no reservation (see snatPorts)
	splices map[netns.ID]*spliceRef // by netns.out's identity
	// services counts the attachments of each service ID in the maps:
	// FinishSetup prunes every other service a previous run left.
	services map[loader.ServiceID]int
	// names names the services of services, for logs.
	names map[loader.ServiceID]string

	counts flowCountCache
}

// flowCountsTTL is how long one walk of the conntrack map answers for. A
// metrics scrape asks every service of the namespace for its counters and
// its flow table; the walk costs a syscall per entry (up to FlowCapacity),
// so it is done once per scrape, not once per question.
const flowCountsTTL = time.Second

// flowCounts are one service's kernel flows: open ones and table entries
// (closed flows stay in the table for the closing timeout).
type flowCounts struct{ active, entries uint64 }

type flowCountCache struct {
	mu     sync.Mutex
	at     time.Time
	counts map[loader.ServiceID]flowCounts
}

// flowCounts counts the namespace's kernel flows per service, walking the
// conntrack map at most once per flowCountsTTL.
func (nl *nsLoader) flowCounts() (map[loader.ServiceID]flowCounts, error) {
	c := &nl.counts
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts != nil && time.Since(c.at) < flowCountsTTL {
		return c.counts, nil
	}
	conns, err := nl.l.Conns()
	if err != nil {
		return nil, err
	}
	counts := map[loader.ServiceID]flowCounts{}
	for _, f := range conns {
		if f.Expired {
			continue
		}
		fc := counts[f.Service]
		fc.entries++
		if f.State != loader.TCPClosing && f.State != loader.TCPReset {
			fc.active++
		}
		counts[f.Service] = fc
	}
	c.counts, c.at = counts, time.Now()
	return counts, nil
}

// acquire returns the namespace's BPF instance, loading it on first use
// and attaching it to every Ethernet interface that is up there, now and
// whenever one comes up later (see ifaceWatcher).
func (d *Datapath) acquire(ns netns.NS) (*nsLoader, error) {
	id, err := ns.ID()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if nl, ok := d.loaders[id]; ok {
		nl.refs++
		return nl, nil
	}
	// The SNAT range first: it is a constant of the program.
	snat, ports, err := d.snatPorts(ns, id)
	if err != nil {
		return nil, fmt.Errorf("tc datapath in netns %s: %w", ns, err)
	}
	restorePorts := func() {
		if ports != nil {
			if err := ports.restore(); err != nil {
				d.logger().Error("restore reserved ports", "netns", ns.String(), "err", err)
			}
		}
	}
	l, err := loader.Load(loader.Config{Instance: d.Instance, Netns: ns, Logger: d.logger(),
		SNATPortMin: snat.min, SNATPortMax: snat.max})
	if err != nil {
		restorePorts()
		return nil, err
	}
	undo := func() {
		l.Close()
		restorePorts()
	}
	// The watcher attaches to the interfaces there now before start
	// returns, and to those that come later.
	watch := newIfaceWatcher(ns, l, d.logger())
	if err := watch.start(); err != nil {
		undo()
		return nil, err
	}
	if len(watch.interfaces()) == 0 {
		watch.close()
		undo()
		return nil, fmt.Errorf("netns %s has no Ethernet interface to attach to", ns)
	}
	gcCtx, stop := context.WithCancel(context.Background())
	nl := &nsLoader{ns: ns, id: id, l: l, refs: 1, stopGC: stop, gcDone: make(chan struct{}), watch: watch,
		ports: ports, services: map[loader.ServiceID]int{}, names: map[loader.ServiceID]string{}}
	go d.collectGarbage(gcCtx, nl)
	if d.loaders == nil {
		d.loaders = map[netns.ID]*nsLoader{}
	}
	d.loaders[id] = nl
	return nl, nil
}

func (d *Datapath) release(nl *nsLoader) {
	d.mu.Lock()
	defer d.mu.Unlock()
	nl.refs--
	if nl.refs > 0 {
		return
	}
	nl.stopGC()
	<-nl.gcDone
	// Before the loader goes: the watcher must not attach or detach
	// behind Close or Release. Stopping it detaches nothing, so after
	// KeepForRestart every attachment stays for the next run.
	nl.watch.close()
	if d.keep {
		if err := nl.l.Release(); err != nil {
			d.logger().Error("release tc datapath for restart", "netns", nl.ns.String(), "err", err)
		}
	} else {
		// Every splice user is a loader user too, so none should be
		// left; should one be, it must not outlive the loader.
		for _, r := range nl.splices {
			d.removeSplice(nl, r)
		}
		if err := nl.l.Close(); err != nil {
			d.logger().Error("detach tc datapath", "netns", nl.ns.String(), "err", err)
		}
		// After the program: no translated flow needs the ports now.
		// (A restart in place keeps them reserved, and its state file
		// tells the next run what to restore.)
		if nl.ports != nil {
			if err := nl.ports.restore(); err != nil {
				d.logger().Error("restore reserved ports", "netns", nl.ns.String(), "err", err)
			}
		}
	}
	delete(d.loaders, nl.id)
}

func (d *Datapath) collectGarbage(ctx context.Context, nl *nsLoader) {
	defer close(nl.gcDone)
	t := time.NewTicker(gcInterval)
	defer t.Stop()
	refused := map[loader.ServiceID]kernelRefusals{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if n, err := nl.l.CollectGarbage(); err != nil {
				d.logger().Warn("tc conntrack garbage collection", "netns", nl.ns.String(), "err", err)
			} else if n > 0 {
				d.logger().Debug("tc conntrack garbage collection", "netns", nl.ns.String(), "removed", n)
			}
			d.logKernelRefusals(nl, refused)
		}
	}
}

// kernelRefusals are a service's new flows the program could not take on:
// no free SNAT port (the flow goes to the listener) or the conntrack map
// refused the entry (the packet is dropped; the client retransmits).
type kernelRefusals struct{ snatExhausted, mapFull uint64 }

// logKernelRefusals logs, once a GC round, the refusals of each service
// since the last round (seen holds the counts then): the metrics count them
// (snat_exhausted, map_full), and a line says when they happened.
func (d *Datapath) logKernelRefusals(nl *nsLoader, seen map[loader.ServiceID]kernelRefusals) {
	d.mu.Lock()
	names := maps.Clone(nl.names)
	d.mu.Unlock()
	for id, name := range names {
		k, err := nl.l.Counters(id)
		if err != nil {
			continue // the service is going; Counters says why at scrape
		}
		now := kernelRefusals{snatExhausted: k.SNATFailures, mapFull: k.DropConntrack}
		last, known := seen[id]
		seen[id] = now
		if !known && nl.l.Reused() {
			// The maps, counters included, are a previous run's: what
			// they counted was that run's to log.
			continue
		}
		if now.snatExhausted > last.snatExhausted || now.mapFull > last.mapFull {
			d.logger().Warn("tc datapath refused new flows: no free SNAT port (served by the listener) or conntrack map full (dropped, the client retries)",
				"service", name, "netns", nl.ns.String(), "snat_exhausted", now.snatExhausted-last.snatExhausted,
				"map_full", now.mapFull-last.mapFull, "since", gcInterval)
		}
	}
	for id := range seen {
		if _, ok := names[id]; !ok {
			delete(seen, id)
		}
	}
}

// listLinks lists the state of every link of the namespace; the interface
// watcher (watch.go) decides from it which ones carry the program.
func listLinks(ns netns.NS) ([]linkState, error) {
	var states []linkState
	err := ns.Do(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, l := range links {
			states = append(states, linkStateOf(l))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list interfaces in netns %s: %w", ns, err)
	}
	return states, nil
}
