package bpf

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
)

// Limits are the sizes an object was compiled with: enum limits in
// lib/maps.h, and what its conntrack maps hold. Go code reads them from the
// object (ReadLimits) rather than repeating them, so that the two cannot
// drift apart.
type Limits struct {
	// Services bounds service IDs: 1..Services-1 name services, 0 counts
	// packets that match none (MAX_SERVICES).
	Services uint32
	// Nodes is the most nodes one service may have: the program's
	// node-selection loop stops there and ignores a larger node_count
	// (MAX_NODES).
	Nodes uint32
	// Flows is how many flows the conntrack maps hold; beyond it their LRU
	// eviction drops the least recently used (the maps' max_entries).
	Flows uint32
}

// ReadLimits reads the limits from spec (as LoadNAT returns it).
func ReadLimits(spec *ebpf.CollectionSpec) (Limits, error) {
	if spec.Types == nil {
		return Limits{}, errors.New("read limits: the object has no BTF")
	}
	var enum *btf.Enum
	if err := spec.Types.TypeByName("limits", &enum); err != nil {
		return Limits{}, fmt.Errorf("read limits: enum limits: %w", err)
	}
	values := make(map[string]uint64, len(enum.Values))
	for _, v := range enum.Values {
		values[v.Name] = v.Value
	}
	value := func(name string) (uint32, error) {
		v, ok := values[name]
		if !ok || v == 0 || v > 1<<32-1 {
			return 0, fmt.Errorf("read limits: enum limits has no usable %s (%d)", name, v)
		}
		return uint32(v), nil
	}
	var (
		l   Limits
		err error
	)
	if l.Services, err = value("MAX_SERVICES"); err != nil {
		return Limits{}, err
	}
	if l.Nodes, err = value("MAX_NODES"); err != nil {
		return Limits{}, err
	}
	conntrack, ok := spec.Maps["ebpfwd_conntrack"]
	if !ok {
		return Limits{}, errors.New("read limits: the object has no map ebpfwd_conntrack")
	}
	l.Flows = conntrack.MaxEntries
	return l, nil
}
