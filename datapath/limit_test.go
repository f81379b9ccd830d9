package datapath

import (
	"sync"
	"sync/atomic"
	"testing"
)

// op is one step of a pool scenario: service svc acquires (or, with
// release, releases) once, and want says whether Acquire must succeed.
type op struct {
	svc     string
	release bool
	want    bool
}

func acquire(svc string, want bool) op { return op{svc: svc, want: want} }
func release(svc string) op            { return op{svc: svc, release: true} }

func TestPool(t *testing.T) {
	tests := []struct {
		name   string
		costs  map[string]int64
		shared int64 // -1: no Rebalance (a pool that bounds nothing)
		shares map[string]Share
		ops    []op
		active map[string]int64 // held at the end
	}{
		{
			name:   "a pool never rebalanced admits",
			costs:  map[string]int64{"a": 2},
			shared: -1,
			ops:    []op{acquire("a", true), acquire("a", true), acquire("a", true)},
			active: map[string]int64{"a": 3},
		},
		{
			// a takes its guarantee (2) and all of the shared part (2);
			// b still gets its guarantee, and not one more.
			name:   "a busy service borrows, the guarantee of the other stays",
			costs:  map[string]int64{"a": 1, "b": 1},
			shared: 2,
			shares: map[string]Share{"a": {Guaranteed: 2}, "b": {Guaranteed: 2}},
			ops: []op{
				acquire("a", true), acquire("a", true), acquire("a", true), acquire("a", true),
				acquire("a", false),
				acquire("b", true), acquire("b", true), acquire("b", false),
				// One of a's borrowed descriptors back: b may borrow it.
				release("a"), acquire("b", true), acquire("a", false),
			},
			active: map[string]int64{"a": 3, "b": 3},
		},
		{
			name:   "releasing within the guarantee frees nothing shared",
			costs:  map[string]int64{"a": 1, "b": 1},
			shared: 1,
			shares: map[string]Share{"a": {Guaranteed: 2}, "b": {Guaranteed: 0}},
			ops: []op{
				acquire("a", true), acquire("b", true), acquire("b", false),
				release("a"), acquire("b", false),
			},
			active: map[string]int64{"a": 0, "b": 1},
		},
		{
			name:   "a cap holds below the guarantee and the shared part",
			costs:  map[string]int64{"a": 1},
			shared: 10,
			shares: map[string]Share{"a": {Guaranteed: 5, Max: 3}},
			ops:    []op{acquire("a", true), acquire("a", true), acquire("a", true), acquire("a", false)},
			active: map[string]int64{"a": 3},
		},
		{
			// A TCP stream costs two descriptors: 3 shared descriptors
			// lend one stream, a UDP session (one) takes the last.
			name:   "costs are counted in descriptors",
			costs:  map[string]int64{"tcp": 2, "udp": 1},
			shared: 3,
			shares: map[string]Share{"tcp": {Guaranteed: 1}, "udp": {}},
			ops: []op{
				acquire("tcp", true), acquire("tcp", true), acquire("tcp", false),
				acquire("udp", true), acquire("udp", false),
			},
			active: map[string]int64{"tcp": 2, "udp": 1},
		},
		{
			name:   "nothing to share, no guarantee: everything refused",
			costs:  map[string]int64{"a": 1},
			shared: 0,
			shares: map[string]Share{"a": {}},
			ops:    []op{acquire("a", false)},
			active: map[string]int64{"a": 0},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := NewPool()
			limits := map[string]*Limit{}
			for name, cost := range tt.costs {
				limits[name] = p.NewLimit(cost)
			}
			if tt.shared >= 0 {
				shares := map[*Limit]Share{}
				for name, s := range tt.shares {
					shares[limits[name]] = s
				}
				p.Rebalance(tt.shared, shares)
			}
			for i, o := range tt.ops {
				l := limits[o.svc]
				if o.release {
					l.Release()
					continue
				}
				if got := l.Acquire(); got != o.want {
					t.Fatalf("op %d: %s Acquire = %v, want %v", i, o.svc, got, o.want)
				}
			}
			for name, want := range tt.active {
				if got := limits[name].Active(); got != want {
					t.Errorf("%s holds %d, want %d", name, got, want)
				}
			}
			if shared, borrowed := p.Shared(); tt.shared >= 0 && (borrowed < 0 || borrowed > shared) {
				t.Errorf("borrowed %d of %d shared", borrowed, shared)
			}
		})
	}
}

