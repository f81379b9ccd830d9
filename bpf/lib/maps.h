// SPDX-License-Identifier: GPL-2.0
//
// Conventions of every map an ebpfwd program defines, so that programs in
// different objects (nat.c, a future sockmap.c) can share maps:
//
//  - The name starts with ebpfwd_ and says what the map holds; the Go side
//    (bpf2go) derives its field names from it.
//  - Every map is pinned by name (LIBBPF_PIN_BY_NAME) under the loader's
//    pin directory, so that two objects defining a map of the same name and
//    shape share one map, and a restarted daemon takes the maps over.
//    Changing a map's type, key, value or size makes the pins of a
//    previous run incompatible: the loader then wipes them (flows end).
//  - Keys and values are structs shared with Go through bpf2go -type: only
//    fixed-width types, explicit padding, no implicit holes.
//  - A map lives in the header of its concern (counters.h, conntrack.h,
//    service.h), sized by the limits below; an object that includes the
//    header gets the map.

#ifndef EBPFWD_LIB_MAPS_H
#define EBPFWD_LIB_MAPS_H

// Size limits of the maps. MAX_SERVICES bounds service ids (id 0 holds the
// counters of packets that match no service). MAX_NODES bounds the nodes of
// one service and therefore the node-selection loop. MAX_FLOWS sizes both
// conntrack maps; LRU eviction beyond it drops the oldest flows. MAX_IFACES
// bounds the interfaces of one namespace the program redirects to.
//
// An enum, not #defines, so that the values are in the object's BTF: the
// loader reads them from there (bpf.ReadLimits) instead of repeating them.
enum limits {
	MAX_SERVICES = 1024,
	MAX_NODES = 64,
	MAX_FLOWS = 262144,
	MAX_IFACES = 256,
};

// Puts enum limits in BTF (see btf_counter in counters.h).
volatile const enum limits btf_limits;

#endif // EBPFWD_LIB_MAPS_H
