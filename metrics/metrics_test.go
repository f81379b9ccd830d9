package metrics

import (
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/ebpfwd/ebpfwd/datapath"
)

type fakeSource struct{}

func (fakeSource) Snapshot() []ServiceSnapshot {
	return []ServiceSnapshot{{
		Service:  "svc",
		Handler:  "udp",
		Datapath: datapath.Userspace,
		Counters: datapath.Counters{Opened: 7, Active: 2, BytesUp: 1000, BytesDown: 2000, Dropped: 3},
		Errors:   map[string]uint64{"dial_refused": 4},
		Nodes:    []NodeState{{Node: "a", Up: true}, {Node: "b", Up: false}},
		Flows:    []FlowTable{{Table: "udp_sessions", Entries: 2, Capacity: 65536}},
	}, {
		Service:  "tc-svc",
		Handler:  "tcp",
		Datapath: datapath.TC,
		Counters: datapath.Counters{PacketsUp: 10, PacketsDown: 20},
		Passed:   map[string]uint64{"fragment": 3},
		Dropped:  map[string]uint64{"ttl_exceeded": 4},
		Nodes: []NodeState{{Node: "k", Up: true,
			PassiveFailures: map[string]uint64{"refused": 5, "unreachable": 0, "syn_timeout": 1}}},
	}}
}

func (fakeSource) Fallbacks() []Fallback {
	return []Fallback{{Service: "svc", From: "tc", To: "userspace", Reason: "not_built"}}
}

func (fakeSource) Programs() []datapath.ProgramStats {
	return []datapath.ProgramStats{{Program: "ebpfwd_nat", Netns: "gw", RunTime: 1500 * time.Millisecond, RunCount: 42}}
}

func (fakeSource) Hops() []HopNodeState {
	return []HopNodeState{{Chain: "c", Hop: "h", Node: "n", Up: true}}
}

// value finds the metric of family name whose labels include want.
func value(t *testing.T, fams []*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	next:
		for _, m := range f.Metric {
			got := map[string]string{}
			for _, l := range m.Label {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.Counter.GetValue()
			case m.Gauge != nil:
				return m.Gauge.GetValue()
			case m.Histogram != nil:
				return float64(m.Histogram.GetSampleCount())
			}
		}
	}
	t.Fatalf("no %s%v", name, want)
	return 0
}

func TestRegistryReadsTheSource(t *testing.T) {
	rec := NewRecorder()
	rec.ObserveDial("svc", "node", "a", 3*time.Millisecond, nil)
	rec.ObserveDial("svc", "node", "b", time.Millisecond, io.EOF)
	var nilRec *Recorder
	nilRec.ObserveDial("svc", "node", "a", time.Millisecond, nil) // must not panic

	fams, err := Registry(fakeSource{}, rec, "v1.2.3", time.Unix(1700000000, 0)).Gather()
	if err != nil {
		t.Fatal(err)
	}
	svc := map[string]string{"service": "svc", "datapath": "userspace"}
	tests := []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"ebpfwd_connections_opened_total", svc, 7},
		{"ebpfwd_connections_active", svc, 2},
		{"ebpfwd_bytes_total", map[string]string{"service": "svc", "direction": "up"}, 1000},
		{"ebpfwd_bytes_total", map[string]string{"service": "svc", "direction": "down"}, 2000},
		{"ebpfwd_dropped_datagrams_total", svc, 3},
		{"ebpfwd_errors_total", map[string]string{"service": "svc", "reason": "dial_refused"}, 4},
		{"ebpfwd_node_up", map[string]string{"node": "a"}, 1},
		{"ebpfwd_node_up", map[string]string{"node": "b"}, 0},
		{"ebpfwd_hop_node_up", map[string]string{"chain": "c", "hop": "h", "node": "n"}, 1},
		{"ebpfwd_flow_table_entries", map[string]string{"table": "udp_sessions"}, 2},
		{"ebpfwd_flow_table_capacity", map[string]string{"table": "udp_sessions"}, 65536},
		{"ebpfwd_datapath_fallback", map[string]string{"from": "tc", "to": "userspace", "reason": "not_built"}, 1},
		{"ebpfwd_dial_duration_seconds", map[string]string{"name": "a", "result": "ok"}, 1},
		{"ebpfwd_dial_duration_seconds", map[string]string{"name": "b", "result": "error"}, 1},
		{"ebpfwd_build_info", map[string]string{"version": "v1.2.3"}, 1},
		{"ebpfwd_bpf_program_run_seconds_total", map[string]string{"program": "ebpfwd_nat", "netns": "gw"}, 1.5},
		{"ebpfwd_bpf_program_runs_total", map[string]string{"program": "ebpfwd_nat", "netns": "gw"}, 42},
		{"ebpfwd_packets_total", map[string]string{"service": "tc-svc", "direction": "up"}, 10},
		{"ebpfwd_packets_total", map[string]string{"service": "tc-svc", "direction": "down"}, 20},
		{"ebpfwd_packets_passed_total", map[string]string{"service": "tc-svc", "reason": "fragment"}, 3},
		{"ebpfwd_packets_dropped_total", map[string]string{"service": "tc-svc", "reason": "ttl_exceeded"}, 4},
		{"ebpfwd_node_passive_failures_total", map[string]string{"service": "tc-svc", "node": "k", "reason": "refused"}, 5},
		{"ebpfwd_node_passive_failures_total", map[string]string{"service": "tc-svc", "node": "k", "reason": "syn_timeout"}, 1},
		{"ebpfwd_config_last_reload_successful", nil, 1},
		{"ebpfwd_config_last_reload_success_timestamp_seconds", nil, 1700000000},
	}
	for _, tt := range tests {
		if got := value(t, fams, tt.name, tt.labels); got != tt.want {
			t.Errorf("%s%v = %v, want %v", tt.name, tt.labels, got, tt.want)
		}
	}
	for _, want := range []string{"go_goroutines", "process_resident_memory_bytes"} {
		found := false
		for _, f := range fams {
			found = found || f.GetName() == want
		}
		if !found {
			t.Errorf("registry lacks %s", want)
		}
	}
}

