package main

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
)

// row is one line of the results table.
type row struct {
	key    metricKey
	title  string
	unit   string
	format string
	// ratio: print the figure's ratio to the direct path. Off for figures
	// the direct path does not have (the forwarder's CPU and memory).
	ratio bool
	// lowerBetter: less is better (latency, CPU, memory); it says which
	// side of 1 a ratio against HAProxy is ahead on.
	lowerBetter bool
}

var rows = []row{
	{tputUp, "Throughput, 1 stream, client → server", "Gbit/s", "%.2f", true, false},
	{tputDown, "Throughput, 1 stream, server → client", "Gbit/s", "%.2f", true, false},
	{tputP8, "Throughput, 8 streams, client → server", "Gbit/s", "%.2f", true, false},
	{connRateK, "New connections per second (64 B request + response, close)", "conn/s", "%.0f", true, false},
	{keepAliveK, "Keep-alive requests per second (64 B request + response, 16 connections)", "req/s", "%.0f", true, false},
	{latP50, "Request/response latency p50 (64 B, one connection)", "µs", "%.1f", true, true},
	{latP99, "Request/response latency p99 (64 B, one connection)", "µs", "%.1f", true, true},
	{cpuMachine, "Machine CPU per GB moved (all CPUs, /proc/stat)", "CPU s/GB", "%.2f", true, true},
	{cpuDaemon, "Forwarder's own CPU per GB moved (ebpfwd or HAProxy, utime+stime)", "CPU s/GB", "%.2f", false, true},
	{rssPerConn, "Forwarder RSS per idle connection (VmRSS delta / %d open)", "bytes", "%.0f", false, true},
}

// target is one of the goals, read against the table.
type target struct {
	datapath datapath.Kind
	text     string
	metrics  []metricKey
	baseline string // contender name the ratio is taken against
	// vsRival: the baseline is each contender's HAProxy rival (its
	// rival field) instead; contenders without one are not checked.
	vsRival bool
	atLeast bool // ratio must be ≥ factor; else ≤ factor
	factor  float64
}

var targets = []target{
	{datapath.TC, "tc throughput ≥ 0.95× direct", []metricKey{tputUp, tputDown, tputP8}, directName, false, true, 0.95},
	{datapath.TC, "tc connection rate ≥ 0.95× direct", []metricKey{connRateK}, directName, false, true, 0.95},
	{datapath.TC, "tc connection rate ≥ 1.5× iptables DNAT", []metricKey{connRateK}, iptablesName, false, true, 1.5},
	{datapath.TC, "tc p99 latency ≤ 1.1× direct", []metricKey{latP99}, directName, false, false, 1.1},
	{datapath.Userspace, "userspace throughput ≥ 0.75× direct", []metricKey{tputUp, tputDown, tputP8}, directName, false, true, 0.75},
	{datapath.Userspace, "userspace connection rate ≥ 0.6× direct", []metricKey{connRateK}, directName, false, true, 0.6},
	{datapath.Userspace, "userspace connection rate ≥ 1.5× HAProxy", []metricKey{connRateK}, "", true, true, 1.5},
	{datapath.Userspace, "userspace keep-alive request rate ahead of HAProxy (≥ 1×)", []metricKey{keepAliveK}, "", true, true, 1},
	{datapath.Userspace, "userspace latency ahead of HAProxy (≤ 1×)", []metricKey{latP50, latP99}, "", true, false, 1},
	{datapath.Userspace, "userspace throughput not behind HAProxy (≥ 1×)", []metricKey{tputUp, tputDown, tputP8}, "", true, true, 1},
}

// results is everything a benchmark run collected.
type results struct {
	contenders []contender
	samples    map[string][]sample // by contender name
	failures   []string
	set        settings
	quick      bool
	machine    []string // "key: value" lines
	notes      []string // conditions of this run a reader must know
	command    string
	took       time.Duration
}

// median of the figures the runs have for key; ok is false when no run has
// one.
func (r *results) median(name string, key metricKey) (float64, bool) {
	var vs []float64
	for _, s := range r.samples[name] {
		if v, ok := s.values[key]; ok {
			vs = append(vs, v)
		}
	}
	if len(vs) == 0 {
		return 0, false
	}
	return median(vs), true
}

