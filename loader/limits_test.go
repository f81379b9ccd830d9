package loader

import (
	"testing"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// TestLimitsAgreeWithTheObject: every size the Go side works with must be
// what the embedded object's maps really hold, so that a limit changed in
// bpf/lib/maps.h (or a map sized by hand) cannot leave Go refusing what the
// program takes, or handing out what its maps cannot store.
func TestLimitsAgreeWithTheObject(t *testing.T) {
	spec, err := bpf.LoadNAT()
	if err != nil {
		t.Fatal(err)
	}
	counters := uint32(bpf.NATCounterCOUNTER_MAX)
	tests := []struct {
		name    string
		mapName string
		// ok says whether the map's max_entries fit the Go-side limit.
		ok   func(maxEntries uint32) bool
		want string
	}{
		{"conntrack holds FlowCapacity", "ebpfwd_conntrack",
			func(n uint32) bool { return uint64(n) == FlowCapacity }, "== FlowCapacity"},
		{"reverse conntrack holds FlowCapacity", "ebpfwd_reverse",
			func(n uint32) bool { return uint64(n) == FlowCapacity }, "== FlowCapacity"},
		{"every service ID has a key", "ebpfwd_services",
			func(n uint32) bool { return n >= natLimits.Services-1 }, ">= Services-1"},
		{"every service ID has its counters", "ebpfwd_counters",
			func(n uint32) bool { return n == natLimits.Services*counters }, "== Services * COUNTER_MAX"},
		{"one service with the most nodes fits", "ebpfwd_nodes",
			func(n uint32) bool { return n >= natLimits.Nodes }, ">= Nodes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, ok := spec.Maps[tt.mapName]
			if !ok {
				t.Fatalf("the object has no map %s", tt.mapName)
			}
			if !tt.ok(m.MaxEntries) {
				t.Errorf("%s holds %d entries, want %s (limits %+v)", tt.mapName, m.MaxEntries, tt.want, natLimits)
			}
		})
	}
	if got, err := bpf.ReadLimits(spec); err != nil || got != natLimits {
		t.Errorf("ReadLimits = %+v, %v; the package initialised with %+v", got, err, natLimits)
	}
}
