package main

import (
	"bytes"
	"context"
	"errors"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

func TestParseMachineBusy(t *testing.T) {
	tests := []struct {
		name    string
		stat    string
		want    float64
		wantErr bool
	}{
		// busy = user+nice+system+irq+softirq+steal = 100+10+50+5+20+15 = 200 ticks.
		{"all fields", "cpu  100 10 50 9999 40 5 20 15 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n", 2.0, false},
		{"guest not double counted", "cpu 100 0 0 0 0 0 0 0 100 0\n", 1.0, false},
		{"no cpu line", "intr 1 2 3\n", 0, true},
		{"too few fields", "cpu 1 2 3\n", 0, true},
		{"not a number", "cpu 1 x 3 4 5 6 7 8 9 10\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMachineBusy([]byte(tt.stat))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("busy = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseProcessCPU(t *testing.T) {
	fields := func(utime, stime string) string {
		// Fields 3..13, then utime (14) and stime (15), then more.
		return "S 1 2 3 4 5 6 7 8 9 10 " + utime + " " + stime + " 0 0 20 0 1"
	}
	tests := []struct {
		name    string
		stat    string
		want    float64
		wantErr bool
	}{
		{"plain", "42 (ebpfwd) " + fields("150", "50"), 2.0, false},
		{"name with spaces and parens", "42 (a (b) c) " + fields("1", "99"), 1.0, false},
		{"no name", "42 ebpfwd S 1", 0, true},
		{"truncated", "42 (ebpfwd) S 1 2 3", 0, true},
		{"not a number", "42 (ebpfwd) " + fields("x", "1"), 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcessCPU([]byte(tt.stat))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("cpu = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestParseStatusKiB(t *testing.T) {
	status := "Name:\tebpfwd\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t5\n"
	tests := []struct {
		key     string
		want    int64
		wantErr bool
	}{
		{"VmRSS", 1234 << 10, false},
		{"VmPeak", 9000 << 10, false},
		{"VmSwap", 0, true},
		{"Threads", 0, true}, // no kB unit
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			got, err := parseStatusKiB(strings.NewReader(status), tt.key)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("%s = %d, want %d", tt.key, got, tt.want)
			}
		})
	}
}

func TestParseOpenFileLimit(t *testing.T) {
	const header = "Limit                     Soft Limit           Hard Limit           Units     \n"
	tests := []struct {
		name    string
		limits  string
		want    int64
		wantErr bool
	}{
		{"number", header + "Max open files            20000                40000                files     \n", 20000, false},
		{"unlimited", header + "Max open files            unlimited            unlimited            files     \n", -1, false},
		{"missing", header + "Max processes             100                  100                  processes\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseOpenFileLimit([]byte(tt.limits))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Fatalf("limit = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestListeningPorts(t *testing.T) {
	table := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:1B58 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000000000000000000000000000:1B59 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 3
`
	got := listeningPorts([]byte(table))
	for port, want := range map[int]bool{5201: true, 7001: true, 7000: false, 80: false} {
		if got[port] != want {
			t.Errorf("port %d listening = %v, want %v", port, got[port], want)
		}
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		in   []float64
		want float64
	}{
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.in...)
		if got := median(tt.in); got != tt.want {
			t.Errorf("median(%v) = %v, want %v", tt.in, got, tt.want)
		}
		for i := range in {
			if in[i] != tt.in[i] {
				t.Fatalf("median reordered its input: %v", tt.in)
			}
		}
	}
}

func TestPercentile(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 100; i++ {
		s = append(s, time.Duration(i))
	}
	tests := []struct {
		samples []time.Duration
		q       float64
		want    time.Duration
	}{
		{s, 0.50, 50},
		{s, 0.99, 99},
		{s, 1.0, 100},
		{s[:1], 0.99, 1},
		{nil, 0.5, 0},
	}
	for _, tt := range tests {
		if got := percentile(tt.samples, tt.q); got != tt.want {
			t.Errorf("percentile(%d samples, %v) = %v, want %v", len(tt.samples), tt.q, got, tt.want)
		}
	}
}

func TestIdleConnections(t *testing.T) {
	tests := []struct {
		limit uint64
		want  int
	}{
		{1 << 20, 10000},
		{1 << 20, 10000},
		// 4 services: (2244 + 8976) / 2 streams of 17952 pooled fds.
		{20000, 5610},
		{100, 0},
	}
	for _, tt := range tests {
		if got := idleConnections(tt.limit); got != tt.want {
			t.Errorf("idleConnections(%d) = %d, want %d", tt.limit, got, tt.want)
		}
	}
}

func TestDaemonCapacity(t *testing.T) {
	tests := []struct {
		limit int64
		fds   float64
		want  string
	}{
		{-1, 6, "RLIMIT_NOFILE unlimited"},
		{20000, 0, "not measured"},
		{20000, 2, "RLIMIT_NOFILE 20000 less its reserve, 2 fds per stream ≈ 5610 flows (2.0 held per idle flow)"},
	}
	for _, tt := range tests {
		if got := daemonCapacity(tt.limit, tt.fds); !strings.Contains(got, tt.want) {
			t.Errorf("daemonCapacity(%d, %v) = %q, want it to contain %q", tt.limit, tt.fds, got, tt.want)
		}
	}
}

// runsOf builds results whose contenders have samples for key in the runs
// given (run → value); a run missing from a map has no sample.
func runsOf(key metricKey, byName map[string]map[int]float64, cs ...contender) *results {
	r := &results{contenders: cs, samples: map[string][]sample{}, set: settings{runs: 3, idleConns: 10}}
	for name, runs := range byName {
		for run, v := range runs {
			r.samples[name] = append(r.samples[name], sample{run: run, values: map[metricKey]float64{key: v}})
		}
	}
	return r
}

func TestPairedRatio(t *testing.T) {
	const name, base = "ebpfwd tc", directName
	tests := []struct {
		desc      string
		contender map[int]float64
		baseline  map[int]float64
		want      float64
		wantOK    bool
	}{
		{"one run", map[int]float64{0: 8}, map[int]float64{0: 10}, 0.8, true},
		{"odd count: middle ratio", map[int]float64{0: 9, 1: 22, 2: 15}, map[int]float64{0: 10, 1: 20, 2: 15}, 1.0, true},
		// Medians 25 and 20 would give 1.25; the per-run ratios are 2.5, 0.5 and 35/30.
		{"not the ratio of medians", map[int]float64{0: 25, 1: 10, 2: 35}, map[int]float64{0: 10, 1: 20, 2: 30}, 35.0 / 30, true},
		{"even count: mean of middle two", map[int]float64{0: 9, 1: 11}, map[int]float64{0: 10, 1: 10}, 1.0, true},
		{"baseline missing in a run", map[int]float64{0: 8, 1: 5}, map[int]float64{0: 10}, 0.8, true},
		{"contender missing runs", map[int]float64{1: 9}, map[int]float64{0: 10, 1: 10, 2: 10}, 0.9, true},
		{"four runs, one unpaired: odd count left", map[int]float64{0: 7, 1: 8, 2: 9, 3: 1}, map[int]float64{0: 10, 1: 10, 2: 10}, 0.8, true},
		{"zero baseline left out", map[int]float64{0: 5, 1: 9}, map[int]float64{0: 0, 1: 10}, 0.9, true},
		{"no common run", map[int]float64{0: 1}, map[int]float64{1: 1}, 0, false},
		{"baseline only zero", map[int]float64{0: 5}, map[int]float64{0: 0}, 0, false},
		{"no contender samples", nil, map[int]float64{0: 10}, 0, false},
		{"no baseline samples", map[int]float64{0: 10}, nil, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			r := runsOf(tputUp, map[string]map[int]float64{name: tt.contender, base: tt.baseline})
			got, ok := r.pairedRatio(name, base, tputUp)
			if ok != tt.wantOK || math.Abs(got-tt.want) > 1e-9 {
				t.Fatalf("pairedRatio = %v, %v; want %v, %v", got, ok, tt.want, tt.wantOK)
			}
		})
	}
}

// TestPairedRatioOtherMetric checks that a run whose sample lacks the
// figure (the metric failed or does not apply) is not paired.
func TestPairedRatioOtherMetric(t *testing.T) {
	r := &results{samples: map[string][]sample{
		directName:  {{run: 0, values: map[metricKey]float64{tputUp: 10}}, {run: 1, values: map[metricKey]float64{tputUp: 10}}},
		"ebpfwd tc": {{run: 0, values: map[metricKey]float64{tputUp: 7}}, {run: 1, values: map[metricKey]float64{tputDown: 9}}},
	}}
	if got, ok := r.pairedRatio("ebpfwd tc", directName, tputUp); !ok || got != 0.7 {
		t.Fatalf("pairedRatio = %v, %v; want 0.7, true", got, ok)
	}
}

func TestRotated(t *testing.T) {
	xs := []string{"a", "b", "c"}
	tests := []struct {
		run  int
		want []string
	}{
		{0, []string{"a", "b", "c"}},
		{1, []string{"b", "c", "a"}},
		{2, []string{"c", "a", "b"}},
		{3, []string{"a", "b", "c"}},
		{7, []string{"b", "c", "a"}},
	}
	for _, tt := range tests {
		if got := rotated(xs, tt.run); !slices.Equal(got, tt.want) {
			t.Errorf("rotated(%v, %d) = %v, want %v", xs, tt.run, got, tt.want)
		}
	}
	if !slices.Equal(xs, []string{"a", "b", "c"}) {
		t.Fatalf("rotated changed its input: %v", xs)
	}
	if got := rotated([]string(nil), 3); len(got) != 0 {
		t.Fatalf("rotated(nil) = %v, want empty", got)
	}
	// Over n runs every element goes first once and follows each other
	// element at most n-1 times: no pair is fixed.
	first := map[string]int{}
	follows := map[[2]string]int{}
	for run := range len(xs) {
		order := rotated(xs, run)
		first[order[0]]++
		for i := 1; i < len(order); i++ {
			follows[[2]string{order[i-1], order[i]}]++
		}
	}
	for _, x := range xs {
		if first[x] != 1 {
			t.Errorf("%s went first %d times in %d runs, want once", x, first[x], len(xs))
		}
	}
	for pair, n := range follows {
		if n >= len(xs) {
			t.Errorf("%s followed %s in all %d runs", pair[1], pair[0], n)
		}
	}
}

// TestBenchRunInterleaves runs the step loop with fake contenders: steps go
// one at a time across all contenders in the rotated order, a contender
// that fails skips its later steps while the others go on, one that fails
// its set-up runs no step, and a step is skipped where it does not apply.
func TestBenchRunInterleaves(t *testing.T) {
	cs := []contender{{name: "a"}, {name: "b"}, {name: "c"}, {name: "d"}, {name: "e"}}
	var log []string
	step := func(name string, failFor string) workloadStep {
		return workloadStep{name: name, applies: func(p *path) bool { return !p.kernelFlows }, run: func(_ context.Context, st *stage) error {
			log = append(log, name+":"+st.c.name)
			if st.c.name == failFor {
				return errors.New("boom")
			}
			st.sample.values[metricKey(name)] = 1
			return nil
		}}
	}
	steps := []workloadStep{step("s1", ""), step("s2", "b"), step("s3", "")}
	setUp := func(_ context.Context, st *stage) error {
		if st.c.name == "d" {
			return errors.New("no namespace")
		}
		// e's path is one the fake steps do not apply to.
		st.path = &path{kernelFlows: st.c.name == "e", capacity: func(context.Context, float64) string { return "cap " + st.c.name }}
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stages := benchRun(ctx, 1, cs, steps, setUp)

	wantLog := []string{"s1:b", "s1:c", "s1:a", "s2:b", "s2:c", "s2:a", "s3:c", "s3:a"}
	if !slices.Equal(log, wantLog) {
		t.Fatalf("steps ran in order %v, want %v", log, wantLog)
	}
	if len(stages) != len(cs) {
		t.Fatalf("%d stages, want %d", len(stages), len(cs))
	}
	for i, st := range stages {
		if st.c.name != cs[i].name {
			t.Fatalf("stage %d is %s, want %s (contender order)", i, st.c.name, cs[i].name)
		}
		if st.sample.run != 1 {
			t.Errorf("%s: sample of run %d, want 1", st.c.name, st.sample.run)
		}
		if st.path != nil {
			t.Errorf("%s: path not torn down", st.c.name)
		}
	}
	wantErr := map[string]string{"a": "", "b": "s2: boom", "c": "", "d": "set up: no namespace", "e": ""}
	for _, st := range stages {
		got := ""
		if st.err != nil {
			got = st.err.Error()
		}
		if got != wantErr[st.c.name] {
			t.Errorf("%s: err %q, want %q", st.c.name, got, wantErr[st.c.name])
		}
		wantValues := 3
		if st.c.name == "e" {
			wantValues = 0
		}
		if st.err == nil && (len(st.sample.values) != wantValues || st.sample.capacity != "cap "+st.c.name) {
			t.Errorf("%s: sample %+v, want %d step figures and the capacity", st.c.name, st.sample, wantValues)
		}
	}
}

// TestBenchRunStopsOnCancel checks that an interrupted run stops between
// steps and still tears every contender down.
func TestBenchRunStopsOnCancel(t *testing.T) {
	cs := []contender{{name: "a"}, {name: "b"}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ran := 0
	steps := []workloadStep{{name: "s1", run: func(context.Context, *stage) error {
		ran++
		cancel() // as if Ctrl-C came during the first contender's step
		return nil
	}}, {name: "s2", run: func(context.Context, *stage) error { ran++; return nil }}}
	stages := benchRun(ctx, 0, cs, steps, func(_ context.Context, st *stage) error {
		st.path = &path{capacity: func(context.Context, float64) string { return "" }}
		return nil
	})
	if ran != 1 {
		t.Fatalf("%d steps ran after the cancel, want only the one that cancelled", ran)
	}
	for _, st := range stages {
		if st.path != nil {
			t.Errorf("%s: path not torn down after the cancel", st.c.name)
		}
	}
}

func TestCPUChargePerGB(t *testing.T) {
	tests := []struct {
		desc        string
		charge      cpuCharge
		daemons     int
		wantMachine float64
		wantDaemon  float64 // -1: absent
	}{
		{"daemon path", cpuCharge{machineSec: 6, daemonSec: 2, bytes: 4e9}, 1, 1.5, 0.5},
		{"kernel path: no daemon figure", cpuCharge{machineSec: 3, bytes: 3e9}, 0, 1, -1},
		{"nothing moved: no figures", cpuCharge{machineSec: 3}, 1, -1, -1},
	}
	for _, tt := range tests {
		t.Run(tt.desc, func(t *testing.T) {
			out := map[metricKey]float64{}
			tt.charge.perGB(tt.daemons, out)
			for key, want := range map[metricKey]float64{cpuMachine: tt.wantMachine, cpuDaemon: tt.wantDaemon} {
				got, ok := out[key]
				if want < 0 && ok {
					t.Errorf("%s = %v, want absent", key, got)
				}
				if want >= 0 && (!ok || got != want) {
					t.Errorf("%s = %v (present %v), want %v", key, got, ok, want)
				}
			}
		})
	}
}

// TestInstancePrefixes checks that the daemons of different contenders get
// different instance names (they run side by side), valid for ebpfwd.
func TestInstancePrefixes(t *testing.T) {
	seen := map[string]string{}
	for _, c := range contenders() {
		p := instancePrefix(c.name)
		if other, dup := seen[p]; dup {
			t.Errorf("contenders %q and %q share the instance prefix %q", other, c.name, p)
		}
		seen[p] = c.name
		for _, role := range []string{"gateway", "cross-ns", "hop-proxy", "chained"} {
			if err := daemon.ValidateInstance(p + "-" + role); err != nil {
				t.Errorf("contender %q, role %s: %v", c.name, role, err)
			}
		}
	}
	if got, want := instancePrefix("ebpfwd userspace + HTTP hop"), "bench-ebpfwd-userspace-http-hop"; got != want {
		t.Errorf("instancePrefix = %q, want %q", got, want)
	}
}

// fakeResults builds results with one sample per contender.
func fakeResults(values map[string]map[metricKey]float64, cs ...contender) *results {
	r := &results{contenders: cs, samples: map[string][]sample{}, set: settings{runs: 1, idleConns: 10}}
	for name, v := range values {
		r.samples[name] = []sample{{values: v}}
	}
	return r
}

func TestVerdicts(t *testing.T) {
	direct := contender{name: directName}
	ipt := contender{name: iptablesName}
	us := contender{name: "ebpfwd userspace", datapath: datapath.Userspace}
	r := fakeResults(map[string]map[metricKey]float64{
		directName:         {tputUp: 10, tputDown: 10, connRateK: 1000},
		iptablesName:       {tputUp: 9, connRateK: 900},
		"ebpfwd userspace": {tputUp: 8, tputDown: 7, connRateK: 600},
	}, direct, ipt, us)
	got := map[string]string{}
	for _, v := range r.verdicts() {
		got[v.target+"/"+v.contender+"/"+v.figure] = v.result
	}
	want := map[string]string{
		"userspace throughput ≥ 0.75× direct/ebpfwd userspace/" + rowTitle(tputUp):        "met",     // 0.8
		"userspace throughput ≥ 0.75× direct/ebpfwd userspace/" + rowTitle(tputDown):      "not met", // 0.7
		"userspace throughput ≥ 0.75× direct/ebpfwd userspace/" + rowTitle(tputP8):        "no data",
		"userspace connection rate ≥ 0.6× direct/ebpfwd userspace/" + rowTitle(connRateK): "met", // exactly 0.6
		"tc throughput ≥ 0.95× direct/—/—":                                                "not measured: no tc contender in this build",
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: verdict %q, want %q", k, got[k], w)
		}
	}
}

// TestVerdictsPaired: the machine drifts between runs; the verdict must
// follow the per-run ratios, not the ratio of the medians (19/20 = 0.95
// would meet the target).
func TestVerdictsPaired(t *testing.T) {
	tc := contender{name: "ebpfwd tc", datapath: datapath.TC}
	r := runsOf(tputUp, map[string]map[int]float64{
		directName: {0: 10, 1: 20, 2: 30},
		tc.name:    {0: 9.4, 1: 28.5, 2: 19}, // ratios 0.94, 1.425, 0.633
	}, contender{name: directName}, tc)
	tgt := targets[0]
	if tgt.text != "tc throughput ≥ 0.95× direct" {
		t.Fatalf("targets[0] is %q; update the test", tgt.text)
	}
	v := r.check(tgt, tc, tputUp)
	if v.result != "not met" || v.measured != "0.940× "+directName {
		t.Fatalf("verdict %q, measured %q; want not met at 0.940×", v.result, v.measured)
	}
	var b bytes.Buffer
	r.writeTable(&b)
	if want := "| 20.00 | 19.00 (0.94×) |"; !strings.Contains(b.String(), want) {
		t.Fatalf("table lacks %q (median figures, paired ratio):\n%s", want, b.String())
	}
}

func TestCheckAtMost(t *testing.T) {
	tc := contender{name: "ebpfwd tc", datapath: datapath.TC}
	tgt := target{datapath: datapath.TC, text: "p99", metrics: []metricKey{latP99}, baseline: directName, factor: 1.1}
	tests := []struct {
		p99  float64
		want string
	}{{100, "met"}, {110, "met"}, {111, "not met"}}
	for _, tt := range tests {
		r := fakeResults(map[string]map[metricKey]float64{directName: {latP99: 100}, tc.name: {latP99: tt.p99}},
			contender{name: directName}, tc)
		if got := r.check(tgt, tc, latP99).result; got != tt.want {
			t.Errorf("p99 %v vs direct 100, target ≤ 1.1×: %q, want %q", tt.p99, got, tt.want)
		}
	}
}

func TestTableCells(t *testing.T) {
	direct := contender{name: directName}
	us := contender{name: "ebpfwd userspace", datapath: datapath.Userspace}
	r := fakeResults(map[string]map[metricKey]float64{
		directName:         {tputUp: 10},
		"ebpfwd userspace": {tputUp: 7.5, cpuDaemon: 0.5},
	}, direct, us)
	var b bytes.Buffer
	r.writeTable(&b)
	out := b.String()
	for _, want := range []string{
		"| Throughput, 1 stream, client → server | Gbit/s | 10.00 | 7.50 (0.75×) |",
		"| Forwarder's own CPU per GB moved (ebpfwd or HAProxy, utime+stime) | CPU s/GB | — | 0.50 |",
		"(VmRSS delta / 10 open)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
}

// TestForwardConfigParses checks that every generated daemon config is one
// ebpfwd's parser accepts, with the services and namespaces meant.
func TestForwardConfigParses(t *testing.T) {
	tests := []struct {
		name string
		yaml string
	}{
		{"gateway", forwardConfig(datapath.Userspace, serviceSpec{target: serverIP})},
		{"cross-ns", forwardConfig(datapath.Userspace, serviceSpec{listenNS: "ebpfwd-bench-x-gw", outNS: "ebpfwd-bench-x-out", target: serverOutIP})},
		{"chained", forwardConfig(datapath.Userspace, serviceSpec{target: serverIP, chain: "bench-chain"}) + strings.Replace(chainConfig, "%s", hopAddr, 1)},
		{"hop proxy", strings.Replace(hopProxyConfig, "%s", hopAddr, 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, warns, err := config.Parse(tt.name+".yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatalf("ebpfwd rejects the generated config: %v\n%s", err, tt.yaml)
			}
			if len(warns) > 0 {
				t.Fatalf("ebpfwd warns about the generated config: %v", warns)
			}
			if tt.name == "hop proxy" {
				return
			}
			if len(cfg.Services) != len(allPorts) {
				t.Fatalf("%d services, want one per port (%d)", len(cfg.Services), len(allPorts))
			}
		})
	}
}

// TestLoadPrograms runs the connection-rate and latency programs against
// the load servers on loopback.
func TestLoadPrograms(t *testing.T) {
	listen := func(h func(net.Conn)) string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go acceptLoop(l, h)
		return l.Addr().String()
	}
	rr, echo := listen(serveRR), listen(serveEcho)

	cr, err := connRate(rr, 300*time.Millisecond, 4)
	if err != nil {
		t.Fatalf("connRate: %v", err)
	}
	if cr.Conns == 0 || cr.Errors != 0 {
		t.Fatalf("connRate = %+v, want connections and no errors", cr)
	}

	ka, err := keepAlive(echo, 200*time.Millisecond, 3)
	if err != nil {
		t.Fatalf("keepAlive: %v", err)
	}
	if ka.Requests == 0 || ka.Seconds <= 0 {
		t.Fatalf("keepAlive = %+v, want exchanges", ka)
	}

	lat, err := pingPong(echo, 200*time.Millisecond)
	if err != nil {
		t.Fatalf("pingPong: %v", err)
	}
	if lat.Samples == 0 || lat.P50us <= 0 || lat.P99us < lat.P50us {
		t.Fatalf("pingPong = %+v, want samples with 0 < p50 <= p99", lat)
	}

	// A server that closes without answering must fail every exchange.
	mute := listen(func(c net.Conn) { c.Close() })
	if res, err := connRate(mute, 100*time.Millisecond, 2); err == nil {
		t.Fatalf("connRate against a mute server succeeded: %+v", res)
	}
	if res, err := keepAlive(mute, 100*time.Millisecond, 2); err == nil {
		t.Fatalf("keepAlive against a mute server succeeded: %+v", res)
	}
}

func TestTailBuffer(t *testing.T) {
	b := &tailBuffer{max: 5}
	for _, s := range []string{"ab", "cdef", "gh"} {
		b.Write([]byte(s))
	}
	if got := b.String(); got != "defgh" {
		t.Fatalf("tail = %q, want %q", got, "defgh")
	}
}

// TestHAProxyConfig checks the generated HAProxy configurations: what
// they set, and (where haproxy is installed) that haproxy accepts them.
// The cross-namespace one names namespaces, which `haproxy -c` opens, so
// checking it needs root to create two throwaway ones.
func TestHAProxyConfig(t *testing.T) {
	tests := []struct {
		name   string
		spec   haproxySpec
		wantNS bool
	}{
		{"gateway", haproxySpec{target: serverIP, threads: 2, maxconn: 10064}, false},
		{"cross-ns", haproxySpec{listenNS: "GW", outNS: "OUT", target: serverOutIP, threads: 2, maxconn: 10064}, true},
	}
	bin := findHAProxy()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := haproxyConfig(tt.spec)
			want := []string{"mode tcp", "nbthread 2", "maxconn 10064", "option splice-request", "option splice-response", "timeout client 10m",
				"server server " + tt.spec.target}
			for _, port := range allPorts {
				want = append(want, "bind "+hostPort(gatewayIP, port))
			}
			if tt.wantNS {
				want = append(want, " namespace GW\n", "server server "+serverOutIP+" namespace OUT\n")
			}
			for _, w := range want {
				if !strings.Contains(cfg, w) {
					t.Errorf("config lacks %q:\n%s", w, cfg)
				}
			}
			if strings.Contains(cfg, "log ") {
				t.Errorf("config logs; the benchmark measures HAProxy without logging:\n%s", cfg)
			}
			if bin == "" {
				t.Skip("haproxy not installed: config not checked by haproxy -c")
			}
			if tt.wantNS {
				if os.Geteuid() != 0 {
					t.Skip("checking the cross-namespace config needs root (haproxy -c opens its namespaces)")
				}
				tt.spec.listenNS = testNamespace(t, "gw")
				tt.spec.outNS = testNamespace(t, "out")
				cfg = haproxyConfig(tt.spec)
			}
			file := filepath.Join(t.TempDir(), "haproxy.cfg")
			if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if out, err := exec.CommandContext(ctx, bin, "-c", "-f", file).CombinedOutput(); err != nil {
				t.Fatalf("haproxy -c rejects the generated config: %v\n%s\n%s", err, out, cfg)
			}
		})
	}
}

// testNamespace creates an empty throwaway namespace, removed at the end
// of the test.
func testNamespace(t *testing.T, role string) string {
	t.Helper()
	ns, err := topo.CreateUnique("bench-test-" + role)
	if err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Errorf("remove namespace: %v", err)
		}
	})
	return ns.Name
}

// TestHAProxyMaxconn: maxconn covers the idle connections and fits, with
// its pipes and headroom, in the open-file limit (HAProxy refuses to start
// otherwise).
func TestHAProxyMaxconn(t *testing.T) {
	for _, limit := range []uint64{20000, 1 << 18} {
		idle := idleConnections(limit)
		got := haproxyMaxconn(idle, limit)
		if got < idle {
			t.Errorf("limit %d: maxconn %d below the %d idle connections", limit, got, idle)
		}
		if need := 2*got + 2*haproxyPipes + haproxyFDHeadroom; uint64(need) > limit {
			t.Errorf("limit %d: maxconn %d needs %d descriptors", limit, got, need)
		}
	}
	if got := haproxyMaxconn(10000, 1<<18); got != 10064 {
		t.Errorf("maxconn = %d with room to spare, want the idle connections plus 64", got)
	}
}

// TestHAProxyContenders: HAProxy's columns follow the userspace columns of
// their form, are rivals of those, and go when haproxy is missing; -only
// keeps a contender's rival.
func TestHAProxyContenders(t *testing.T) {
	names := func(cs []contender) []string {
		var out []string
		for _, c := range cs {
			out = append(out, c.name)
		}
		return out
	}
	all := selectContenders("", true)
	got := names(all)
	for i, n := range got {
		want := map[string]string{haproxyName: "ebpfwd userspace", haproxyCrossNSName: "ebpfwd userspace cross-ns"}[n]
		if want != "" && (i == 0 || got[i-1] != want || all[i-1].rival != n) {
			t.Errorf("%s does not follow %s as its rival: %v", n, want, got)
		}
	}
	if !slices.Contains(got, haproxyName) || !slices.Contains(got, haproxyCrossNSName) {
		t.Errorf("HAProxy contenders missing: %v", got)
	}
	for _, n := range names(selectContenders("", false)) {
		if strings.Contains(n, "HAProxy") {
			t.Errorf("without haproxy the contenders still include %s", n)
		}
	}
	if got, want := names(selectContenders("userspace cross-ns", true)), []string{directName, "ebpfwd userspace cross-ns", haproxyCrossNSName}; !slices.Equal(got, want) {
		t.Errorf("-only userspace cross-ns: %v, want %v", got, want)
	}
}

// TestReportHAProxy checks the report's HAProxy parts: the columns beside
// the userspace ones, the versus table with who is ahead, and the HAProxy
// targets; without HAProxy in the run, the targets say not measured.
func TestReportHAProxy(t *testing.T) {
	cs := selectContenders("", true)
	vals := map[string]map[metricKey]float64{
		directName:                  {connRateK: 1000, latP50: 50, tputUp: 10},
		"ebpfwd userspace":          {connRateK: 600, latP50: 100, tputUp: 8, rssPerConn: 18000},
		haproxyName:                 {connRateK: 500, latP50: 80, tputUp: 8, rssPerConn: 12000},
		"ebpfwd userspace cross-ns": {connRateK: 900},
		haproxyCrossNSName:          {connRateK: 500},
	}
	r := fakeResults(vals, cs...)
	var b bytes.Buffer
	r.writeReport(&b)
	out := b.String()
	for _, want := range []string{
		"| ebpfwd userspace | HAProxy | ebpfwd userspace cross-ns | HAProxy cross-ns |",
		"## ebpfwd userspace vs HAProxy",
		"| Figure | ebpfwd userspace vs HAProxy | ebpfwd userspace cross-ns vs HAProxy cross-ns |",
		"| " + rowTitle(connRateK) + " | 1.200× (ahead) | 1.800× (ahead) |",
		"| " + rowTitle(latP50) + " | 1.250× (behind) | — |",
		"| " + rowTitle(tputUp) + " | 1.000× (even) | — |",
		"| Forwarder RSS per idle connection (VmRSS delta / 10 open) | 1.500× (behind) | — |",
		"| userspace connection rate ≥ 1.5× HAProxy | ebpfwd userspace | " + rowTitle(connRateK) + " | 1.200× HAProxy | not met |",
		"| userspace connection rate ≥ 1.5× HAProxy | ebpfwd userspace cross-ns | " + rowTitle(connRateK) + " | 1.800× HAProxy cross-ns | met |",
		"| userspace latency ahead of HAProxy (≤ 1×) | ebpfwd userspace | " + rowTitle(latP50) + " | 1.250× HAProxy | not met |",
		"| userspace throughput not behind HAProxy (≥ 1×) | ebpfwd userspace | " + rowTitle(tputUp) + " | 1.000× HAProxy | met |",
		"HAProxy** (Debian's package",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}

	r = fakeResults(vals, selectContenders("", false)...)
	b.Reset()
	r.writeReport(&b)
	out = b.String()
	if strings.Contains(out, "## ebpfwd userspace vs HAProxy") {
		t.Errorf("versus section without HAProxy in the run:\n%s", out)
	}
	if want := "| userspace connection rate ≥ 1.5× HAProxy | ebpfwd userspace | — | — | not measured: no HAProxy column in this run |"; !strings.Contains(out, want) {
		t.Errorf("report lacks %q:\n%s", want, out)
	}
	for _, v := range r.verdicts() {
		if v.contender == "ebpfwd userspace + HTTP hop" && strings.Contains(v.target, "HAProxy") {
			t.Errorf("the HTTP-hop contender has no HAProxy rival but got verdict %+v", v)
		}
	}
}

// TestShellStatus: a program ended by SIGTERM reads as status 143, as a
// shell reports it and as HAProxy's promise on SIGTERM is stated.
func TestShellStatus(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for script, want := range map[string]int{"kill -TERM $$": 143, "exit 143": 143, "exit 0": 0} {
		cmd := exec.CommandContext(ctx, "sh", "-c", script)
		_ = cmd.Run()
		if got := shellStatus(cmd.ProcessState); got != want {
			t.Errorf("sh -c %q: status %d, want %d", script, got, want)
		}
	}
	if got := shellStatus(nil); got != -1 {
		t.Errorf("shellStatus(nil) = %d, want -1", got)
	}
}
