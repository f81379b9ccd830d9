// Package tc is the eBPF datapath: a tcx program in the listen namespace
// translates a service's packets to its nodes and moves them between
// namespaces without a socket (see bpf/nat.c and loader). Every tc service
// also keeps its ordinary listener, served by the userspace datapath, for
// clients inside the listen namespace itself and for packets the program
// passes to the stack.
//
// A service whose netns.out is another namespace reaches its nodes over a
// splice link (package splice): a veth pair between the two namespaces,
// one per pair of namespaces, shared by the services that cross there and
// removed with the last of them. Its nodes get the link as their fixed
// egress, so the listen namespace's own routes never matter for them.
//
// A daemon that restarts in place (re-executes itself) calls KeepForRestart
// before it closes its services: the program stays attached, the maps stay
// pinned and the splice links stay, so established flows keep going while
// no process runs. The next run's Setup takes all of it over (see loader
// and splice), and FinishSetup then removes what that run does not need.
package tc

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// gcInterval is how often expired flows are removed from the conntrack
// maps: the program ignores them already, this frees their SNAT ports and
// map slots before LRU eviction would.
const gcInterval = 10 * time.Second

// Applicable reports why the tc datapath cannot carry svc, or nil when it
// can. The planner calls it before choosing tc.
func Applicable(svc datapath.Service) error {
	switch {
	case svc.Chained:
		return errors.New("traffic goes through proxy hops, which need a userspace connection")
	case svc.Network != "tcp" && svc.Network != "udp":
		return fmt.Errorf("network %q is not tcp or udp", svc.Network)
	case len(svc.Nodes) == 0:
		return errors.New("no forward nodes")
	}
	if _, err := strategy(svc.Strategy); err != nil {
		return err
	}
	vip, err := netip.ParseAddrPort(svc.Addr)
	if err != nil {
		return fmt.Errorf("listen address %q is not a single IP address and port", svc.Addr)
	}
	if vip.Addr().IsLoopback() || vip.Addr().IsUnspecified() {
		return fmt.Errorf("listen address %s never crosses an interface", vip)
	}
	for _, n := range svc.Nodes {
		ap, err := netip.ParseAddrPort(n.Addr)
		if err != nil {
			return fmt.Errorf("node %s: address %q is not an IP address and port", n.Name, n.Addr)
		}
		if ap.Addr().Is4() != vip.Addr().Is4() {
			return fmt.Errorf("node %s: %s is not of the listen address's IP version", n.Name, n.Addr)
		}
	}
	return nil
}

func strategy(s string) (loader.Strategy, error) {
	switch s {
	case "", "round":
		return loader.RoundRobin, nil
	case "rand":
		return loader.Random, nil
	case "hash":
		return loader.Hash, nil
	}
	return 0, fmt.Errorf("selector strategy %q is not implemented in BPF (round, rand and hash are)", s)
}

// Datapath is the tc datapath. One BPF instance is loaded per listen
// namespace, the first time a service there is set up, and unloaded when
// its last service closes.
type Datapath struct {
	// Instance names the daemon; pins go to /sys/fs/bpf/ebpfwd/<Instance>/,
	// a directory per namespace (loader.NetnsDir).
	Instance string
	Logger   *slog.Logger
	// Userspace serves each service's socket listener.
	Userspace datapath.Datapath
	// SplicePool is where the addresses of splice links come from; zero
	// prefixes take splice.DefaultPool4 and splice.DefaultPool6.
	SplicePool splice.Pool

	mu      sync.Mutex
	loaders map[string]*nsLoader // by listen namespace path
	links   *splice.Links        // created on first use
	// keep is set by KeepForRestart: closing leaves the kernel's state.
	keep bool
}

var (
	_ datapath.Datapath        = (*Datapath)(nil)
	_ datapath.ProgramReporter = (*Datapath)(nil)
)

// Programs reports the kernel's accounting of the NAT program in every
// namespace it is loaded in.
func (d *Datapath) Programs() []datapath.ProgramStats {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []datapath.ProgramStats
	for _, nl := range d.loaders {
		name, runTime, runs, err := nl.l.ProgramStats()
		if err != nil {
			d.logger().Warn("read tc program stats", "netns", nl.ns.String(), "err", err)
			continue
		}
		out = append(out, datapath.ProgramStats{Program: name, Netns: nsName(nl.ns), RunTime: runTime, RunCount: runs})
	}
	return out
}

