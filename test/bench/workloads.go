package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// metricKey names one figure of the table.
type metricKey string

const (
	tputUp     metricKey = "tput_up"
	tputDown   metricKey = "tput_down"
	tputP8     metricKey = "tput_p8"
	connRateK  metricKey = "conn_rate"
	keepAliveK metricKey = "keepalive_rate"
	latP50     metricKey = "lat_p50"
	latP99     metricKey = "lat_p99"
	cpuMachine metricKey = "cpu_machine"
	cpuDaemon  metricKey = "cpu_daemon"
	rssPerConn metricKey = "rss_per_conn"
)

// sample is what one run of one contender measured. A metric that does not
// apply to the contender (daemon CPU on a kernel path) is absent.
type sample struct {
	// run is the index (from 0) of the run that measured it: ratios pair
	// a contender's sample with the baseline's sample of the same run.
	run      int
	values   map[metricKey]float64
	capacity string
	// fdsPerFlow is the most descriptors any daemon held per idle
	// connection (0 when not measured).
	fdsPerFlow float64
}

// settings are the knobs that differ between full and quick mode.
type settings struct {
	runs        int
	tputSeconds int           // per iperf3 run; iperf3 takes whole seconds
	shortRun    time.Duration // connection rate, keep-alive and latency runs
	idleConns   int
	connWorkers int
	// fdLimit is the RLIMIT_NOFILE every child inherits; HAProxy's maxconn
	// must fit in it.
	fdLimit uint64
}

// runEnv is what one contender needs in one run: its own topology, the
// binaries, a directory for its configs and the prefix of its daemons'
// instance names.
type runEnv struct {
	topo    *topology
	self    string // this driver, re-executed for the load programs
	ebpfwd  string
	haproxy string // "" when not installed
	dir     string // the contender's own: config and ready files
	// instance starts the instance name of every daemon the contender
	// starts. All contenders are up at once, so each needs names of its
	// own: an instance name picks the control socket and the bpffs pin
	// directory, and two daemons with one name cannot run side by side.
	instance string
	set      settings
}

// cpuMeter takes CPU readings of the machine and the daemons around the
// throughput runs.
type cpuMeter struct {
	machine, daemon float64
}

func readCPU(daemons []*process) (cpuMeter, error) {
	m, err := machineBusySeconds()
	if err != nil {
		return cpuMeter{}, err
	}
	c := cpuMeter{machine: m}
	for _, d := range daemons {
		v, err := processCPUSeconds(d.pid())
		if err != nil {
			return cpuMeter{}, err
		}
		c.daemon += v
	}
	return c, nil
}

// cpuCharge adds up the CPU a contender's own iperf3 runs used and the
// bytes they moved. The runs of one contender are interleaved with other
// contenders' runs, so only the time inside its own runs is charged to it.
type cpuCharge struct {
	machineSec, daemonSec, bytes float64
}

// perGB sets the CPU-per-GB figures from what was charged; nothing when no
// bytes moved (no throughput run completed).
func (c cpuCharge) perGB(daemons int, out map[metricKey]float64) {
	if c.bytes <= 0 {
		return
	}
	gb := c.bytes / 1e9
	out[cpuMachine] = c.machineSec / gb
	if daemons > 0 {
		out[cpuDaemon] = c.daemonSec / gb
	}
}

// measureThroughput runs one iperf3 client (streams streams, reverse for
// server → client), stores its rate under key and charges the CPU the
// machine and the daemons used meanwhile to charge.
func measureThroughput(ctx context.Context, e *runEnv, p *path, key metricKey, reverse bool, streams int,
	out map[metricKey]float64, charge *cpuCharge) error {
	before, err := readCPU(p.daemons)
	if err != nil {
		return err
	}
	moved, bps, err := iperf(ctx, e, p.front, reverse, streams)
	if err != nil {
		return err
	}
	after, err := readCPU(p.daemons)
	if err != nil {
		return err
	}
	out[key] = bps / 1e9
	charge.bytes += moved
	charge.machineSec += after.machine - before.machine
	charge.daemonSec += after.daemon - before.daemon
	return nil
}

// iperfReport is the part of iperf3's JSON report the benchmark reads.
type iperfReport struct {
	Error string `json:"error"`
	End   struct {
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
	} `json:"end"`
}

