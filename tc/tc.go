// Package tc is the eBPF datapath: a tcx program in the listen namespace
// translates a service's packets to its nodes and moves them between
// namespaces without a socket (see bpf/nat.c and loader). It carries no
// socket itself: the daemon joins every tc attachment with the userspace
// relay's (datapath.WithRelay), which serves the service's ordinary
// listener, for clients inside the listen namespace itself and for packets
// the program passes to the stack.
//
// The package's files each hold one job:
//
//   - applies.go, probe.go: whether tc can carry a service (planning)
//   - namespace.go: one BPF instance per listen namespace, by identity
//   - splicelinks.go: the splice links that cross into netns.out
//   - attachment.go: one service in the maps, its counters and flows
//   - restart.go: keeping the kernel's state for a restart in place, and
//     removing what a previous run left
//   - watch.go: following the interfaces of a namespace
//
// A service whose netns.out is another namespace reaches its nodes over a
// splice link (package splice): a veth pair between the two namespaces,
// one per pair of namespaces, shared by the services that cross there and
// removed with the last of them. Its nodes get the link as their fixed
// egress, so the listen namespace's own routes never matter for them.
package tc

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// Datapath is the tc datapath. One BPF instance is loaded per listen
// namespace, the first time a service there is set up, and unloaded when
// its last service closes.
type Datapath struct {
	// Instance names the daemon; pins go to /sys/fs/bpf/ebpfwd/<Instance>/,
	// a directory per namespace (see loader).
	Instance string
	Logger   *slog.Logger
	// SplicePool is where the addresses of splice links come from; zero
	// prefixes take splice.DefaultPool4 and splice.DefaultPool6.
	SplicePool splice.Pool

	mu sync.Mutex
	// loaders are by the listen namespace's identity: two spellings of one
	// namespace share one BPF instance, one set of pins, one attachment.
	loaders map[netns.ID]*nsLoader
	links   *splice.Links // created on first use
	// keep is set by KeepForRestart: closing leaves the kernel's state.
	keep bool
	// sysctls reads and writes the namespaces' sysctls; nil is /proc/sys.
	sysctls sysctls
}

var (
	_ datapath.Datapath        = (*Datapath)(nil)
	_ datapath.ProgramReporter = (*Datapath)(nil)
)

// rank places tc first for `auto`: it moves packets without a socket.
const rank = 10

// Kind reports datapath.TC.
func (*Datapath) Kind() datapath.Kind { return datapath.TC }

// Rank reports where `auto` tries tc: first.
func (*Datapath) Rank() int { return rank }

// Setup attaches the program in the service's listen namespace (loading it
// there first if needed) and puts the service into its maps.
func (d *Datapath) Setup(_ context.Context, svc datapath.Service) (datapath.Attachment, error) {
	if err := applicable(svc); err != nil {
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	crossing, err := crosses(svc)
	if err != nil {
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	a, err := d.setup(svc, crossing)
	if err != nil {
		return nil, fmt.Errorf("tc datapath for service %s: %w", svc.Name, err)
	}
	attrs := []any{"service", svc.Name, "netns", a.nl.ns.String(),
		"interfaces", strings.Join(a.nl.watch.interfaces(), ","), "pins", a.nl.l.PinDir()}
	if a.splice != nil {
		attrs = append(attrs, "splice_link", a.splice.link.Name, "netns_out", svc.OutNS.String())
	}
	d.logger().Info("tc datapath attached", attrs...)
	return a, nil
}

// setup loads the program in the listen namespace (and builds the splice
// link to netns.out if crossing) and puts the service into the maps.
func (d *Datapath) setup(svc datapath.Service, crossing bool) (*attachment, error) {
	nl, err := d.acquire(svc.ListenNS)
	if err != nil {
		return nil, err
	}
	a := &attachment{d: d, nl: nl, svc: svc}
	if crossing {
		if a.splice, err = d.acquireSplice(nl, svc.OutNS); err != nil {
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
	nl.names[a.id] = svc.Name
	d.mu.Unlock()
	return a, nil
}

// crosses tells whether the service's netns.out is another namespace than
// its listen one, which only a splice link crosses. Two specs can name one
// namespace ("" and the path of the namespace the daemon runs in): that is
// no crossing.
func crosses(svc datapath.Service) (bool, error) {
	same, err := svc.ListenNS.Same(svc.OutNS)
	return !same, err
}

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
		out = append(out, datapath.ProgramStats{Program: name, Netns: nl.ns.Spec(), RunTime: runTime, RunCount: runs})
	}
	return out
}

func (d *Datapath) logger() *slog.Logger {
	if d.Logger == nil {
		return slog.Default()
	}
	return d.Logger
}