// nsLoader is one namespace's BPF instance and the services using it.
type nsLoader struct {
	ns      netns.NS
	l       *loader.Loader
	refs    int
	stopGC  context.CancelFunc
	gcDone  chan struct{}
	watch   *ifaceWatcher         // attaches to interfaces as they come and go
	splices map[string]*spliceRef // by netns.out path
	// services counts the attachments of each service ID in the maps:
	// FinishSetup prunes every other service a previous run left.
	services map[loader.ServiceID]int

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

// spliceRef is a splice link from the loader's namespace and the services
// using it.
type spliceRef struct {
	link *splice.Link
	refs int
}

// Kind reports datapath.TC.
func (*Datapath) Kind() datapath.Kind { return datapath.TC }

// Setup attaches the program in the service's listen namespace (loading it
// there first if needed), puts the service into its maps, and prepares the
// userspace datapath for the service's listener.
func (d *Datapath) Setup(ctx context.Context, svc datapath.Service) (datapath.Attachment, error) {
	if err := Applicable(svc); err != nil {
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	outNS, crossing, err := outNamespace(svc)
	if err != nil {
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	us, err := d.Userspace.Setup(ctx, svc)
	if err != nil {
		return nil, err
	}
	a, err := d.setup(svc, outNS, crossing)
	if err != nil {
		us.Close()
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	a.us = us
	attrs := []any{"service", svc.Name, "netns", a.nl.ns.String(),
		"interfaces", strings.Join(a.nl.watch.interfaces(), ","), "pins", a.nl.l.PinDir()}
	if a.splice != nil {
		attrs = append(attrs, "splice_link", a.splice.link.Name, "netns_out", outNS.String())
	}
	d.logger().Info("tc datapath attached", attrs...)
	return a, nil
}

// setup loads the program in the listen namespace (and builds the splice
// link to netns.out if crossing) and puts the service into the maps.
func (d *Datapath) setup(svc datapath.Service, outNS netns.NS, crossing bool) (*attachment, error) {
	nl, err := d.acquire(svc.ListenNS)
	if err != nil {
		return nil, err
	}
	a := &attachment{d: d, nl: nl, svc: svc}
	if crossing {
		if a.splice, err = d.acquireSplice(nl, outNS); err != nil {
			d.release(nl)
			return nil, err
		}
	}
	var link *splice.Link
	if a.splice != nil {
		link = a.splice.link
	}
	spec, err := loaderService(svc, link)
	if err == nil {
		a.id, err = nl.l.PutService(spec)
	}
	if err != nil {
		d.releaseSplice(nl, a.splice)
		d.release(nl)
		return nil, err
	}
	d.mu.Lock()
	nl.services[a.id]++
	d.mu.Unlock()
	return a, nil
}

// KeepForRestart makes closing keep the kernel's state: from now on,
// closing a service leaves it in the maps, closing a namespace's last
// service releases the program without detaching it or unpinning its maps,
// and splice links stay. A daemon calls it before it closes its services
// to re-execute itself; the next run adopts the state and keeps the flows.
func (d *Datapath) KeepForRestart() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.keep = true
}

func (d *Datapath) keeping() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.keep
}

// FinishSetup removes what a previous run of the instance left and this
// run does not need, once every service is set up: in each namespace with
// services, the services the configuration dropped (their flows expire)
// and the program's links on interfaces that are gone or unused; in every
// namespace the previous run served and this one does not, the program and
// its pins; splice links of the instance no service uses. It does nothing
// on a first start.
// Errors are returned after every cleanup was tried.
func (d *Datapath) FinishSetup() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	var nss []netns.NS
	serving := make([]string, 0, len(d.loaders))
	for _, nl := range d.loaders {
		nss = append(nss, nl.ns)
		serving = append(serving, nsName(nl.ns))
		keep := make([]loader.ServiceID, 0, len(nl.services))
		for id := range nl.services {
			keep = append(keep, id)
		}
		if _, err := nl.l.PruneServices(keep); err != nil {
			errs = append(errs, err)
		}
		if _, err := nl.l.PruneLinks(); err != nil {
			errs = append(errs, err)
		}
	}
	// Namespaces a previous run served and this one does not: their
	// program is detached and their pins go, and so do the splice links
	// that started there.
	pruned, err := loader.PruneNamespaces(loader.Config{Instance: d.Instance, Logger: d.logger()}, serving)
	if err != nil {
		errs = append(errs, err)
	}
	for _, spec := range pruned {
		if ns, err := netns.Parse(spec); err == nil && ns.Check() == nil {
			nss = append(nss, ns)
		}
	}
	if len(nss) > 0 {
		if d.links == nil {
			links, err := splice.NewLinks(d.Instance, d.SplicePool, d.logger())
			if err != nil {
				return errors.Join(append(errs, err)...)
			}
			d.links = links
		}
		if err := d.links.RemoveUnused(nss...); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tc datapath: clean up after a previous run: %w", err)
	}
	return nil
}

// outNamespace parses the service's netns.out and tells whether it is
// another namespace than the listen one, which only a splice link crosses.
// Two specs can name one namespace ("" and the path of the namespace the
// daemon runs in): that is no crossing.
func outNamespace(svc datapath.Service) (netns.NS, bool, error) {
	listen, err := netns.Parse(svc.ListenNS)
	if err != nil {
		return netns.NS{}, false, err
	}
	out, err := netns.Parse(svc.OutNS)
	if err != nil {
		return netns.NS{}, false, err
	}
	same, err := splice.SameNamespace(listen, out)
	if err != nil {
		return netns.NS{}, false, err
	}
	return out, !same, nil
}

// loaderService translates a service for the loader. With link set, its
// nodes are reached over that splice link.
func loaderService(svc datapath.Service, link *splice.Link) (loader.Service, error) {
	st, err := strategy(svc.Strategy)
	if err != nil {
		return loader.Service{}, err
	}
	vip, err := netip.ParseAddrPort(svc.Addr)
	if err != nil {
		return loader.Service{}, err
	}
	out := loader.Service{Network: svc.Network, VIP: vip, Strategy: st, IdleTimeout: svc.IdleTimeout}
	if svc.Network == "udp" {
		out.IdleTimeout = svc.PacketTTL
	}
	for _, n := range svc.Nodes {
		ap, err := netip.ParseAddrPort(n.Addr)
		if err != nil {
			return loader.Service{}, err
		}
		node := loader.Node{Addr: ap}
		if link != nil {
			if node.SNAT, err = link.Addr(ap.Addr()); err != nil {
				return loader.Service{}, fmt.Errorf("node %s: %w", n.Name, err)
			}
			node.Egress = &loader.Egress{Ifindex: link.Listen.Ifindex, SrcMAC: link.Listen.MAC, DstMAC: link.Out.MAC}
		}
		out.Nodes = append(out.Nodes, node)
	}
	return out, nil
}

// acquireSplice returns the splice link from nl's namespace to out,
// creating it and attaching the program to its listen end on first use:
// the nodes' replies arrive there.
func (d *Datapath) acquireSplice(nl *nsLoader, out netns.NS) (*spliceRef, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if r, ok := nl.splices[out.Path()]; ok {
		r.refs++
		return r, nil
	}
	if d.links == nil {
		links, err := splice.NewLinks(d.Instance, d.SplicePool, d.logger())
		if err != nil {
			return nil, err
		}
		d.links = links
	}
	link, err := d.links.Create(nl.ns, out)
	if err != nil {
		return nil, err
	}
	if _, err := nl.l.Attach(nl.ns, link.Name); err != nil {
		if derr := d.links.Delete(link); derr != nil {
			d.logger().Error("remove splice link after failed attach", "link", link.Name, "err", derr)
		}
		return nil, err
	}
	r := &spliceRef{link: link, refs: 1}
	if nl.splices == nil {
		nl.splices = map[string]*spliceRef{}
	}
	nl.splices[out.Path()] = r
	return r, nil
}

// releaseSplice drops a service's use of a splice link (nil: none) and,
// with its last service, detaches the program from it and removes it.
func (d *Datapath) releaseSplice(nl *nsLoader, r *spliceRef) {
	if r == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	r.refs--
	if r.refs > 0 {
		return
	}
	if d.keep {
		// The link stays for the next run, and the program on it too.
		for k, v := range nl.splices {
			if v == r {
				delete(nl.splices, k)
			}
		}
		return
	}
	d.removeSplice(nl, r)
}

// removeSplice detaches and deletes a splice link; d.mu is held.
func (d *Datapath) removeSplice(nl *nsLoader, r *spliceRef) {
	for k, v := range nl.splices {
		if v == r {
			delete(nl.splices, k)
		}
	}
	// Detach first: the pinned tcx link would otherwise outlive the
	// interface in bpffs until the loader closes.
	if err := nl.l.Detach(r.link.Name); err != nil {
		d.logger().Error("detach tc datapath from splice link", "link", r.link.Name, "err", err)
	}
	if err := d.links.Delete(r.link); err != nil {
		d.logger().Error("remove splice link", "link", r.link.Name, "err", err)
	}
}

func (d *Datapath) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.Default()
	}
	return d.Logger
}

