package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
)

var connsNow = time.Date(2026, 12, 2, 3, 0, 0, 0, time.UTC)

// connsFlows are one flow of each kind, out of order.
func connsFlows() []datapath.Flow {
	return []datapath.Flow{
		{Service: "udp-svc", Datapath: datapath.Userspace, Network: "udp", Client: "10.0.0.2:5353", Node: "dns-1",
			Upstream: "10.1.0.2:53", State: "idle 1.5s", Started: connsNow.Add(-90 * time.Second),
			BytesUp: 120, BytesDown: 480, PacketsUp: 2, PacketsDown: 2},
		{Service: "tcp-svc", Datapath: datapath.TC, Network: "tcp", Client: "10.0.0.3:40000", Node: "web-0",
			Upstream: "10.1.0.3:80", State: "established idle 2ms via 10.1.0.1:1024", Started: connsNow.Add(-3*time.Hour - 400*time.Millisecond),
			BytesUp: 1 << 20, BytesDown: 5, PacketsUp: 20, PacketsDown: 3},
		{Service: "tcp-svc", Datapath: datapath.Userspace, Network: "tcp", Client: "10.0.0.4:40001",
			State: "established", Started: connsNow.Add(-time.Second)},
		// Its datapath does not know when it began: no made-up age.
		{Service: "tcp-svc", Datapath: datapath.Userspace, Network: "tcp", Client: "10.0.0.5:40002", State: "established"},
		// Listed the moment it began, by a clock a little ahead.
		{Service: "udp-svc", Datapath: datapath.TC, Network: "udp", Client: "10.0.0.6:5000", Node: "dns-1",
			Upstream: "10.1.0.2:53", State: "udp idle 0s via 10.1.0.1:2000", Started: connsNow.Add(time.Millisecond)},
	}
}

func TestPrintFlows(t *testing.T) {
	var stdout bytes.Buffer
	printFlows(env{stdout: &stdout}, connsFlows(), connsNow)
	lines := strings.Split(strings.TrimRight(stdout.String(), "\n"), "\n")
	fields := func(s string) []string { return strings.Fields(s) }
	want := [][]string{
		{"SERVICE", "DATAPATH", "PROTO", "CLIENT", "NODE", "UPSTREAM", "STATE", "AGE", "UP", "DOWN"},
		// Sorted by service, then oldest first; a flow without a start last.
		{"tcp-svc", "userspace", "tcp", "10.0.0.5:40002", "-", "-", "established", "-", "0", "0"},
		{"tcp-svc", "tc", "tcp", "10.0.0.3:40000", "web-0", "10.1.0.3:80", "established", "idle", "2ms", "via", "10.1.0.1:1024", "3h0m0s", "1048576", "5"},
		{"tcp-svc", "userspace", "tcp", "10.0.0.4:40001", "-", "-", "established", "1s", "0", "0"},
		{"udp-svc", "userspace", "udp", "10.0.0.2:5353", "dns-1", "10.1.0.2:53", "idle", "1.5s", "1m30s", "120", "480"},
		{"udp-svc", "tc", "udp", "10.0.0.6:5000", "dns-1", "10.1.0.2:53", "udp", "idle", "0s", "via", "10.1.0.1:2000", "0s", "0", "0"},
		{"5", "flows"},
	}
	if len(lines) != len(want) {
		t.Fatalf("got %d lines, want %d:\n%s", len(lines), len(want), &stdout)
	}
	for i, w := range want {
		if got := fields(lines[i]); !slices.Equal(got, w) {
			t.Errorf("line %d: %q\nwant fields %q", i, lines[i], w)
		}
	}
}

// TestFlowsJSON: scripts rely on these names (docs/DATAPATHS.md); packet
// counts appear only where a datapath counts them.
func TestFlowsJSON(t *testing.T) {
	for _, tt := range []struct {
		name  string
		flows []datapath.Flow
		want  string // the first flow, or the whole output when nothing is open
	}{
		{name: "nothing open", flows: nil, want: "[]\n"},
		{name: "tc flow", flows: connsFlows()[1:2], want: `{"service":"tcp-svc","datapath":"tc","network":"tcp","client":"10.0.0.3:40000",` +
			`"node":"web-0","upstream":"10.1.0.3:80","state":"established idle 2ms via 10.1.0.1:1024",` +
			`"started":"2026-12-01T23:59:59.6Z","bytes_up":1048576,"bytes_down":5,"packets_up":20,"packets_down":3}`},
		{name: "userspace stream", flows: connsFlows()[2:3], want: `{"service":"tcp-svc","datapath":"userspace","network":"tcp",` +
			`"client":"10.0.0.4:40001","state":"established","started":"2026-12-02T02:59:59Z","bytes_up":0,"bytes_down":0}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			if err := writeFlowsJSON(&out, tt.flows); err != nil {
				t.Fatal(err)
			}
			if tt.flows == nil {
				if out.String() != tt.want {
					t.Fatalf("got %q, want %q", &out, tt.want)
				}
				return
			}
			var raw []json.RawMessage
			if err := json.Unmarshal(out.Bytes(), &raw); err != nil || len(raw) != 1 {
				t.Fatalf("not a one-flow array (%v):\n%s", err, &out)
			}
			var compact bytes.Buffer
			if err := json.Compact(&compact, raw[0]); err != nil {
				t.Fatal(err)
			}
			if compact.String() != tt.want {
				t.Errorf("got  %s\nwant %s", &compact, tt.want)
			}
		})
	}
}

// TestConnsInstanceNotRunning: no socket, or a socket nobody answers on
// (left by a daemon that was killed), both say the instance is not running.
func TestConnsInstanceNotRunning(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.Listen("unix", stale)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close() // the file stays, nothing listens: ECONNREFUSED
	if _, err := os.Stat(stale); err != nil {
		t.Fatalf("stale socket gone: %v", err)
	}
	for _, tt := range []struct{ name, sock string }{
		{"no socket", filepath.Join(dir, "absent.sock")},
		{"stale socket", stale},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := fetchFlows(tt.sock, "edge")
			want := "instance edge is not running (no daemon answers on " + tt.sock + ")"
			if err == nil || err.Error() != want {
				t.Fatalf("got %v, want %q", err, want)
			}
		})
	}
}
