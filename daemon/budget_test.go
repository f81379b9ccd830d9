package daemon

import (
	"log/slog"

	"github.com/ebpfwd/ebpfwd/datapath"
	"slices"
	"testing"

	"github.com/ebpfwd/ebpfwd/config"
)

func TestSplit(t *testing.T) {
	// split does not care what a connection is: the cases use six
	// descriptors and one, so that whole-stream rounding shows.
	tcp := func(max int64) demand { return demand{cost: 6, max: max} }
	udp := func(max int64) demand { return demand{cost: 1, max: max} }
	tests := []struct {
		name    string
		pool    int64
		demands []demand
		want    []int64
	}{
		{"no services", 1000, nil, []int64{}},
		{"nothing to share", 0, []demand{tcp(0), udp(65536)}, []int64{0, 0}},
		{"negative pool", -5, []demand{tcp(0)}, []int64{0}},
		{"one tcp service takes it all, in whole streams", 1000, []demand{tcp(0)}, []int64{166}},
		{"one udp service: a socket a session", 1000, []demand{udp(65536)}, []int64{1000}},
		// 420 descriptors: the e2e test's 512 minus the reserve, roughly.
		{"tcp and udp split evenly", 420, []demand{tcp(0), udp(65536)}, []int64{35, 210}},
		{"three uncapped tcp", 600, []demand{tcp(0), tcp(0), tcp(0)}, []int64{33, 33, 33}},
		// The udp service wants 100 descriptors of its fair 500: the tcp
		// service gets the other 900.
		{"a small cap leaves the rest to the others", 1000, []demand{tcp(0), udp(100)}, []int64{150, 100}},
		{"a cap of exactly the fair share is met", 1200, []demand{tcp(100), tcp(0)}, []int64{100, 100}},
		{"a cap above the fair share is clamped to it", 1200, []demand{tcp(500), tcp(0)}, []int64{100, 100}},
		// Both caps (5 descriptors, 60) fit the first fair share (333):
		// the last service takes all they leave.
		{"caps that fit settle at once", 1000, []demand{udp(5), tcp(10), tcp(0)}, []int64{5, 10, 155}},
		// Every cap fits: nobody takes more than asked, descriptors stay
		// unshared.
		// Water-filling in rounds: the first fair share (300) fits only
		// the udp cap (50); the second (950/3 = 316) then fits the 50
		// streams (300); the last two split the remaining 650.
		{"caps settle in rounds", 1000, []demand{udp(50), tcp(50), tcp(0), tcp(0)}, []int64{50, 50, 54, 54}},
		{"every cap fits", 1 << 20, []demand{udp(65536), tcp(1000)}, []int64{65536, 1000}},
		{"big limit: udp capped by its table, tcp takes the rest", 1 << 20, []demand{udp(65536), tcp(0)},
			[]int64{65536, (1<<20 - 65536) / 6}},
		{"too small for one stream each", 10, []demand{tcp(0), tcp(0)}, []int64{0, 0}},
		{"a demand without cost takes nothing", 100, []demand{{cost: 0}, udp(0)}, []int64{0, 100}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := split(tt.pool, tt.demands)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("split(%d, %+v) = %v, want %v", tt.pool, tt.demands, got, tt.want)
			}
			// Whatever the split, the services never get more than the pool.
			var used int64
			for i, g := range got {
				used += g * tt.demands[i].cost
			}
			if used > max(tt.pool, 0) {
				t.Fatalf("split(%d, %+v) hands out %d descriptors, more than the pool", tt.pool, tt.demands, used)
			}
		})
	}
}

func TestBudgetReserve(t *testing.T) {
	b := fdBudget{limit: 512, base: 30}
	// 512/16 = 32 splice pipes of two descriptors each.
	if got := b.reserve(); got != 30+fdHeadroom+64 {
		t.Errorf("reserve = %d, want %d", got, 30+fdHeadroom+64)
	}
	if got := b.pool(); got != 512-30-fdHeadroom-64 {
		t.Errorf("pool = %d, want %d", got, 512-30-fdHeadroom-64)
	}
	if got := (fdBudget{limit: 50, base: 30}).pool(); got != 0 {
		t.Errorf("pool below the reserve = %d, want 0", got)
	}
}