// acquire returns the namespace's BPF instance, loading it on first use
// and attaching it to every Ethernet interface that is up there, now and
// whenever one comes up later (see ifaceWatcher).
func (d *Datapath) acquire(nsPath string) (*nsLoader, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if nl, ok := d.loaders[nsPath]; ok {
		nl.refs++
		return nl, nil
	}
	ns, err := netns.Parse(nsPath)
	if err != nil {
		return nil, err
	}
	l, err := loader.Load(loader.Config{Instance: d.Instance, Netns: nsName(ns), Logger: d.logger()})
	if err != nil {
		return nil, err
	}
	d.warnPortOverlap(ns)
	// The watcher attaches to the interfaces there now before start
	// returns, and to those that come later.
	watch := newIfaceWatcher(ns, l, d.logger())
	if err := watch.start(); err != nil {
		l.Close()
		return nil, err
	}
	if len(watch.interfaces()) == 0 {
		watch.close()
		l.Close()
		return nil, fmt.Errorf("netns %s has no Ethernet interface to attach to", ns)
	}
	gcCtx, stop := context.WithCancel(context.Background())
	nl := &nsLoader{ns: ns, l: l, refs: 1, stopGC: stop, gcDone: make(chan struct{}), watch: watch,
		services: map[loader.ServiceID]int{}}
	go d.collectGarbage(gcCtx, nl)
	if d.loaders == nil {
		d.loaders = map[string]*nsLoader{}
	}
	d.loaders[nsPath] = nl
	return nl, nil
}

