// SPDX-License-Identifier: GPL-2.0
//
// Services and their nodes as userspace configures them: the key a packet's
// destination is looked up by, how a node is picked, and where nodes are.

#ifndef EBPFWD_LIB_SERVICE_H
#define EBPFWD_LIB_SERVICE_H

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "l2.h"
#include "maps.h"

// What a packet's destination is matched against: a service is an address,
// a port and a protocol.
struct service_key {
	__be32 addr[4];
	__be16 port;
	__u8 proto;
	__u8 family; // 4 or 6
};

enum strategy {
	STRATEGY_ROUND_ROBIN = 0,
	STRATEGY_RANDOM = 1,
	STRATEGY_HASH = 2, // by client address: a client sticks to a node
};

struct service {
	__u32 id; // 1..MAX_SERVICES-1, indexes the counters
	__u32 node_count;
	__u32 strategy; // enum strategy
	__u32 rr_next;  // round-robin cursor, advanced atomically
	__u64 idle_timeout_ns; // TCP established or UDP flow without traffic
	// A node that failed this many new flows in a row gets no more until
	// it answers one or userspace sets it healthy again (see health.h);
	// 0: the program never takes a node out itself.
	__u32 max_fails;
	__u32 pad;
};

// Node index (0..node_count-1) of service service_id.
struct node_key {
	__u32 service_id;
	__u32 index;
};

struct node {
	__be32 addr[4];
	__be32 snat_addr[4]; // our address on the node's side, replies come to it
	__be16 port;
	__u8 healthy;
	__u8 pad;
	// Egress device towards the node as the loader's route lookup found it
	// (0: unknown). Used when bpf_fib_lookup refuses (forwarding disabled).
	__u32 ifindex;
	// A fixed way to the node, set for nodes of another namespace that
	// the listen namespace has no route to: our end of the splice link
	// (a veth whose peer lives in that namespace) and both its MACs. When
	// set, the FIB is never asked: the listen namespace's routes, which
	// may lead elsewhere or nowhere, must not matter for these flows.
	struct l2_path egress;
	// New flows the node failed in a row (health.h), added atomically:
	// flows of several CPUs fail at once.
	__u32 fails;
	__u32 pad2;
};

// Puts enum strategy in BTF for bpf2go (see btf_counter in counters.h).
volatile const enum strategy btf_strategy;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service_key);
	__type(value, struct service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_services SEC(".maps");

// Sized for 16 nodes per service on average: one service may have up to
// MAX_NODES, but not every service that many.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES * 16);
	__type(key, struct node_key);
	__type(value, struct node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_nodes SEC(".maps");

#endif // EBPFWD_LIB_SERVICE_H
