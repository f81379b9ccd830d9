package tc

import (
	"fmt"
	"math"
	"net/netip"
	"sync"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// attachment is one service on the tc datapath.
type attachment struct {
	d      *Datapath
	nl     *nsLoader
	splice *spliceRef // nil unless netns.out is another namespace
	id     loader.ServiceID
	svc    datapath.Service

	closeOnce sync.Once
	closeErr  error
}

var (
	_ datapath.FlowLister            = (*attachment)(nil)
	_ datapath.FlowTabler            = (*attachment)(nil)
	_ datapath.NodeHealthSetter      = (*attachment)(nil)
	_ datapath.PassiveHealthReporter = (*attachment)(nil)
	_ datapath.KernelReasoner        = (*attachment)(nil)
)

// Counters are the kernel's figures, read from the per-CPU map now (the
// relay beside it counts the listener's streams).
func (a *attachment) Counters() datapath.Counters {
	k, err := a.nl.l.Counters(a.id)
	if err != nil {
		a.d.logger().Warn("read tc counters", "service", a.svc.Name, "err", err)
		return datapath.Counters{}
	}
	c := datapath.Counters{Opened: k.NewFlows, BytesUp: k.BytesUp, BytesDown: k.BytesDown,
		PacketsUp: k.PacketsUp, PacketsDown: k.PacketsDown}
	if counts, err := a.nl.flowCounts(); err == nil {
		c.Active = int64(counts[a.id].active)
	}
	return c
}

// FlowTables reports the service's share of the kernel's conntrack table.
func (a *attachment) FlowTables() []datapath.FlowTable {
	counts, err := a.nl.flowCounts()
	if err != nil {
		a.d.logger().Warn("count tc flows", "service", a.svc.Name, "err", err)
		return nil
	}
	return append([]datapath.FlowTable(nil), datapath.FlowTable{Name: "conntrack", Entries: counts[a.id].entries, Capacity: loader.FlowCapacity})
}

// SetNodeHealthy takes a node out of (or back into) the program's choice
// for new flows; flows in progress keep their node. The nodes' route hints
// are refreshed first: a node's health changes with its route (an
// interface gone, or back with the address that brings the route, which
// the interface watcher may have seen come up before its address), and a
// node back in the choice must not be routed to an ifindex that is gone.
func (a *attachment) SetNodeHealthy(index int, healthy bool) error {
	if n, err := a.nl.l.RefreshRouteHints(); err != nil {
		a.d.logger().Warn("tc datapath: refresh the nodes' route hints", "service", a.svc.Name, "err", err)
	} else if n > 0 {
		a.d.logger().Info("tc datapath: nodes' route hints updated", "service", a.svc.Name, "nodes", n)
	}
	return a.nl.l.SetNodeHealthy(a.id, index, healthy)
}

// NodeOutcomes are the program's verdicts on each node's new flows
// (bpf/lib/health.h).
func (a *attachment) NodeOutcomes() ([]datapath.NodeOutcomes, error) {
	hs, err := a.nl.l.NodeHealth(a.id)
	if err != nil {
		return nil, err
	}
	out := make([]datapath.NodeOutcomes, len(hs))
	for i, h := range hs {
		out[i] = datapath.NodeOutcomes{
			Failed: map[string]uint64{datapath.FailRefused: h.Refused, datapath.FailUnreachable: h.Unreachable,
				datapath.FailSYNTimeout: h.SYNTimeout},
			Answered: h.Answered,
			Streak:   h.Streak,
		}
	}
	return out, nil
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

// Flows lists the kernel's flows of this service.
func (a *attachment) Flows() []datapath.Flow {
	conns, err := a.kernelFlows()
	if err != nil {
		a.d.logger().Warn("list tc flows", "service", a.svc.Name, "err", err)
		return nil
	}
	var out []datapath.Flow
	for _, c := range conns {
		out = append(out, datapath.Flow{
			Service: a.svc.Name, Datapath: datapath.TC, Network: c.Network,
			Client: c.Client.String(), Node: a.nodeName(c.Node), Upstream: c.Node.String(),
			State:   fmt.Sprintf("%s idle %s via %s", c.State, c.Idle.Round(time.Millisecond), c.SNAT),
			Started: c.Started, BytesUp: c.BytesUp, BytesDown: c.BytesDown,
			PacketsUp: c.PacketsUp, PacketsDown: c.PacketsDown,
		})
	}
	return out
}

func (a *attachment) nodeName(addr netip.AddrPort) string {
	for _, n := range a.svc.Nodes {
		if n.IP == addr {
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
		// A reload sets the new form of a service up before the old one
		// closes; both have its ID (the maps are keyed by the listen
		// address), so only the last of them takes it out of the maps.
		a.d.mu.Lock()
		a.nl.services[a.id]--
		last := a.nl.services[a.id] <= 0
		if last {
			delete(a.nl.services, a.id)
			delete(a.nl.names, a.id)
		}
		a.d.mu.Unlock()
		var err error
		if last && !a.d.keeping() {
			err = a.nl.l.DeleteService(a.id)
		}
		a.d.releaseSplice(a.nl, a.splice)
		a.d.release(a.nl)
		a.closeErr = err
	})
	return a.closeErr
}

// never is the idle timeout of a TCP flow whose service sets none: the
// program expires a flow when now - last_seen > timeout, which this never
// is, so the flow stays until it closes or LRU eviction makes room, as the
// relay's stream stays until it closes (idleTimeout 0 means never on every
// datapath).
const never = time.Duration(math.MaxInt64)

// loaderService translates a service for the loader. With link set, its
// nodes are reached over that splice link.
func loaderService(svc datapath.Service, link *splice.Link) (loader.Service, error) {
	st, err := bpfStrategy(svc.Strategy)
	if err != nil {
		return loader.Service{}, err
	}
	out := loader.Service{Network: svc.Network, VIP: svc.Listen, Strategy: st, IdleTimeout: svc.IdleTimeout, MaxFails: svc.MaxFails}
	switch {
	case svc.Network == "udp":
		out.IdleTimeout = svc.PacketTTL
	case out.IdleTimeout == 0:
		out.IdleTimeout = never
	}
	for _, n := range svc.Nodes {
		ap := n.IP
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