// warnPortOverlap warns when the namespace's ip_local_port_range reaches
// into the SNAT range: a connection the namespace's own sockets open to a
// node (the listener's dials, node probes) could then get a source port a
// translated flow holds, and their packets would cross.
func (d *Datapath) warnPortOverlap(ns netns.NS) {
	var lo, hi int
	err := ns.Do(func() error {
		b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
		if err != nil {
			return err
		}
		_, err = fmt.Sscan(string(b), &lo, &hi)
		return err
	})
	if err != nil {
		d.logger().Debug("read ip_local_port_range", "netns", ns.String(), "err", err)
		return
	}
	if lo <= loader.DefaultSNATPortMax && hi >= loader.DefaultSNATPortMin {
		d.logger().Warn("ip_local_port_range overlaps the tc datapath's SNAT ports: the namespace's own connections to nodes may collide with translated flows",
			"netns", ns.String(), "ip_local_port_range", fmt.Sprintf("%d-%d", lo, hi),
			"snat_ports", fmt.Sprintf("%d-%d", loader.DefaultSNATPortMin, loader.DefaultSNATPortMax))
	}
}

// nsName is a namespace as `ip netns` names it where it has such a name,
// else its path ("" for the daemon's own).
func nsName(ns netns.NS) string {
	name := filepath.Clean(ns.Path())
	if dir, base := filepath.Split(name); dir == "/var/run/netns/" || dir == "/run/netns/" {
		return base
	}
	return ns.Path()
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
	}
	for k, v := range d.loaders {
		if v == nl {
			delete(d.loaders, k)
		}
	}
}

