package daemon

import (
	"context"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
)

type healthRecorder struct {
	mu      sync.Mutex
	healthy map[int]bool
}

func (h *healthRecorder) SetNodeHealthy(i int, healthy bool) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.healthy[i] = healthy
	return nil
}

func (h *healthRecorder) get(i int) (bool, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.healthy[i]
	return v, ok
}

// wait waits (bounded) until the datapath was told node i is healthy or not.
func (h *healthRecorder) wait(t *testing.T, i int, want bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if v, ok := h.get(i); ok && v == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("node %d: datapath not told healthy=%v", i, want)
		}
	}
}

// TestSyncNodeHealth: a node marked dead reaches the datapath, and so does
// its return once failTimeout has passed.
func TestSyncNodeHealth(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Unix(1000, 0).UnixNano())
	nodes := []*selector.Node[string]{{Name: "a", Value: "10.0.0.1:80"}, {Name: "b", Value: "10.0.0.2:80"}}
	sel := selector.New(selector.Options{Strategy: selector.Round, MaxFails: 1, FailTimeout: 10 * time.Second,
		Now: func() time.Time { return time.Unix(0, now.Load()) }}, nodes...)
	s := &service{nodes: sel, log: slog.New(slog.DiscardHandler)}
	rec := &healthRecorder{healthy: map[int]bool{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.syncNodeHealth(ctx, rec, nil) }()
	defer func() { cancel(); <-done }()

	sel.MarkFailed(nodes[1])
	rec.wait(t, 1, false)
	if _, told := rec.get(0); told {
		t.Fatal("node 0 never changed, yet the datapath was told about it")
	}
	now.Add(int64(11 * time.Second)) // failTimeout has passed
	rec.wait(t, 1, true)
}

func outcomes(refused, unreachable, synTimeout, answered, streak uint64) datapath.NodeOutcomes {
	return datapath.NodeOutcomes{
		Failed: map[string]uint64{datapath.FailRefused: refused, datapath.FailUnreachable: unreachable,
			datapath.FailSYNTimeout: synTimeout},
		Answered: answered, Streak: streak,
	}
}

// TestMarkPassive: the datapath's running counts of a node's flows become
// GOST's marking (maxFails 2 here): failures in a row mark, a success in
// between clears, and the streak orders what happened between two looks.
func TestMarkPassive(t *testing.T) {
	for _, tt := range []struct {
		name        string
		before      int // failures marked before
		was, now    datapath.NodeOutcomes
		wantHealthy bool
	}{
		{"nothing new", 1, outcomes(1, 0, 0, 0, 1), outcomes(1, 0, 0, 0, 1), true},
		{"one failure", 0, outcomes(0, 0, 0, 0, 0), outcomes(1, 0, 0, 0, 1), true},
		{"a second failure in a row", 1, outcomes(1, 0, 0, 0, 1), outcomes(1, 0, 1, 0, 2), false},
		{"failures of every kind", 0, outcomes(0, 0, 0, 3, 0), outcomes(1, 1, 0, 3, 2), false},
		{"answered, then failed twice", 0, outcomes(0, 0, 0, 0, 0), outcomes(2, 0, 0, 1, 2), false},
		{"failed twice, then answered", 1, outcomes(0, 0, 0, 0, 1), outcomes(2, 0, 0, 1, 0), true},
		{"answered clears earlier failures", 1, outcomes(0, 0, 0, 0, 1), outcomes(0, 0, 0, 1, 0), true},
		{"counts started over", 0, outcomes(9, 0, 0, 9, 0), outcomes(0, 1, 0, 0, 1), true},
		{"counts started over, two failures", 0, outcomes(9, 0, 0, 9, 0), outcomes(0, 2, 0, 0, 2), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n := &selector.Node[string]{Name: "a", Value: "10.0.0.1:80"}
			s := &service{nodes: selector.New(selector.Options{MaxFails: 2, FailTimeout: time.Minute}, n), log: slog.New(slog.DiscardHandler)}
			for range tt.before {
				s.nodes.MarkFailed(n)
			}
			s.markPassive(n, tt.was, tt.now)
			if got := s.nodes.Healthy(n); got != tt.wantHealthy {
				t.Errorf("healthy = %v, want %v", got, tt.wantHealthy)
			}
		})
	}
}

