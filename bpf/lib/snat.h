// SPDX-License-Identifier: GPL-2.0
//
// SNAT port allocation. A new flow's reply tuple (node -> our SNAT address)
// needs a port no other flow to that node holds; inserting the reply tuple
// into the reverse conntrack map with BPF_NOEXIST is what reserves it, so
// allocation needs no lock and no free list.

#ifndef EBPFWD_LIB_SNAT_H
#define EBPFWD_LIB_SNAT_H

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "conntrack.h"
#include "tuple.h"

// How many SNAT ports one new flow tries before it gives up: linear probing
// from a hashed start keeps the common case at one map update and bounds the
// worst case (a nearly full range) for the verifier and for latency.
#define SNAT_PROBES 32

// ---- configuration (volatile const: set by the loader before load) ----

// SNAT source ports, inclusive, host order. The default sits below the
// kernel's default ip_local_port_range (32768-60999), so that our flows never
// collide with connections the gateway namespace's own sockets open, and is
// wide: at one node, the range bounds the flows open or recently closed.
volatile const __u16 snat_port_min = 1024;
volatile const __u16 snat_port_max = 32767;

// reclaim_if_stale frees a reverse entry whose flow is gone, expired, closed
// a moment ago (ct_port_reusable) or belongs to another reply tuple (a lost
// race), so that its SNAT port can be reused before userspace garbage
// collection gets to it.
static __always_inline int reclaim_if_stale(const struct tuple *reply, __u64 now)
{
	struct tuple *orig_p = bpf_map_lookup_elem(&ebpfwd_reverse, reply);
	if (!orig_p)
		return 1; // freed meanwhile
	struct tuple orig = *orig_p;
	struct ct_entry *ct = bpf_map_lookup_elem(&ebpfwd_conntrack, &orig);
	if (ct && tuple_equal(&ct->reply, reply) && !ct_port_reusable(ct, now))
		return 0;
	if (ct && tuple_equal(&ct->reply, reply))
		bpf_map_delete_elem(&ebpfwd_conntrack, &orig);
	bpf_map_delete_elem(&ebpfwd_reverse, reply);
	return 1;
}

// snat_try reserves port for the flow orig, freeing a stale holder of it
// first. reply must be complete except for its dport.
static __always_inline int snat_try(struct tuple *reply, const struct tuple *orig, __u16 port, __u64 now)
{
	reply->dport = bpf_htons(port);
	if (!bpf_map_update_elem(&ebpfwd_reverse, reply, orig, BPF_NOEXIST))
		return 1;
	return reclaim_if_stale(reply, now) && !bpf_map_update_elem(&ebpfwd_reverse, reply, orig, BPF_NOEXIST);
}

// snat_allocate picks a SNAT port for a new flow and reserves it by inserting
// reply -> orig into the reverse map. reply must be complete except for its
// dport. Returns 0 when every probed port is taken.
//
// The client's own source port comes first when it lies in the range and no
// other flow to the node holds it, as the kernel's NAT keeps it: one map
// update and no hashing, and the node sees the ports the client's stack
// chose, which that stack keeps unique and cycles through in order, rather
// than ports drawn at random, which come back to a node's TIME_WAIT sooner.
// A collision (another client's flow holds that port) falls back to probing.
//
// Probing starts at a hashed port and steps by a hashed odd stride (double
// hashing): linear probing from a hashed start grows runs of taken ports,
// and with half of the range taken about 2% of new flows found 32 taken
// ports in a row (bpf/cost_test.go); with a stride each probe is close to an
// independent draw, so a flow fails only when the range is nearly full. An
// odd stride shares no factor 2 with the range, so its probes are distinct
// while the range's largest power-of-two divisor exceeds SNAT_PROBES (1024
// for the default 31744 = 2^10 * 31); in other ranges a probe may repeat an
// earlier one, which costs a probe, never correctness. A range of at most
// SNAT_PROBES ports is walked in order, every port once.
static __always_inline __u16 snat_allocate(struct tuple *reply, const struct tuple *orig, __u64 now)
{
	__u16 own = bpf_ntohs(orig->sport);
	if (own >= snat_port_min && own <= snat_port_max && snat_try(reply, orig, own, now))
		return own;

	__u32 range = (__u32)snat_port_max - snat_port_min + 1;
	__u32 h = hash_tuple(orig) ^ hash_addr(reply->src, reply->sport);
	__u32 start = h % range;
	__u32 stride = range <= SNAT_PROBES ? 1 : (mix32(h) % (range - 1)) | 1; // 1..range-1

	for (__u32 i = 0; i < SNAT_PROBES; i++) {
		if (i >= range)
			break;
		__u16 port = snat_port_min + (start + i * stride) % range;
		if (snat_try(reply, orig, port, now))
			return port;
	}
	return 0;
}

#endif // EBPFWD_LIB_SNAT_H
