package main

import (
	"bytes"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
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
		{fdsPerIdleFlow*10000 + 256, 10000},
		{20000, (20000 - 256) / fdsPerIdleFlow},
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
		{20000, 6, "≈ 3333 flows"},
	}
	for _, tt := range tests {
		if got := daemonCapacity(tt.limit, tt.fds); !strings.Contains(got, tt.want) {
			t.Errorf("daemonCapacity(%d, %v) = %q, want it to contain %q", tt.limit, tt.fds, got, tt.want)
		}
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

func TestCheckAtMost(t *testing.T) {
	tc := contender{name: "ebpfwd tc", datapath: datapath.TC}
	tgt := target{datapath.TC, "p99", []metricKey{latP99}, directName, false, 1.1}
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
		"| ebpfwd's own CPU per GB moved (utime+stime) | CPU s/GB | — | 0.50 |",
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