// fakeJudge is a datapath's node verdicts, set by the test.
type fakeJudge struct {
	mu    sync.Mutex
	now   []datapath.NodeOutcomes
	reads atomic.Int64
}

func (j *fakeJudge) NodeOutcomes() ([]datapath.NodeOutcomes, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.reads.Add(1)
	return append([]datapath.NodeOutcomes(nil), j.now...), nil
}

func (j *fakeJudge) set(i int, o datapath.NodeOutcomes) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.now[i] = o
}

// TestSyncPassiveHealth: what the datapath counted before the sync began
// marks nothing; failures it counts later mark the node dead and reach the
// datapath, and failTimeout brings the node back.
func TestSyncPassiveHealth(t *testing.T) {
	var now atomic.Int64
	now.Store(time.Unix(1000, 0).UnixNano())
	nodes := []*selector.Node[string]{{Name: "a", Value: "10.0.0.1:80"}, {Name: "b", Value: "10.0.0.2:80"}}
	sel := selector.New(selector.Options{MaxFails: 2, FailTimeout: 10 * time.Second,
		Now: func() time.Time { return time.Unix(0, now.Load()) }}, nodes...)
	s := &service{nodes: sel, log: slog.New(slog.DiscardHandler)}
	judge := &fakeJudge{now: []datapath.NodeOutcomes{outcomes(5, 0, 0, 0, 0), outcomes(0, 0, 0, 7, 0)}}
	rec := &healthRecorder{healthy: map[int]bool{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); s.syncNodeHealth(ctx, rec, judge) }()
	defer func() { cancel(); <-done }()

	for deadline := time.Now().Add(5 * time.Second); judge.reads.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the sync never read the datapath's outcomes")
		}
	}
	judge.set(0, outcomes(6, 0, 0, 0, 1))
	judge.set(0, outcomes(6, 0, 1, 0, 2))
	rec.wait(t, 0, false)
	if !sel.Healthy(nodes[1]) {
		t.Fatal("node b marked dead by the failures counted before the sync began")
	}
	now.Add(int64(11 * time.Second))
	rec.wait(t, 0, true)
}

// TestProbeNode: what a probe makes of a node, over loopback in the
// test's own namespace. UDP nodes that stay silent count as up: only an
// ICMP error is evidence against them.
func TestProbeNode(t *testing.T) {
	tcpUp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpUp.Close()
	tcpDown := closedPort(t, "tcp")
	udpSilent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udpSilent.Close()
	udpEcho, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udpEcho.Close()
	go func() {
		buf := make([]byte, 64)
		for {
			n, from, err := udpEcho.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = udpEcho.WriteTo(buf[:n], from)
		}
	}()
	udpDown := closedPort(t, "udp")

	tests := []struct {
		name, network, addr string
		wantUp              bool
	}{
		{"tcp listening", "tcp", tcpUp.Addr().String(), true},
		{"tcp refused", "tcp", tcpDown, false},
		{"udp silent", "udp", udpSilent.LocalAddr().String(), true},
		{"udp answering", "udp", udpEcho.LocalAddr().String(), true},
		{"udp port unreachable", "udp", udpDown, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
			defer cancel()
			err := probeNode(ctx, netns.NS{}, tt.network, tt.addr)
			if (err == nil) != tt.wantUp {
				t.Errorf("probeNode(%s %s) = %v, want up=%v", tt.network, tt.addr, err, tt.wantUp)
			}
			if err != nil && reasonOf(err) != ReasonRefused {
				t.Errorf("a refused probe counts as %q, want %q", reasonOf(err), ReasonRefused)
			}
		})
	}
}

// closedPort returns a loopback address on which nothing listens: a port
// the kernel handed out and that was closed again.
func closedPort(t *testing.T, network string) string {
	t.Helper()
	var addr string
	if network == "tcp" {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = l.Addr().String()
		l.Close()
	} else {
		c, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = c.LocalAddr().String()
		c.Close()
	}
	return addr
}
