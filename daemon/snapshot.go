package daemon

import (
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/metrics"
	"github.com/ebpfwd/ebpfwd/userspace/httpproxy"
)

var _ metrics.Source = (*Daemon)(nil)

// Snapshot reads every service's figures for a metrics scrape.
func (d *Daemon) Snapshot() []metrics.ServiceSnapshot {
	services := d.current()
	out := make([]metrics.ServiceSnapshot, 0, len(services))
	for _, s := range services {
		snap := metrics.ServiceSnapshot{
			Service:  s.cfg.Name,
			Handler:  s.cfg.Handler.Type,
			Datapath: s.plan.Datapath,
			Errors:   map[string]uint64{},
		}
		if s.att != nil {
			snap.Counters = s.att.Counters()
		}
		for _, r := range Reasons {
			snap.Errors[string(r)] = 0
		}
		if s.proxy != nil {
			for _, r := range httpproxy.Refusals {
				snap.Errors[string(r)] = 0
			}
		}
		for r, n := range s.errs.Snapshot() {
			snap.Errors[string(r)] = n
		}
		// The Limit counts its own refusals: the UDP relay asks it for
		// every new client's datagram, and counting there costs nothing
		// extra on that path.
		snap.Errors[string(ReasonFDBudget)] += s.limit.Refused()
		if kr, ok := s.att.(datapath.KernelReasoner); ok {
			if k, err := kr.KernelReasons(); err != nil {
				s.log.Warn("read kernel datapath counters", "err", err)
			} else {
				for r, n := range k.Errors {
					snap.Errors[r] += n
				}
				snap.Passed, snap.Dropped = k.Passed, k.Dropped
			}
		}
		if s.nodes != nil {
			var judged []datapath.NodeOutcomes
			if judge := datapath.NodeJudge(s.att); judge != nil {
				var err error
				if judged, err = judge.NodeOutcomes(); err != nil {
					s.log.Warn("read node outcomes from datapath", "err", err)
				}
			}
			for i, n := range s.nodes.Nodes() {
				ns := metrics.NodeState{Node: n.Name, Up: s.nodes.Healthy(n)}
				if i < len(judged) {
					ns.PassiveFailures = judged[i].Failed
				}
				snap.Nodes = append(snap.Nodes, ns)
			}
		}
		if ft, ok := s.att.(datapath.FlowTabler); ok {
			for _, t := range ft.FlowTables() {
				snap.Flows = append(snap.Flows, metrics.FlowTable{Table: t.Name, Entries: t.Entries, Capacity: t.Capacity})
			}
		}
		out = append(out, snap)
	}
	return out
}

// Fallbacks lists the services that run on a slower datapath than they
// could.
func (d *Daemon) Fallbacks() []metrics.Fallback {
	var out []metrics.Fallback
	for _, s := range d.current() {
		if s.plan.From != "" {
			out = append(out, metrics.Fallback{Service: s.cfg.Name, From: string(s.plan.From),
				To: string(s.plan.Datapath), Reason: s.plan.FallbackReason})
		}
	}
	return out
}

// Programs reads the kernel's accounting of every datapath's BPF programs.
func (d *Daemon) Programs() []datapath.ProgramStats {
	var out []datapath.ProgramStats
	for _, dp := range d.datapaths.Datapaths() {
		if pr, ok := dp.(datapath.ProgramReporter); ok {
			out = append(out, pr.Programs()...)
		}
	}
	return out
}

// Hops reads the failure marking of every chain hop's nodes.
func (d *Daemon) Hops() []metrics.HopNodeState {
	var out []metrics.HopNodeState
	d.mu.RLock()
	chains := d.chains
	d.mu.RUnlock()
	for _, c := range chains {
		for _, h := range c.Hops {
			for _, n := range h.Selector.Nodes() {
				out = append(out, metrics.HopNodeState{Chain: c.Name, Hop: h.Name, Node: n.Name, Up: h.Selector.Healthy(n)})
			}
		}
	}
	return out
}
