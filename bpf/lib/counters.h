// SPDX-License-Identifier: GPL-2.0
//
// Per-service, per-CPU counters: what happened to the packets of each
// service, and why the program passed or dropped them. Userspace (loader
// Counters) sums the per-CPU slots.

#ifndef EBPFWD_LIB_COUNTERS_H
#define EBPFWD_LIB_COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

enum counter {
	COUNTER_PACKETS_UP = 0,   // client -> node, GSO segments counted
	COUNTER_BYTES_UP,         // L4 payload bytes client -> node
	COUNTER_PACKETS_DOWN,     // node -> client
	COUNTER_BYTES_DOWN,       // L4 payload bytes node -> client
	COUNTER_NEW_FLOWS,
	COUNTER_SNAT_FAILURES,    // no free SNAT port within SNAT_PROBES tries
	COUNTER_PASS_FRAGMENT,    // IP fragment: to the stack
	COUNTER_PASS_IP_OPTIONS,  // IPv4 options: to the stack
	COUNTER_PASS_NO_ROUTE,    // no usable route: to the stack
	COUNTER_PASS_NO_FLOW,     // TCP non-SYN of an unknown or expired flow
	COUNTER_PASS_NO_NODE,     // no healthy node: to the stack
	COUNTER_DROP_TTL,         // TTL / hop limit would reach 0
	COUNTER_DROP_REWRITE,     // a rewrite helper failed half-way
	COUNTER_DROP_CONNTRACK,   // the flow could not be recorded
	COUNTER_REDIRECT_PEER,
	COUNTER_REDIRECT_NEIGH,
	COUNTER_MAX,
};

// enum counter is only used as an integer, so nothing would put it in BTF;
// this read-only global does, so that bpf2go generates the Go constants from
// the single definition here. (The other enums have such anchors too.)
volatile const enum counter btf_counter;

// Counter n of service s lives at index s * COUNTER_MAX + n.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES * COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_counters SEC(".maps");

static __always_inline void count(__u32 service_id, enum counter c, __u64 n)
{
	if (service_id >= MAX_SERVICES)
		return;
	__u32 key = service_id * COUNTER_MAX + c;
	__u64 *v = bpf_map_lookup_elem(&ebpfwd_counters, &key);
	if (v)
		*v += n; // per-CPU slot: no atomic needed
}

#endif // EBPFWD_LIB_COUNTERS_H