func TestServerLoopbackDefaultAndAuth(t *testing.T) {
	srv, err := Listen(ServerConfig{Addr: ":0", Path: "/m", Username: "prom", Password: "s3cret"},
		Registry(fakeSource{}, NewRecorder(), "test", time.Now()), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	defer srv.Shutdown()
	if !strings.HasPrefix(srv.Addr(), "127.0.0.1:") {
		t.Fatalf("an empty host bound %s, want 127.0.0.1", srv.Addr())
	}
	url := "http://" + srv.Addr() + "/m"
	tests := []struct {
		name       string
		user, pass string
		wantStatus int
	}{
		{"no credentials", "", "", http.StatusUnauthorized},
		{"wrong password", "prom", "nope", http.StatusUnauthorized},
		{"wrong user", "graf", "s3cret", http.StatusUnauthorized},
		{"good", "prom", "s3cret", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", url, nil)
			if tt.user != "" {
				req.SetBasicAuth(tt.user, tt.pass)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Fatalf("status %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if tt.wantStatus == http.StatusOK && !strings.Contains(string(body), `ebpfwd_bytes_total{datapath="userspace",direction="up",service="svc"} 1000`) {
				t.Fatalf("exposition lacks the service's bytes:\n%s", body)
			}
		})
	}
}

func TestListenBadAddr(t *testing.T) {
	if _, err := Listen(ServerConfig{Addr: "nonsense", Path: "/metrics"}, Registry(fakeSource{}, NewRecorder(), "t", time.Now()), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), `metrics addr "nonsense"`) {
		t.Fatalf("err = %v", err)
	}
}

// TestConfigLoaded: the reload gauges follow the last load; a refused one
// keeps the time of the last success.
func TestConfigLoaded(t *testing.T) {
	rec := NewRecorder()
	start := time.Unix(1000, 0)
	Registry(nil, rec, "test", start)
	tests := []struct {
		ok       bool
		at       time.Time
		wantOK   float64
		wantTime float64
	}{
		{true, time.Unix(2000, 0), 1, 2000},
		{false, time.Unix(3000, 0), 0, 2000},
		{true, time.Unix(4000, 0), 1, 4000},
	}
	for _, tt := range tests {
		rec.ConfigLoaded(tt.ok, tt.at)
		if got := testutil.ToFloat64(rec.reloadOK); got != tt.wantOK {
			t.Errorf("after load ok=%v: successful = %v, want %v", tt.ok, got, tt.wantOK)
		}
		if got := testutil.ToFloat64(rec.reloadTime); got != tt.wantTime {
			t.Errorf("after load ok=%v: timestamp = %v, want %v", tt.ok, got, tt.wantTime)
		}
	}
}
