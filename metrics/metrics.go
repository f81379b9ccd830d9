// Package metrics exposes ebpfwd's figures to Prometheus.
//
// Counters that already live somewhere (a datapath's atomics, a BPF map) are
// read at scrape time by a prometheus.Collector, never copied on the hot
// path. Only what has no other home (dial latency histograms) is recorded
// as it happens, through a Recorder.
package metrics

import (
	"runtime"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/ebpfwd/ebpfwd/datapath"
)

const namespace = "ebpfwd"

// ServiceSnapshot is one service's state at scrape time.
type ServiceSnapshot struct {
	Service  string
	Handler  string // tcp, udp, http
	Datapath datapath.Kind
	Counters datapath.Counters
	// Errors counts failed connections by reason (a small fixed set).
	Errors map[string]uint64
	// Nodes are the service's forward nodes with their failure marking.
	Nodes []NodeState
	// Flows is the service's flow table, when its datapath keeps one.
	Flows []FlowTable
	// Passed and Dropped count a kernel datapath's packets left to the
	// stack and dropped, by reason.
	Passed, Dropped map[string]uint64
}

// NodeState is one forward node's up/down state from failure marking.
type NodeState struct {
	Node string
	Up   bool
	// PassiveFailures are the node's failed new flows as the datapath
	// judged them, by reason; nil when the datapath judges none (the
	// relay's dial failures count in Errors).
	PassiveFailures map[string]uint64
}

// HopNodeState is one chain hop node's up/down state.
type HopNodeState struct {
	Chain, Hop, Node string
	Up               bool
}

// FlowTable is a datapath's own state table: UDP sessions for userspace,
// conntrack for tc.
type FlowTable struct {
	Table    string
	Entries  uint64
	Capacity uint64
}

// Fallback records that a service did not get the datapath it could have.
type Fallback struct {
	Service, From, To, Reason string
}

// Source is what the daemon exposes to the collector.
type Source interface {
	Snapshot() []ServiceSnapshot
	Fallbacks() []Fallback
	// Hops are the chains' hop nodes with their failure marking.
	Hops() []HopNodeState
	// Programs is the kernel's accounting of ebpfwd's BPF programs.
	Programs() []datapath.ProgramStats
}

// Registry builds the registry ebpfwd serves: the Go and process
// collectors, build info, config load state, and the daemon's collector.
func Registry(src Source, rec *Recorder, version string, loadedAt time.Time) *prometheus.Registry {
	if rec == nil {
		rec = NewRecorder() // its series still exist, at their initial values
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newCollector(src),
		rec.dial,
	)
	buildInfo := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace:   namespace,
		Name:        "build_info",
		Help:        "ebpfwd's version and the Go version it was built with; always 1.",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	buildInfo.Set(1)
	// The start's load counts as the first successful one.
	rec.ConfigLoaded(true, loadedAt)
	reg.MustRegister(buildInfo, rec.reloadOK, rec.reloadTime)
	return reg
}

// Recorder records what only exists as an event: how long dials take,
// how configuration loads went. A nil *Recorder records nothing.
type Recorder struct {
	dial *prometheus.HistogramVec
	// Reloads, named as Prometheus itself names them.
	reloadOK, reloadTime prometheus.Gauge
}

// NewRecorder makes a Recorder; Registry registers it.
func NewRecorder() *Recorder {
	return &Recorder{
		dial: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace,
			Name:      "dial_duration_seconds",
			Help:      "Time to reach a node (kind=node, including any chain) or a chain hop's node (kind=hop), by outcome.",
			// 100µs (same host) to 10s (the dial timeout).
			Buckets: prometheus.ExponentialBucketsRange(0.0001, 10, 16),
		}, []string{"service", "kind", "name", "result"}),
		reloadOK: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "config_last_reload_successful",
			Help: "Whether the last configuration load (start, SIGHUP or ebpfwd reload) succeeded (1) or was refused (0).",
		}),
		reloadTime: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: namespace, Name: "config_last_reload_success_timestamp_seconds",
			Help: "When the configuration was last loaded successfully, in seconds since the epoch.",
		}),
	}
}

// ConfigLoaded records the outcome of a configuration load at time at.
func (r *Recorder) ConfigLoaded(ok bool, at time.Time) {
	if r == nil {
		return
	}
	if !ok {
		r.reloadOK.Set(0)
		return
	}
	r.reloadOK.Set(1)
	r.reloadTime.Set(float64(at.UnixNano()) / 1e9)
}

// DeclareDial creates a dial's series at zero for both outcomes, so that
// its first observation shows in rate().
func (r *Recorder) DeclareDial(service, kind, name string) {
	if r == nil {
		return
	}
	for _, result := range []string{"ok", "error"} {
		r.dial.WithLabelValues(service, kind, name, result)
	}
}

// ObserveDial records one dial attempt.
func (r *Recorder) ObserveDial(service, kind, name string, took time.Duration, err error) {
	if r == nil {
		return
	}
	result := "ok"
	if err != nil {
		result = "error"
	}
	r.dial.WithLabelValues(service, kind, name, result).Observe(took.Seconds())
}
