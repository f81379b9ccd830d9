package daemon

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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
	go func() { defer close(done); s.syncNodeHealth(ctx, rec) }()
	defer func() { cancel(); <-done }()

	wait := func(i int, want bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			if v, ok := rec.get(i); ok && v == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("node %d: datapath not told healthy=%v", i, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	sel.MarkFailed(nodes[1])
	wait(1, false)
	if _, told := rec.get(0); told {
		t.Fatal("node 0 never changed, yet the datapath was told about it")
	}
	now.Add(int64(11 * time.Second)) // failTimeout has passed
	wait(1, true)
}