// pairedRatio is the median over runs of name's figure divided by base's
// figure of the same run, over the runs where both have the figure (and
// base's is not 0); ok is false when there is no such run. Pairing by run
// cancels the machine's drift between runs, which a ratio of the two
// medians would keep: each median may come from a different run.
func (r *results) pairedRatio(name, base string, key metricKey) (float64, bool) {
	baseByRun := map[int]float64{}
	for _, s := range r.samples[base] {
		if v, ok := s.values[key]; ok && v != 0 {
			baseByRun[s.run] = v
		}
	}
	var ratios []float64
	for _, s := range r.samples[name] {
		v, ok := s.values[key]
		b, paired := baseByRun[s.run]
		if ok && paired {
			ratios = append(ratios, v/b)
		}
	}
	if len(ratios) == 0 {
		return 0, false
	}
	return median(ratios), true
}

func median(vs []float64) float64 {
	s := slices.Clone(vs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// capacity returns the flow-capacity text of the contender's last run.
func (r *results) capacity(name string) string {
	ss := r.samples[name]
	for i := len(ss) - 1; i >= 0; i-- {
		if ss[i].capacity != "" {
			return ss[i].capacity
		}
	}
	return "—"
}

// cell formats one figure, the median over runs, with its paired ratio to
// the direct path.
func (r *results) cell(c contender, rw row) string {
	v, ok := r.median(c.name, rw.key)
	if !ok {
		return "—"
	}
	s := fmt.Sprintf(rw.format, v)
	if !rw.ratio || c.name == directName {
		return s
	}
	if ratio, ok := r.pairedRatio(c.name, directName, rw.key); ok {
		s += fmt.Sprintf(" (%.2f×)", ratio)
	}
	return s
}

// writeTable writes the results table: one column per contender.
func (r *results) writeTable(w io.Writer) {
	header := []string{"Figure", "Unit"}
	for _, c := range r.contenders {
		header = append(header, c.name)
	}
	writeHeader(w, header)
	for _, rw := range rows {
		cells := []string{r.label(rw), rw.unit}
		for _, c := range r.contenders {
			cells = append(cells, r.cell(c, rw))
		}
		writeRow(w, cells)
	}
	cells := []string{"Flow capacity (what bounds concurrent flows)", "flows"}
	for _, c := range r.contenders {
		cells = append(cells, r.capacity(c.name))
	}
	writeRow(w, cells)
}

func writeRow(w io.Writer, cells []string) {
	fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | "))
}

// writeHeader writes a table's header row and the separator under it.
func writeHeader(w io.Writer, cells []string) {
	writeRow(w, cells)
	writeRow(w, slices.Repeat([]string{"---"}, len(cells)))
}

// label is the row's title as the table shows it: the memory row names
// the idle connections of this run.
func (r *results) label(rw row) string {
	if rw.key == rssPerConn {
		return fmt.Sprintf(rw.title, r.set.idleConns)
	}
	return rw.title
}

// verdict is one target checked against one figure of one contender.
type verdict struct {
	target, contender, figure, measured, result string
}

// verdicts checks every target against every contender of its datapath.
// A target whose datapath has no contender yet gets one "not measured"
// line, and so does an HAProxy target of a contender whose rival is not in
// the run (haproxy not installed).
func (r *results) verdicts() []verdict {
	var out []verdict
	for _, t := range targets {
		found := false
		for _, c := range r.contenders {
			if c.datapath != t.datapath || (t.vsRival && c.rival == "") {
				continue
			}
			found = true
			if t.vsRival && !r.inRun(c.rival) {
				out = append(out, verdict{t.text, c.name, "—", "—", fmt.Sprintf("not measured: no %s column in this run", c.rival)})
				continue
			}
			for _, key := range t.metrics {
				out = append(out, r.check(t, c, key))
			}
		}
		if !found {
			out = append(out, verdict{t.text, "—", "—", "—", fmt.Sprintf("not measured: no %s contender in this build", t.datapath)})
		}
	}
	return out
}

func (r *results) check(t target, c contender, key metricKey) verdict {
	v := verdict{target: t.text, contender: c.name, figure: rowTitle(key)}
	baseline := t.baseline
	if t.vsRival {
		baseline = c.rival
	}
	ratio, ok := r.pairedRatio(c.name, baseline, key)
	if !ok {
		v.measured, v.result = "—", "no data"
		return v
	}
	// Three decimals: a ratio printed as 0.75 must not read as meeting a
	// 0.75 target it missed by a hair.
	v.measured = fmt.Sprintf("%.3f× %s", ratio, baseline)
	met := ratio >= t.factor
	if !t.atLeast {
		met = ratio <= t.factor
	}
	v.result = "not met"
	if met {
		v.result = "met"
	}
	return v
}

func rowTitle(key metricKey) string {
	for _, rw := range rows {
		if rw.key == key {
			return rw.title
		}
	}
	return string(key)
}

// rivalries are the contenders that have an HAProxy rival in this run,
// in table order.
func (r *results) rivalries() []contender {
	var out []contender
	for _, c := range r.contenders {
		if c.rival != "" && r.inRun(c.rival) {
			out = append(out, c)
		}
	}
	return out
}

// inRun reports whether the contender called name is part of this run.
func (r *results) inRun(name string) bool {
	return slices.ContainsFunc(r.contenders, func(c contender) bool { return c.name == name })
}

// writeVersus writes, for every figure, each ebpfwd contender's paired
// ratio to its HAProxy rival and which of the two is ahead, so that the
// relay's standing against HAProxy reads at a glance in both forms.
func (r *results) writeVersus(w io.Writer) {
	cs := r.rivalries()
	header := []string{"Figure"}
	for _, c := range cs {
		header = append(header, c.name+" vs "+c.rival)
	}
	writeHeader(w, header)
	for _, rw := range rows {
		cells := []string{r.label(rw)}
		for _, c := range cs {
			cells = append(cells, r.versusCell(c, rw))
		}
		writeRow(w, cells)
	}
}

// versusCell is "1.234× (ahead)": c's figure over its rival's, paired by
// run, and whether that is better or worse for c.
func (r *results) versusCell(c contender, rw row) string {
	ratio, ok := r.pairedRatio(c.name, c.rival, rw.key)
	if !ok {
		// A rival at 0 (no memory growth, no CPU counted) has no ratio;
		// the figures themselves still show who is ahead.
		return "—"
	}
	better := ratio > 1
	if rw.lowerBetter {
		better = ratio < 1
	}
	word := "behind"
	switch {
	case ratio == 1:
		word = "even"
	case better:
		word = "ahead"
	}
	// Three decimals, as in the targets: a ratio a hair above 1 must not
	// print as 1.00 beside "behind".
	return fmt.Sprintf("%.3f× (%s)", ratio, word)
}

func (r *results) writeTargets(w io.Writer) {
	writeHeader(w, []string{"Target", "Contender", "Figure", "Measured", "Verdict"})
	for _, v := range r.verdicts() {
		writeRow(w, []string{v.target, v.contender, v.figure, v.measured, v.result})
	}
}

// writeReport writes the whole Markdown document: the same text goes to
// stdout and, with -write, to docs/BENCHMARKS.md, so the doc never says
// more than a run printed.
func (r *results) writeReport(w io.Writer) {
	mode := "full"
	if r.quick {
		mode = "quick (BENCH_QUICK=1)"
	}
	fmt.Fprint(w, docIntro)
	fmt.Fprintf(w, "## Latest results\n\n")
	fmt.Fprintf(w, "Command: `%s` (`make bench BENCH_WRITE=1`), mode %s: medians of %d run(s); "+
		"ratios are medians of per-run ratios; "+
		"iperf3 %d s per throughput run, %v per connection-rate, keep-alive and latency run, %d idle connections; "+
		"the whole benchmark took %v.\n\n",
		r.command, mode, r.set.runs, r.set.tputSeconds, r.set.shortRun, r.set.idleConns, r.took.Round(time.Second))
	for _, m := range r.machine {
		fmt.Fprintf(w, "- %s\n", m)
	}
	for _, n := range r.notes {
		fmt.Fprintf(w, "- Note: %s\n", n)
	}
	fmt.Fprintln(w)
	r.writeTable(w)
	fmt.Fprintf(w, "\nFigures are medians over runs. Ratios in parentheses are the median over runs of the figure divided by "+
		"the direct path's figure of the same run (runs where either failed are left out).\n")
	if len(r.failures) > 0 {
		fmt.Fprintf(w, "\nFailed runs (their figures are missing from the medians and the ratios):\n\n")
		for _, f := range r.failures {
			fmt.Fprintf(w, "- %s\n", f)
		}
	}
	if len(r.rivalries()) > 0 {
		fmt.Fprintf(w, "\n## ebpfwd userspace vs HAProxy\n\n")
		fmt.Fprintf(w, "Each cell is the ebpfwd column's figure divided by HAProxy's of the same form and the same run "+
			"(median over runs), and whether that puts ebpfwd ahead: higher is ahead for rates and throughput, lower for "+
			"latency, CPU and memory.\n\n")
		r.writeVersus(w)
	}
	fmt.Fprintf(w, "\n## Targets\n\n")
	r.writeTargets(w)
	fmt.Fprint(w, docMeasured)
}

const docIntro = `# Benchmarks

Every performance figure about ebpfwd comes from this file, and this file comes from ` + "`make bench`" + `
(` + "`test/bench/`" + `). Nothing here is asserted by a test: the benchmark measures and prints.

` + "`make bench`" + ` builds a throwaway topology of network namespaces (client → gateway → server over veth,
plus an "out" namespace with a second link to the server and a "control" namespace for the cross-namespace form)
for every contender, runs the same workloads on all of them, and removes everything again, on Ctrl-C too. Each run
sets up every contender on a fresh topology of its own, so no conntrack entry, TIME_WAIT socket or NAT table of one
contender is seen by another or by a later run. Within a run the workloads go step by step (iperf3 up, iperf3 down,
iperf3 8 streams, connection rate, keep-alive request rate, latency, idle memory), each step measuring every
contender back to back before the next step starts; each run starts the steps at the next contender, so none always
follows the same one.
` + "`BENCH_QUICK=1 make bench`" + ` is a one-run smoke version; ` + "`make bench BENCH_WRITE=1`" + ` (full mode only)
rewrites this file.

## How to read it

- The machine is shared and noisy (other work runs on it, and its speed drifts by tens of percent over tens of
  seconds), so absolute figures move from run to run. The **ratios** are what to read: each is the median over
  runs of the contender's figure divided by the baseline's figure *of the same run*, taken seconds apart in the
  same workload step, so drift between runs cancels out. The absolute figures are medians over runs, and a ratio
  is therefore not always the quotient of the two medians shown. The targets below use the same paired ratios.
- While one contender is measured, the others stay set up: their daemons sit idle in their own namespaces. They
  carry no traffic then, so they cost the machine next to nothing.
- **direct** is the ceiling: the gateway namespace only routes. **iptables** is the kernel's own port forward (DNAT to
  the server, SNAT to the gateway) with conntrack. The **ebpfwd** columns run the daemon in the gateway namespace
  (listen on the gateway, dial the server); **cross-ns** runs it in a fourth namespace, listening in the gateway and
  dialing from "out"; **+ HTTP hop** sends the service through a one-hop chain (Basic auth on the hop, as an exposed proxy needs) whose hop is a second ebpfwd running
  the ` + "`http`" + ` proxy handler (both daemons' CPU and memory are counted). **ebpfwd tc (gw ports 1024-65000)** is
  the tc column with the gateway namespace's ` + "`ip_local_port_range`" + ` at 1024-65000, as busy gateways tune it (the
  others keep 32768-65535 there): it overlaps tc's SNAT ports, which ebpfwd then reserves in the namespace.
- **HAProxy** (Debian's package, ` + "`mode tcp`" + `) is the userspace forwarder the relay is read against, and its
  columns sit next to the ebpfwd userspace column of the same form: **HAProxy** runs in the gateway namespace like
  **ebpfwd userspace**; **HAProxy cross-ns** runs in the control namespace like **ebpfwd userspace cross-ns** and
  binds in the gateway and dials from "out" with its own ` + "`namespace`" + ` keyword on ` + "`bind`" + ` and
  ` + "`server`" + `. Its configuration is generated for each run: one frontend binding the four benchmark ports and
  one backend whose server has no port (it dials the port the client connected to); ` + "`nbthread`" + ` equal to
  ebpfwd's GOMAXPROCS (the CPUs), so neither uses more cores; ` + "`maxconn`" + ` globally and per proxy the idle
  connections plus 64 (bounded by the open-file limit); ` + "`option splice-request`" + ` and
  ` + "`option splice-response`" + ` (kernel splicing both ways, always, as ebpfwd's relay does; HAProxy's own
  ` + "`splice-auto`" + ` heuristics and no splicing both moved fewer bytes here) with ` + "`maxpipes 64`" + `;
  connect timeout 5 s, client and server timeouts 10 min so that no measured flow is cut; no health checks, no
  stats, no logging. It runs in the foreground
  (` + "`-db`" + `, one process, no master) and its CPU and memory are measured like ebpfwd's. Without haproxy the
  benchmark leaves these columns out and says so.
- Higher is better for throughput, connection rate and request rate; lower is better for latency, CPU and memory.
- A new datapath (tc, sockmap) gets its columns by one line in ` + "`test/bench/contenders.go`" + `
  (` + "`ebpfwdDatapaths`" + `); its targets below then stop saying "not measured".

`

const docMeasured = `
## What each figure measures

- **Throughput**: iperf3 in the client namespace against ` + "`iperf3 -s`" + ` in the server namespace, one TCP stream
  each way and 8 parallel streams client → server; the receiver's rate.
- **New connections per second**: 16 concurrent workers in the client namespace, each opening a connection, sending
  64 bytes, reading the 64-byte answer and the server's close, then closing; completed exchanges per second. The
  server closes first, so the client's port range is not the limit.
- **Keep-alive requests per second**: 16 connections opened once in the client namespace, each sending a 64-byte
  request and reading the 64-byte echo, one at a time, for the run; completed exchanges per second. It is the cost
  of each exchange through the forwarder without the cost of a connection.
- **Latency**: one connection, one 64-byte message at a time echoed by the server; p50 and p99 of the round trip.
- **Machine CPU per GB**: busy time of all CPUs from ` + "`/proc/stat`" + ` (user, nice, system, irq, softirq, steal:
  kworkers and softirq included) during the three throughput runs, divided by the GB (10⁹ bytes) they moved. It
  includes iperf3 at both ends (the same for every contender) and whatever else the shared machine ran meanwhile.
- **Forwarder's own CPU per GB**: utime+stime of the forwarder process(es), ebpfwd's daemons or HAProxy, from
  ` + "`/proc/PID/stat`" + ` over the same runs.
- **RSS per idle connection**: the client opens 10,000 connections (fewer when the open-file limit cannot hold them;
  the results above then say how many and why) and keeps them idle; once every daemon holds at least two more
  descriptors per connection and the count has settled (every relay is set up), the growth of the forwarders' VmRSS
  divided by the connections; HAProxy is measured the same way. Kernel paths keep their per-flow state in kernel
  memory and are not measured here.
- **Flow capacity**: what bounds the number of concurrent flows. For iptables it is ` + "`nf_conntrack_max`" + ` as
  read in the gateway namespace (the count in use after the workloads is shown too); for ebpfwd it is the
  daemon's fd budget: of its open-file limit less a reserve (the descriptors open at start, 64 of headroom
  and the relays' splice pipe allowance), one service holds its guarantee (an even part of half) and the shared half,
  two descriptors per relayed stream (its sockets); the benchmark raises RLIMIT_NOFILE where it can and the daemon inherits it. For HAProxy it is its configured ` + "`maxconn`" + `. Direct routing keeps no per-flow state.
`
