package selector

import (
	"fmt"
	"hash/fnv"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a manually advanced clock for fail-timeout tests.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock() *fakeClock {
	c := &fakeClock{}
	c.ns.Store(time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	return c
}
func (c *fakeClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *fakeClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }
func makeNodes(names ...string) []*Node[string] {
	out := make([]*Node[string], len(names))
	for i, n := range names {
		out[i] = &Node[string]{Name: n, Value: n + ":80"}
	}
	return out
}

func names(ns []*Node[string]) []string {
	out := make([]string, len(ns))
	for i, n := range ns {
		out[i] = n.Name
	}
	return out
}

func TestDistribution(t *testing.T) {
	const calls = 3000
	tests := []struct {
		name     string
		strategy Strategy
		key      func(i int) string
		// wantFirst checks the count of first picks per node.
		check func(t *testing.T, first map[string]int, seq []string)
	}{
		{
			name:     "round is strict rotation",
			strategy: Round,
			key:      func(int) string { return "" },
			check: func(t *testing.T, first map[string]int, seq []string) {
				for i, got := range seq {
					if want := []string{"a", "b", "c"}[i%3]; got != want {
						t.Fatalf("call %d picked %s, want %s", i, got, want)
					}
				}
			},
		},
		{
			name:     "unknown strategy behaves as round",
			strategy: "bogus",
			key:      func(int) string { return "" },
			check: func(t *testing.T, first map[string]int, seq []string) {
				if !slices.Equal(seq[:4], []string{"a", "b", "c", "a"}) {
					t.Fatalf("first picks %v, want round-robin", seq[:4])
				}
			},
		},
		{
			name:     "rand spreads evenly",
			strategy: Rand,
			key:      func(int) string { return "" },
			check: func(t *testing.T, first map[string]int, _ []string) {
				// Expected 1000 each, sd ~26: 800 is ~8 sd away.
				for _, n := range []string{"a", "b", "c"} {
					if first[n] < 800 {
						t.Fatalf("node %s picked %d/%d times: %v", n, first[n], calls, first)
					}
				}
			},
		},
		{
			name:     "fifo always picks the first",
			strategy: FIFO,
			key:      func(int) string { return "" },
			check: func(t *testing.T, first map[string]int, _ []string) {
				if first["a"] != calls {
					t.Fatalf("fifo picks %v, want all on a", first)
				}
			},
		},
		{
			name:     "hash spreads across keys",
			strategy: Hash,
			key:      func(i int) string { return fmt.Sprintf("10.0.%d.%d", i/256, i%256) },
			check: func(t *testing.T, first map[string]int, _ []string) {
				for _, n := range []string{"a", "b", "c"} {
					if first[n] < 700 {
						t.Fatalf("node %s picked %d/%d times: %v", n, first[n], calls, first)
					}
				}
			},
		},
		{
			name:     "hash without key falls back to random",
			strategy: Hash,
			key:      func(int) string { return "" },
			check: func(t *testing.T, first map[string]int, _ []string) {
				for _, n := range []string{"a", "b", "c"} {
					if first[n] < 800 {
						t.Fatalf("node %s picked %d/%d times: %v", n, first[n], calls, first)
					}
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(Options{Strategy: tt.strategy}, makeNodes("a", "b", "c")...)
			first := map[string]int{}
			seq := make([]string, 0, calls)
			for i := range calls {
				order := s.Order(tt.key(i))
				if len(order) != 3 {
					t.Fatalf("Order returned %d nodes, want 3", len(order))
				}
				first[order[0].Name]++
				seq = append(seq, order[0].Name)
			}
			tt.check(t, first, seq)
		})
	}
}

func TestOrderTailIsRotationOfHealthy(t *testing.T) {
	s := New(Options{Strategy: Round}, makeNodes("a", "b", "c", "d")...)
	s.MarkFailed(s.Nodes()[2]) // c dead
	want := [][]string{
		{"a", "b", "d"},
		{"b", "d", "a"},
		{"d", "a", "b"},
		{"a", "b", "d"},
	}
	for i, w := range want {
		if got := names(s.Order("")); !slices.Equal(got, w) {
			t.Fatalf("call %d: Order = %v, want %v", i, got, w)
		}
	}
}

func TestHashStability(t *testing.T) {
	s := New(Options{Strategy: Hash}, makeNodes("a", "b", "c", "d", "e")...)
	for _, key := range []string{"192.0.2.1", "192.0.2.2", "2001:db8::1", "x"} {
		first := s.Order(key)[0].Name
		for range 100 {
			if got := s.Order(key)[0].Name; got != first {
				t.Fatalf("key %s: pick moved from %s to %s", key, first, got)
			}
		}
	}
}

func TestHashKeyMatchesFNV1a(t *testing.T) {
	for _, key := range []string{"", "a", "192.0.2.1", "2001:db8::1"} {
		h := fnv.New32a()
		h.Write([]byte(key))
		if got, want := hashKey(key), h.Sum32(); got != want {
			t.Fatalf("hashKey(%q) = %#x, want %#x", key, got, want)
		}
	}
}

func TestFIFOFailoverAndRecovery(t *testing.T) {
	clock := newFakeClock()
	nodes := makeNodes("primary", "backup1", "backup2")
	s := New(Options{Strategy: FIFO, FailTimeout: 10 * time.Second, Now: clock.Now}, nodes...)
	primary, backup1 := nodes[0], nodes[1]

	steps := []struct {
		name string
		act  func()
		want []string
	}{
		{"sticks to primary", func() {}, []string{"primary", "backup1", "backup2"}},
		{"primary fails over to backup1", func() { s.MarkFailed(primary) }, []string{"backup1", "backup2"}},
		{"still on backup1 just before timeout", func() { clock.Advance(10*time.Second - time.Nanosecond) }, []string{"backup1", "backup2"}},
		{"back to primary after timeout", func() { clock.Advance(time.Nanosecond) }, []string{"primary", "backup1", "backup2"}},
		{"one more failure takes primary out again", func() { s.MarkFailed(primary) }, []string{"backup1", "backup2"}},
		{"backup1 fails too", func() { s.MarkFailed(backup1) }, []string{"backup2"}},
		{"success clears primary", func() { s.MarkOK(primary) }, []string{"primary", "backup2"}},
	}
	for _, st := range steps {
		st.act()
		for range 3 { // fifo must be sticky across calls
			if got := names(s.Order("")); !slices.Equal(got, st.want) {
				t.Fatalf("%s: Order = %v, want %v", st.name, got, st.want)
			}
		}
	}
}

func TestMaxFails(t *testing.T) {
	tests := []struct {
		name     string
		maxFails int
		marks    []bool // true = failure, false = success
		healthy  bool
	}{
		{"default 1: one failure kills", 0, []bool{true}, false},
		{"3: two failures keep it", 3, []bool{true, true}, true},
		{"3: three consecutive failures kill", 3, []bool{true, true, true}, false},
		{"3: success in between resets", 3, []bool{true, true, false, true, true}, true},
		{"3: success after death revives", 3, []bool{true, true, true, false}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nodes := makeNodes("a", "b")
			s := New(Options{MaxFails: tt.maxFails, Now: newFakeClock().Now}, nodes...)
			for _, failed := range tt.marks {
				if failed {
					s.MarkFailed(nodes[0])
				} else {
					s.MarkOK(nodes[0])
				}
			}
			if got := s.Healthy(nodes[0]); got != tt.healthy {
				t.Fatalf("Healthy = %v, want %v", got, tt.healthy)
			}
			inOrder := slices.Contains(names(s.Order("")), "a")
			if inOrder != tt.healthy {
				t.Fatalf("node in Order = %v, want %v", inOrder, tt.healthy)
			}
		})
	}
}

func TestAllDeadFallsBackToAllNodes(t *testing.T) {
	for _, strategy := range []Strategy{Round, Rand, FIFO, Hash} {
		t.Run(string(strategy), func(t *testing.T) {
			nodes := makeNodes("a", "b", "c")
			s := New(Options{Strategy: strategy, Now: newFakeClock().Now}, nodes...)
			for _, n := range nodes {
				s.MarkFailed(n)
			}
			got := names(s.Order("198.51.100.7"))
			slices.Sort(got)
			if !slices.Equal(got, []string{"a", "b", "c"}) {
				t.Fatalf("Order with all dead = %v, want all nodes", got)
			}
		})
	}
}

func TestEmptyAndSingle(t *testing.T) {
	if got := New[string](Options{}).Order("k"); len(got) != 0 {
		t.Fatalf("Order on empty selector = %v", names(got))
	}
	s := New(Options{}, makeNodes("only")...)
	s.MarkFailed(s.Nodes()[0])
	if got := names(s.Order("")); !slices.Equal(got, []string{"only"}) {
		t.Fatalf("Order = %v, want [only]", got)
	}
}

func TestOrderAllocatesOneSlice(t *testing.T) {
	for _, strategy := range []Strategy{Round, Rand, FIFO, Hash} {
		s := New(Options{Strategy: strategy}, makeNodes("a", "b", "c", "d")...)
		s.MarkFailed(s.Nodes()[1])
		allocs := testing.AllocsPerRun(100, func() { _ = s.Order("203.0.113.9") })
		if allocs != 1 {
			t.Fatalf("%s: Order allocates %v times per call, want 1", strategy, allocs)
		}
	}
}

func TestConcurrentUse(t *testing.T) {
	nodes := makeNodes("a", "b", "c", "d")
	s := New(Options{Strategy: Round, MaxFails: 2, FailTimeout: time.Millisecond}, nodes...)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				order := s.Order(fmt.Sprint(g))
				if len(order) == 0 {
					t.Errorf("empty order")
					return
				}
				if (i+g)%3 == 0 {
					s.MarkFailed(order[0])
				} else {
					s.MarkOK(order[0])
				}
				_ = s.Healthy(nodes[i%len(nodes)])
			}
		}()
	}
	wg.Wait()
}

func BenchmarkOrder(b *testing.B) {
	s := New(Options{Strategy: Hash}, makeNodes("a", "b", "c", "d", "e", "f", "g", "h")...)
	b.ReportAllocs()
	for b.Loop() {
		_ = s.Order("192.0.2.55")
	}
}