// iperf runs one iperf3 client in the client namespace and returns the
// bytes the receiver got and its rate in bit/s.
func iperf(ctx context.Context, e *runEnv, front string, reverse bool, streams int) (bytes, bps float64, err error) {
	args := []string{"-c", front, "-p", strconv.Itoa(portIperf), "-t", strconv.Itoa(e.set.tputSeconds),
		"-P", strconv.Itoa(streams), "-J", "--connect-timeout", "3000"}
	if reverse {
		args = append(args, "-R")
	}
	ctx, cancel := context.WithTimeout(ctx, time.Duration(e.set.tputSeconds)*time.Second+30*time.Second)
	defer cancel()
	raw, runErr := inNS(ctx, e.topo.client, "iperf3", args...).Output()
	var rep iperfReport
	if err := json.Unmarshal(raw, &rep); err != nil {
		return 0, 0, fmt.Errorf("iperf3 %v to %s: %v; output not JSON: %w", args, front, runErr, err)
	}
	if rep.Error != "" || runErr != nil {
		return 0, 0, fmt.Errorf("iperf3 %v to %s: %v: %s", args, front, runErr, rep.Error)
	}
	if rep.End.SumReceived.Bytes <= 0 {
		return 0, 0, fmt.Errorf("iperf3 %v to %s: no bytes received", args, front)
	}
	return rep.End.SumReceived.Bytes, rep.End.SumReceived.BitsPerSecond, nil
}

// loadCmd runs a load program inside the client namespace and decodes its
// JSON result into res.
func loadCmd(ctx context.Context, e *runEnv, res any, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, e.set.shortRun+60*time.Second)
	defer cancel()
	cmd := inNS(ctx, e.topo.client, e.self, append([]string{"load"}, args...)...)
	stderr := &tailBuffer{max: logTail}
	cmd.Stderr = stderr
	raw, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("load %v in namespace %s: %w: %s", args, e.topo.client.Name, err, stderr)
	}
	if err := json.Unmarshal(raw, res); err != nil {
		return fmt.Errorf("load %v: decode result %q: %w", args, raw, err)
	}
	return nil
}

func measureConnRate(ctx context.Context, e *runEnv, p *path, out map[metricKey]float64) error {
	var r connRateResult
	if err := loadCmd(ctx, e, &r, "connrate", "-addr", hostPort(p.front, portRR),
		"-duration", e.set.shortRun.String(), "-workers", strconv.Itoa(e.set.connWorkers)); err != nil {
		return err
	}
	// A few failures under load are part of the path's behaviour and are
	// left out of the rate; many mean the figure is not comparable.
	if r.Errors > 0 {
		slog.Warn("connection-rate run had failures", "front", p.front, "ok", r.Conns, "failed", r.Errors, "first", r.FirstError)
	}
	if r.Errors*100 > r.Conns {
		return fmt.Errorf("connection rate through %s: %d of %d connections failed (first: %s)", p.front, r.Errors, r.Errors+r.Conns, r.FirstError)
	}
	out[connRateK] = float64(r.Conns) / r.Seconds
	return nil
}

// measureKeepAlive takes the request rate over as many persistent
// connections as the connection-rate workload has workers.
func measureKeepAlive(ctx context.Context, e *runEnv, p *path, out map[metricKey]float64) error {
	var r keepAliveResult
	if err := loadCmd(ctx, e, &r, "keepalive", "-addr", hostPort(p.front, portEcho),
		"-duration", e.set.shortRun.String(), "-workers", strconv.Itoa(e.set.connWorkers)); err != nil {
		return err
	}
	out[keepAliveK] = float64(r.Requests) / r.Seconds
	return nil
}

func measureLatency(ctx context.Context, e *runEnv, p *path, out map[metricKey]float64) error {
	var r latencyResult
	if err := loadCmd(ctx, e, &r, "pingpong", "-addr", hostPort(p.front, portEcho),
		"-duration", e.set.shortRun.String()); err != nil {
		return err
	}
	out[latP50], out[latP99] = r.P50us, r.P99us
	return nil
}

