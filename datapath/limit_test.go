package datapath

import (
	"math"
	"sync"
	"sync/atomic"
	"testing"
)

func TestLimit(t *testing.T) {
	l := NewLimit()
	if l.Max() != math.MaxInt64 || !l.Acquire() {
		t.Fatalf("a new Limit must admit: max %d", l.Max())
	}
	l.Release()
	l.SetMax(2)
	if !l.Acquire() || !l.Acquire() {
		t.Fatal("Acquire refused within the maximum")
	}
	if l.Acquire() {
		t.Fatal("Acquire admitted beyond the maximum")
	}
	if l.Active() != 2 || l.Refused() != 1 {
		t.Fatalf("active %d refused %d, want 2 and 1", l.Active(), l.Refused())
	}
	l.Release()
	if !l.Acquire() {
		t.Fatal("a released slot is not taken again")
	}
	l.SetMax(-1)
	if l.Max() != 0 || l.Acquire() {
		t.Fatalf("a negative maximum must admit nothing: max %d", l.Max())
	}
}

// TestLimitConcurrent: racing callers never hold more than the maximum,
// and every answer is counted one way or the other.
func TestLimitConcurrent(t *testing.T) {
	const maxSlots, workers, tries = 10, 8, 2000
	l := NewLimit()
	l.SetMax(maxSlots)
	var wg sync.WaitGroup
	// held counts the slots granted and not yet released (Active also
	// counts, for an instant, a slot being taken and given back).
	var held, peak atomic.Int64
	var granted atomic.Uint64
	for range workers {
		wg.Go(func() {
			for range tries {
				if !l.Acquire() {
					continue
				}
				n := held.Add(1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				granted.Add(1)
				held.Add(-1)
				l.Release()
			}
		})
	}
	wg.Wait()
	if p := peak.Load(); p > maxSlots {
		t.Errorf("%d slots held at once, more than the maximum %d", p, maxSlots)
	}
	if granted := granted.Load(); l.Active() != 0 || granted+l.Refused() != workers*tries {
		t.Errorf("active %d, granted %d + refused %d != %d", l.Active(), granted, l.Refused(), workers*tries)
	}
}
