package loader

import (
	"fmt"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// natLimits are the sizes the embedded NAT object was compiled with, read
// from it once: the Go side never repeats a number the C side defines
// (bpf/lib/maps.h), so a changed limit takes effect on both sides with the
// next make generate.
var natLimits = mustReadLimits()

// FlowCapacity is how many flows the conntrack maps hold; beyond it the LRU
// maps evict the least recently used. It is read from the embedded object
// when the package initialises (MAX_FLOWS in bpf/lib/maps.h); do not assign
// to it.
var FlowCapacity = uint64(natLimits.Flows)

// mustReadLimits reads the limits of the embedded object. The object is
// part of this binary, so failing to read it is a build defect, not a
// runtime condition: it panics, and every test of this package finds it.
func mustReadLimits() bpf.Limits {
	spec, err := bpf.LoadNAT()
	if err != nil {
		panic(fmt.Sprintf("loader: read the embedded NAT object: %v", err))
	}
	l, err := bpf.ReadLimits(spec)
	if err != nil {
		panic(fmt.Sprintf("loader: embedded NAT object: %v", err))
	}
	return l
}