// measureIdleRSS opens idleConns connections through the path and charges
// the daemons' VmRSS growth to them. It waits until every daemon holds two
// more file descriptors per connection (client side and upstream side), so
// the figure is taken with every relay set up, not just every handshake
// queued in the kernel.
func measureIdleRSS(ctx context.Context, e *runEnv, p *path, out map[metricKey]float64) (fdsPerFlow float64, err error) {
	n := e.set.idleConns
	baseRSS, baseFDs, err := daemonMemory(p.daemons)
	if err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := inNS(ctx, e.topo.client, e.self, "load", "hold", "-addr", hostPort(p.front, portHold), "-n", strconv.Itoa(n))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return 0, fmt.Errorf("hold: stdin pipe: %w", err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return 0, fmt.Errorf("hold: stdout pipe: %w", err)
	}
	stderr := &tailBuffer{max: logTail}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("start hold load: %w", err)
	}
	// Closing stdin releases the connections; Wait reaps the program.
	waited := false
	defer func() {
		stdin.Close()
		if !waited {
			_ = cmd.Wait()
		}
	}()

	var r holdResult
	if err := json.NewDecoder(bufio.NewReader(stdout)).Decode(&r); err != nil {
		stdin.Close()
		waited = true
		waitErr := cmd.Wait()
		return 0, fmt.Errorf("hold %d connections through %s: %w (load program: %v): %s%s", n, p.front, err, waitErr, stderr, daemonLogs(p.daemons))
	}
	// Each relay holds two sockets; a few pipes Go's splice pool kept from
	// earlier workloads may close meanwhile, hence the 2% slack.
	if !p.kernelFlows {
		if err := waitFDs(ctx, p.daemons, baseFDs, 2*n-n/50); err != nil {
			return 0, err
		}
	}
	rss, fds, err := daemonMemory(p.daemons)
	if err != nil {
		return 0, err
	}
	var growth int64
	for i, d := range p.daemons {
		perFlow := float64(fds[i]-baseFDs[i]) / float64(n)
		fdsPerFlow = max(fdsPerFlow, perFlow)
		growth += rss[i] - baseRSS[i]
		slog.Info("idle connections held", "daemon", d.name, "connections", n,
			"fds_per_connection", fmt.Sprintf("%.2f", perFlow), "rss_growth_bytes", rss[i]-baseRSS[i])
	}
	out[rssPerConn] = float64(growth) / float64(n)
	return fdsPerFlow, nil
}

// daemonMemory returns each daemon's VmRSS and open file count.
func daemonMemory(daemons []*process) (rss []int64, fds []int, err error) {
	for _, d := range daemons {
		r, err := residentBytes(d.pid())
		if err != nil {
			return nil, nil, err
		}
		f, err := openFDs(d.pid())
		if err != nil {
			return nil, nil, err
		}
		rss = append(rss, r)
		fds = append(fds, f)
	}
	return rss, fds, nil
}

// waitFDs waits until every daemon holds at least extra more descriptors
// than base and the counts have stopped changing (a relay may open more
// than its two sockets), bounded by a timeout.
func waitFDs(ctx context.Context, daemons []*process, base []int, extra int) error {
	const settleTicks = 5
	deadline := time.Now().Add(30 * time.Second)
	var last []int
	stable := 0
	for {
		ready := true
		var have []int
		for i, d := range daemons {
			f, err := openFDs(d.pid())
			if err != nil {
				return err
			}
			have = append(have, f-base[i])
			ready = ready && f-base[i] >= extra
		}
		if ready && slices.Equal(have, last) {
			stable++
		} else {
			stable = 0
		}
		if stable >= settleTicks {
			return nil
		}
		last = have
		if time.Now().After(deadline) {
			return fmt.Errorf("daemons hold %v new descriptors after 30s, want at least %d each, settled", have, extra)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func hostPort(host string, port int) string { return net.JoinHostPort(host, strconv.Itoa(port)) }

// startServers starts iperf3 and the load servers in the server namespace
// and waits until their ports listen.
func startServers(ctx context.Context, ns *topo.NS, self string) ([]*process, error) {
	specs := []struct {
		label string
		ports []int
		argv  []string
	}{
		{"iperf3 server", []int{portIperf}, []string{"iperf3", "-s", "-p", strconv.Itoa(portIperf), "--idle-timeout", "30"}},
		{"load server", []int{portRR, portEcho, portHold}, []string{self, "load", "serve"}},
	}
	var started []*process
	for _, sp := range specs {
		p, err := startIn(ns, sp.label, sp.argv[0], sp.argv[1:]...)
		if err == nil {
			started = append(started, p)
			err = p.waitReady(ctx, func() bool { return listening(p.pid(), sp.ports) })
		}
		if err != nil {
			for _, q := range started {
				_ = q.stop()
			}
			return nil, err
		}
	}
	return started, nil
}

// daemonLogs returns the daemons' recent output for an error message.
func daemonLogs(daemons []*process) string {
	var b strings.Builder
	for _, d := range daemons {
		fmt.Fprintf(&b, "\n[%s] %s", d.name, d.out)
	}
	return b.String()
}
