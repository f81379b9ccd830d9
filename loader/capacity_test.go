package loader

import (
	"testing"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// FlowCapacity must say what the object really holds.
func TestFlowCapacityMatchesTheMaps(t *testing.T) {
	spec, err := bpf.LoadNAT()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ebpfwd_conntrack", "ebpfwd_reverse"} {
		if got := spec.Maps[name].MaxEntries; got != FlowCapacity {
			t.Errorf("%s holds %d entries, FlowCapacity says %d", name, got, FlowCapacity)
		}
	}
}