// TestPoolRebalanceTakesBackGuarantees: a service a reload removed loses
// its guarantee while its connections drain, so what it holds is counted
// as borrowed and the others cannot borrow it until it is released; the
// pool then forgets it.
func TestPoolRebalanceTakesBackGuarantees(t *testing.T) {
	p := NewPool()
	gone, stays := p.NewLimit(1), p.NewLimit(1)
	p.Rebalance(2, map[*Limit]Share{gone: {Guaranteed: 3}, stays: {Guaranteed: 1}})
	for range 3 {
		if !gone.Acquire() {
			t.Fatal("Acquire refused within the guarantee")
		}
	}
	p.Rebalance(2, map[*Limit]Share{stays: {Guaranteed: 1}})
	if _, borrowed := p.Shared(); borrowed != 3 {
		t.Fatalf("borrowed = %d after the removed service lost its guarantee, want its 3", borrowed)
	}
	if !stays.Acquire() {
		t.Fatal("the remaining service's guarantee was not kept")
	}
	if stays.Acquire() {
		t.Fatal("the remaining service borrowed what the draining one holds")
	}
	gone.Release()
	gone.Release()
	if !stays.Acquire() {
		t.Fatal("a descriptor the draining service released is not lent")
	}
	gone.Release()
	p.mu.Lock()
	_, known := p.limits[gone]
	p.mu.Unlock()
	if known {
		t.Error("the pool still keeps the drained, removed service's Limit")
	}
	if got, want := stays.Capacity(), int64(3); got != want {
		t.Errorf("Capacity = %d, want guarantee 1 + shared 2 = %d", got, want)
	}
}

// TestPoolConcurrent: racing services never hold more than the pool, and
// every Acquire is counted one way or the other.
func TestPoolConcurrent(t *testing.T) {
	const guaranteed, shared, workers, tries = 3, 4, 8, 2000
	p := NewPool()
	limits := []*Limit{p.NewLimit(1), p.NewLimit(2)}
	p.Rebalance(shared, map[*Limit]Share{limits[0]: {Guaranteed: guaranteed}, limits[1]: {Guaranteed: guaranteed}})
	total := int64(shared + guaranteed*(1+2))
	var held, peak atomic.Int64
	var granted atomic.Uint64
	var wg sync.WaitGroup
	for w := range workers {
		l := limits[w%2]
		wg.Go(func() {
			for range tries {
				if !l.Acquire() {
					continue
				}
				n := held.Add(l.Cost())
				for pk := peak.Load(); n > pk && !peak.CompareAndSwap(pk, n); pk = peak.Load() {
				}
				granted.Add(1)
				held.Add(-l.Cost())
				l.Release()
			}
		})
	}
	wg.Wait()
	if pk := peak.Load(); pk > total {
		t.Errorf("%d descriptors held at once, more than the pool's %d", pk, total)
	}
	refused := limits[0].Refused() + limits[1].Refused()
	if granted.Load()+refused != workers*tries {
		t.Errorf("granted %d + refused %d != %d", granted.Load(), refused, workers*tries)
	}
	if _, borrowed := p.Shared(); borrowed != 0 || limits[0].Active() != 0 || limits[1].Active() != 0 {
		t.Errorf("after every release: borrowed %d, active %d and %d", borrowed, limits[0].Active(), limits[1].Active())
	}
}