func (d *Datapath) collectGarbage(ctx context.Context, nl *nsLoader) {
	defer close(nl.gcDone)
	t := time.NewTicker(gcInterval)
	defer t.Stop()
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

// attachment is one service on the tc datapath.
type attachment struct {
	d      *Datapath
	nl     *nsLoader
	splice *spliceRef // nil unless netns.out is another namespace
	id     loader.ServiceID
	svc    datapath.Service
	us     datapath.Attachment

	closeOnce sync.Once
	closeErr  error
}

var (
	_ datapath.PacketForwarder  = (*attachment)(nil)
	_ datapath.FlowLister       = (*attachment)(nil)
	_ datapath.FlowTabler       = (*attachment)(nil)
	_ datapath.NodeHealthSetter = (*attachment)(nil)
	_ datapath.KernelReasoner   = (*attachment)(nil)
)

// Splice serves a stream accepted by the service's listener: one the
// program passed to the stack, or from a client in the listen namespace.
func (a *attachment) Splice(ctx context.Context, s datapath.Stream) error {
	return a.us.Splice(ctx, s)
}

// ServePackets serves the datagrams that reach the service's socket.
func (a *attachment) ServePackets(ctx context.Context, pc net.PacketConn, dial datapath.PacketDialer) error {
	pf, ok := a.us.(datapath.PacketForwarder)
	if !ok {
		return errors.New("userspace datapath cannot forward packets")
	}
	return pf.ServePackets(ctx, pc, dial)
}

// Counters adds the kernel's figures (read from the per-CPU map now) to the
// socket listener's.
func (a *attachment) Counters() datapath.Counters {
	c := a.us.Counters()
	k, err := a.nl.l.Counters(a.id)
	if err != nil {
		a.d.logger().Warn("read tc counters", "service", a.svc.Name, "err", err)
		return c
	}
	c.Opened += k.NewFlows
	c.BytesUp += k.BytesUp
	c.BytesDown += k.BytesDown
	c.PacketsUp += k.PacketsUp
	c.PacketsDown += k.PacketsDown
	if counts, err := a.nl.flowCounts(); err == nil {
		c.Active += int64(counts[a.id].active)
	}
	return c
}

// FlowTables reports the service's share of the kernel's conntrack table,
// plus the listener's own table (UDP sessions).
func (a *attachment) FlowTables() []datapath.FlowTable {
	var out []datapath.FlowTable
	if ft, ok := a.us.(datapath.FlowTabler); ok {
		out = ft.FlowTables()
	}
	counts, err := a.nl.flowCounts()
	if err != nil {
		a.d.logger().Warn("count tc flows", "service", a.svc.Name, "err", err)
		return out
	}
	return append(out, datapath.FlowTable{Name: "conntrack", Entries: counts[a.id].entries, Capacity: loader.FlowCapacity})
}

// SetNodeHealthy takes a node out of (or back into) the program's choice
// for new flows; flows in progress keep their node.
func (a *attachment) SetNodeHealthy(index int, healthy bool) error {
	return a.nl.l.SetNodeHealthy(a.id, index, healthy)
}

// KernelReasons maps the program's counters to metric reasons. A flow that
// got no SNAT port, or could not be recorded because the conntrack map
// refused it, is an error: the packet goes on to the listener (or is
// dropped), but not on the fast path.
func (a *attachment) KernelReasons() (datapath.KernelReasons, error) {
	k, err := a.nl.l.Counters(a.id)
	if err != nil {
		return datapath.KernelReasons{}, err
	}
	return datapath.KernelReasons{
		Errors: map[string]uint64{"snat_exhausted": k.SNATFailures, "map_full": k.DropConntrack},
		Passed: map[string]uint64{
			"fragment": k.PassFragment, "ip_options": k.PassIPOptions, "no_route": k.PassNoRoute,
			"no_flow": k.PassNoFlow, "no_healthy_node": k.PassNoNode,
		},
		Dropped: map[string]uint64{"ttl_exceeded": k.DropTTL, "rewrite_failed": k.DropRewrite, "map_full": k.DropConntrack},
	}, nil
}

// KernelCounters are the program's own counters for the service.
func (a *attachment) KernelCounters() (loader.Counters, error) { return a.nl.l.Counters(a.id) }

func (a *attachment) kernelFlows() ([]loader.Conn, error) {
	conns, err := a.nl.l.Conns()
	if err != nil {
		return nil, err
	}
	out := conns[:0]
	for _, c := range conns {
		if c.Service == a.id && !c.Expired {
			out = append(out, c)
		}
	}
	return out, nil
}

// Flows lists the kernel's flows of this service and the listener's.
func (a *attachment) Flows() []datapath.Flow {
	var out []datapath.Flow
	if fl, ok := a.us.(datapath.FlowLister); ok {
		out = fl.Flows()
	}
	conns, err := a.kernelFlows()
	if err != nil {
		a.d.logger().Warn("list tc flows", "service", a.svc.Name, "err", err)
		return out
	}
	for _, c := range conns {
		out = append(out, datapath.Flow{
			Service: a.svc.Name, Datapath: datapath.TC, Network: c.Network,
			Client: c.Client.String(), Node: a.nodeName(c.Node), Upstream: c.Node.String(),
			State: fmt.Sprintf("%s idle %s via %s", c.State, c.Idle.Round(time.Millisecond), c.SNAT),
		})
	}
	return out
}

func (a *attachment) nodeName(addr netip.AddrPort) string {
	for _, n := range a.svc.Nodes {
		if ap, err := netip.ParseAddrPort(n.Addr); err == nil && ap == addr {
			return n.Name
		}
	}
	return ""
}

// Close removes the service from the maps and, with the namespace's last
// service, detaches and unpins the program; after KeepForRestart it leaves
// both for the next run.
func (a *attachment) Close() error {
	a.closeOnce.Do(func() {
		a.d.mu.Lock()
		if a.nl.services[a.id]--; a.nl.services[a.id] <= 0 {
			delete(a.nl.services, a.id)
		}
		a.d.mu.Unlock()
		var err error
		if !a.d.keeping() {
			err = a.nl.l.DeleteService(a.id)
		}
		a.d.releaseSplice(a.nl, a.splice)
		a.d.release(a.nl)
		a.closeErr = errors.Join(err, a.us.Close())
	})
	return a.closeErr
}
