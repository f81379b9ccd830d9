package daemon

import (
	"slices"
	"testing"

	"github.com/ebpfwd/ebpfwd/config"
)

func TestSplit(t *testing.T) {
	tcp := func(max int64) demand { return demand{cost: tcpStreamFDs, max: max} }
	udp := func(max int64) demand { return demand{cost: udpSessionFDs, max: max} }
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
			[]int64{65536, (1<<20 - 65536) / tcpStreamFDs}},
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
	if got := b.reserve(); got != 30+fdHeadroom {
		t.Errorf("reserve = %d, want %d", got, 30+fdHeadroom)
	}
	if got := b.pool(); got != 512-30-fdHeadroom {
		t.Errorf("pool = %d, want %d", got, 512-30-fdHeadroom)
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
		{svc("tcp", 0), demand{cost: 6, max: 0}},
		{svc("tcp", 100), demand{cost: 6, max: 100}},
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
