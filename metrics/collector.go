package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ebpfwd/ebpfwd/datapath"
)

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(prometheus.BuildFQName(namespace, "", name), help, labels, nil)
}

var (
	connectionsOpened = desc("connections_opened_total",
		"Connections (TCP streams, UDP sessions, or kernel flows) opened.", "service", "datapath")
	connectionsActive = desc("connections_active",
		"Connections open now.", "service", "datapath")
	bytesTotal = desc("bytes_total",
		"Payload bytes moved; direction up is client to node, down is node to client.", "service", "datapath", "direction")
	packetsTotal = desc("packets_total",
		"Packets moved in the kernel (tc datapath); direction up is client to node.", "service", "datapath", "direction")
	packetsPassed = desc("packets_passed_total",
		"Packets a kernel datapath left to the stack (and so to the service's listener), by reason.", "service", "datapath", "reason")
	packetsDropped = desc("packets_dropped_total",
		"Packets a kernel datapath dropped, by reason.", "service", "datapath", "reason")
	programRunTime = desc("bpf_program_run_seconds_total",
		"Time the kernel spent running a BPF program (kernel.bpf_stats_enabled; ebpfwd enables it while serving metrics).", "program", "netns")
	programRuns = desc("bpf_program_runs_total",
		"Times the kernel ran a BPF program.", "program", "netns")
	connErrors = desc("errors_total",
		"Connections that failed, by reason.", "service", "reason")
	droppedTotal = desc("dropped_datagrams_total",
		"Datagrams dropped (session limit reached, upstream could not be opened).", "service", "datapath")
	nodeUp = desc("node_up",
		"Whether a forward node is selectable (1) or marked dead by maxFails/failTimeout (0).", "service", "node")
	nodePassiveFailures = desc("node_passive_failures_total",
		"New flows a kernel datapath saw a forward node fail, by reason (refused, unreachable, syn_timeout), with no probe traffic.",
		"service", "node", "reason")
	hopNodeUp = desc("hop_node_up",
		"Whether a chain hop's node is selectable (1) or marked dead by maxFails/failTimeout (0).", "chain", "hop", "node")
	flowEntries = desc("flow_table_entries",
		"Entries in a datapath's flow table (userspace: UDP sessions; tc: conntrack).", "service", "datapath", "table")
	flowCapacity = desc("flow_table_capacity",
		"Capacity of a datapath's flow table.", "service", "datapath", "table")
	fallbacks = desc("datapath_fallback",
		"1 for each service that runs on a slower datapath than it could: the datapath it fell back from, to, and why.",
		"service", "from", "to", "reason")
	fdBudget = desc("fd_budget_descriptors",
		"The daemon's file descriptor budget (docs/CONFIG.md): part=limit (RLIMIT_NOFILE), reserved (the daemon's own), shared (what services may borrow beyond their guarantees), borrowed (of shared, in use now).",
		"part")
	splicePipes = desc("splice_pipes",
		"splice(2) pipes the userspace relay may hold at once (state=limit; 0: no bound) and holds now (state=in_use).", "state")
	spliceBuffered = desc("splice_buffered_chunks_total",
		"Chunks of relayed streams copied through a userspace buffer because every splice pipe of the allowance was in use.")
)

// Budget is the daemon's descriptor budget and the relays' splice pipe
// allowance at scrape time.
type Budget struct {
	Limit, Reserved, Shared, Borrowed int64
	PipesLimit, PipesInUse            int64
	PipesBuffered                     uint64
}

// BudgetReporter is implemented by a Source that keeps a descriptor budget.
type BudgetReporter interface {
	Budget() Budget
}

// collector turns a Source's snapshot into metrics at scrape time.
type collector struct{ src Source }

func newCollector(src Source) prometheus.Collector { return collector{src} }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{connectionsOpened, connectionsActive, bytesTotal, packetsTotal,
		packetsPassed, packetsDropped, programRunTime, programRuns, connErrors,
		droppedTotal, nodeUp, nodePassiveFailures, hopNodeUp, flowEntries, flowCapacity, fallbacks, fdBudget, splicePipes, spliceBuffered} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, s := range c.src.Snapshot() {
		dp := string(s.Datapath)
		counter(connectionsOpened, s.Counters.Opened, s.Service, dp)
		gauge(connectionsActive, float64(s.Counters.Active), s.Service, dp)
		counter(bytesTotal, s.Counters.BytesUp, s.Service, dp, "up")
		counter(bytesTotal, s.Counters.BytesDown, s.Service, dp, "down")
		if s.Datapath == datapath.TC {
			counter(packetsTotal, s.Counters.PacketsUp, s.Service, dp, "up")
			counter(packetsTotal, s.Counters.PacketsDown, s.Service, dp, "down")
		}
		if s.Handler == "udp" {
			counter(droppedTotal, s.Counters.Dropped, s.Service, dp)
		}
		for reason, n := range s.Errors {
			counter(connErrors, n, s.Service, reason)
		}
		for reason, n := range s.Passed {
			counter(packetsPassed, n, s.Service, dp, reason)
		}
		for reason, n := range s.Dropped {
			counter(packetsDropped, n, s.Service, dp, reason)
		}
		for _, n := range s.Nodes {
			gauge(nodeUp, boolValue(n.Up), s.Service, n.Node)
			for reason, v := range n.PassiveFailures {
				counter(nodePassiveFailures, v, s.Service, n.Node, reason)
			}
		}
		for _, f := range s.Flows {
			gauge(flowEntries, float64(f.Entries), s.Service, dp, f.Table)
			gauge(flowCapacity, float64(f.Capacity), s.Service, dp, f.Table)
		}
	}
	for _, h := range c.src.Hops() {
		gauge(hopNodeUp, boolValue(h.Up), h.Chain, h.Hop, h.Node)
	}
	for _, p := range c.src.Programs() {
		ch <- prometheus.MustNewConstMetric(programRunTime, prometheus.CounterValue, p.RunTime.Seconds(), p.Program, p.Netns)
		counter(programRuns, p.RunCount, p.Program, p.Netns)
	}
	for _, f := range c.src.Fallbacks() {
		gauge(fallbacks, 1, f.Service, f.From, f.To, f.Reason)
	}
	if br, ok := c.src.(BudgetReporter); ok {
		b := br.Budget()
		gauge(fdBudget, float64(b.Limit), "limit")
		gauge(fdBudget, float64(b.Reserved), "reserved")
		gauge(fdBudget, float64(b.Shared), "shared")
		gauge(fdBudget, float64(b.Borrowed), "borrowed")
		gauge(splicePipes, float64(b.PipesLimit), "limit")
		gauge(splicePipes, float64(b.PipesInUse), "in_use")
		counter(spliceBuffered, b.PipesBuffered)
	}
}

func boolValue(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