func TestDemandOf(t *testing.T) {
	svc := func(network string, maxStreams int) *service {
		return &service{cfg: &config.Service{Listener: config.Listener{Type: network}, MaxStreams: maxStreams}}
	}
	tests := []struct {
		s    *service
		want demand
	}{
		{svc("tcp", 0), demand{cost: 2, max: 0}},
		{svc("tcp", 100), demand{cost: 2, max: 100}},
		{svc("udp", 0), demand{cost: 1, max: 65536}},
		{svc("udp", 100), demand{cost: 1, max: 100}},
		{svc("udp", 1<<20), demand{cost: 1, max: 65536}},
	}
	for _, tt := range tests {
		if got := demandOf(tt.s); got != tt.want {
			t.Errorf("demandOf(%s, maxStreams %d) = %+v, want %+v", tt.s.cfg.Listener.Type, tt.s.cfg.MaxStreams, got, tt.want)
		}
	}
}

func TestSplicePipesFor(t *testing.T) {
	tests := []struct{ limit, want int64 }{
		{0, 8}, {100, 8}, {512, 32}, {8192, 512}, {20000, 512}, {1 << 20, 512},
	}
	for _, tt := range tests {
		if got := splicePipesFor(tt.limit); got != tt.want {
			t.Errorf("splicePipesFor(%d) = %d, want %d", tt.limit, got, tt.want)
		}
	}
}

// TestApplyBudget: half of the services' descriptors is guaranteed, split
// max-min fair, and the rest is shared: a busy service reaches its
// guarantee plus all of the shared part, while another keeps its own
// guarantee.
func TestApplyBudget(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	d := &Daemon{log: log, pool: datapath.NewPool(), budget: fdBudget{limit: 1000, base: 40}}
	mk := func(network string, maxStreams int) *service {
		sc := &config.Service{Listener: config.Listener{Type: network}, MaxStreams: maxStreams}
		return &service{cfg: sc, log: log, limit: d.pool.NewLimit(demandOf(&service{cfg: sc}).cost)}
	}
	busy, quiet, capped := mk("tcp", 0), mk("udp", 0), mk("tcp", 10)
	d.applyBudget([]*service{busy, quiet, capped})
	// pool = 1000 - 40 - 64 headroom - 2*62 pipes = 772; half (386) is
	// guaranteed max-min fair: capped takes its 10 streams (20 fds), the
	// others split 366 (183 each: 91 streams, 183 sessions). Shared: 772 -
	// 182 - 183 - 20 = 387.
	pool := d.budget.pool()
	if pool != 772 {
		t.Fatalf("pool = %d, want 772", pool)
	}
	for _, tt := range []struct {
		name               string
		s                  *service
		guaranteed, reachN int64
	}{
		{"busy tcp", busy, 91, 91 + 387/2},
		{"quiet udp", quiet, 183, 183 + 387},
		{"capped tcp", capped, 10, 10},
	} {
		if g, r := tt.s.limit.Guaranteed(), tt.s.limit.Capacity(); g != tt.guaranteed || r != tt.reachN {
			t.Errorf("%s: guaranteed %d capacity %d, want %d and %d", tt.name, g, r, tt.guaranteed, tt.reachN)
		}
	}
	// The busy service takes everything it can; the quiet one still gets
	// its whole guarantee, and no more.
	n := int64(0)
	for busy.limit.Acquire() {
		n++
	}
	if n != 91+387/2 {
		t.Errorf("busy service held %d streams, want %d", n, 91+387/2)
	}
	m := int64(0)
	for quiet.limit.Acquire() {
		m++
	}
	if m != 183+387%2 {
		t.Errorf("quiet service held %d sessions once the busy one borrowed all it could, want its guarantee %d and the odd shared descriptor", m, 183)
	}
}
