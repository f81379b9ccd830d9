// SPDX-License-Identifier: GPL-2.0
//
// Connection tracking: one entry per flow, keyed by the tuple as the client
// sends it, plus the reverse map from the reply tuple back to it; the
// flow's TCP state machine and its timeouts. Timestamps are
// bpf_ktime_get_ns (CLOCK_MONOTONIC): only differences of two of them mean
// anything, and every comparison guards against a later "now" that is not.

#ifndef EBPFWD_LIB_CONNTRACK_H
#define EBPFWD_LIB_CONNTRACK_H

#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

#include "l2.h"
#include "maps.h"
#include "proto.h"
#include "tuple.h"

// ---- configuration (volatile const: set by the loader before load) ----

// Timeouts of TCP flows by state, nanoseconds. A flow's idle timeout (TCP
// established, UDP) comes from its service.
volatile const __u64 tcp_syn_timeout_ns = 60ULL * 1000000000ULL;
volatile const __u64 tcp_closing_timeout_ns = 10ULL * 1000000000ULL; // the loader sets it: loader.DefaultTCPClosingTimeout
volatile const __u64 tcp_reset_timeout_ns = 10ULL * 1000000000ULL;

// How long a closed flow (FIN both ways, or reset) keeps its SNAT port from
// a new flow once its last packet passed: long enough for a retransmitted
// FIN or final ACK, short of the closing timeout, which would otherwise
// bound the new-connection rate at range / closing timeout. A reply tuple
// reused this way is what netfilter does with TIME_WAIT entries.
volatile const __u64 tcp_closed_reuse_ns = 2ULL * 1000000000ULL;

enum ct_state {
	CT_TCP_SYN_SENT = 0,
	CT_TCP_ESTABLISHED = 1,
	CT_TCP_CLOSING = 2, // FIN seen both ways
	CT_TCP_RESET = 3,
	CT_UDP = 4,
};

// Flags of ct_entry.fin: which side sent a FIN.
#define CT_FIN_CLIENT 0x01
#define CT_FIN_NODE 0x02

// Flags of ct_entry.flags. NODE_EGRESS_FIXED: to_node is the node's fixed
// egress (struct node.egress), not learned, and replaces the FIB lookup.
#define CT_F_NODE_EGRESS_FIXED 0x01
// NODE_JUDGED: the flow has counted for or against its node (health.h).
#define CT_F_NODE_JUDGED 0x02

// The conntrack entry, keyed by the tuple as the client sends it.
struct ct_entry {
	struct tuple reply; // as the node's replies arrive: node -> snat
	__u64 last_seen_ns; // bpf_ktime_get_ns (CLOCK_MONOTONIC)
	__u64 idle_timeout_ns;
	__u32 service_id;
	__u32 client_ifindex; // where the client's packets arrive; replies leave there
	__u32 node_ifindex;   // route hint towards the node (see struct node)
	__u8 state;           // enum ct_state
	__u8 fin;             // CT_FIN_*
	__u8 flags;           // CT_F_*
	__u8 node_index;      // the node's index in its service (< MAX_NODES), for health.h
	// Where the last packet of each side came from. With forwarding off
	// bpf_fib_lookup refuses, and these take its place.
	struct l2_path to_client;
	struct l2_path to_node;
	// For `ebpfwd conns`: when the flow began (bpf_ktime_get_ns) and the
	// L4 payload and packets (GSO segments) moved each way. One flow's
	// packets of both directions may be handled on two CPUs at once, and
	// so may two packets of one direction (a client multiplexed over two
	// queues): ct_account adds atomically.
	__u64 created_ns;
	__u64 bytes_up;
	__u64 bytes_down;
	__u64 packets_up;
	__u64 packets_down;
};

_Static_assert(MAX_NODES <= 256, "ct_entry.node_index holds a node index in a byte");

// Puts enum ct_state in BTF for bpf2go (see btf_counter in counters.h).
volatile const enum ct_state btf_ct_state;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct tuple);
	__type(value, struct ct_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_conntrack SEC(".maps");

// Reply tuple -> original tuple. Holding an entry here is what reserves a
// SNAT port: allocation inserts with BPF_NOEXIST.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct tuple);
	__type(value, struct tuple);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_reverse SEC(".maps");

static __always_inline __u64 ct_timeout(const struct ct_entry *ct)
{
	switch (ct->state) {
	case CT_TCP_SYN_SENT:
		return tcp_syn_timeout_ns;
	case CT_TCP_CLOSING:
		return tcp_closing_timeout_ns;
	case CT_TCP_RESET:
		return tcp_reset_timeout_ns;
	default:
		return ct->idle_timeout_ns;
	}
}

static __always_inline int ct_expired(const struct ct_entry *ct, __u64 now)
{
	__u64 seen = ct->last_seen_ns;
	return now > seen && now - seen > ct_timeout(ct);
}

// ct_port_reusable says whether a flow's SNAT port may go to a new flow:
// the flow expired, or it closed and has been quiet for tcp_closed_reuse_ns.
static __always_inline int ct_port_reusable(const struct ct_entry *ct, __u64 now)
{
	if (ct_expired(ct, now))
		return 1;
	if (ct->state != CT_TCP_CLOSING && ct->state != CT_TCP_RESET)
		return 0;
	__u64 seen = ct->last_seen_ns;
	return now > seen && now - seen > tcp_closed_reuse_ns;
}

// ct_update moves a flow's state on a packet; from_client says which side
// sent it.
static __always_inline void ct_update(struct ct_entry *ct, __u8 tcp_flags, int from_client, __u64 now)
{
	ct->last_seen_ns = now;
	if (ct->state == CT_UDP)
		return;
	if (tcp_flags & TCPHDR_RST) {
		ct->state = CT_TCP_RESET;
		return;
	}
	if (tcp_flags & TCPHDR_SYN && !(tcp_flags & TCPHDR_ACK) && from_client &&
	    ct->state >= CT_TCP_CLOSING) {
		// The client reuses the tuple of a finished flow: start over on
		// the same node and SNAT port. It is a new connection, so its
		// age and counts start over too (the caller counts this SYN
		// after the reset).
		ct->state = CT_TCP_SYN_SENT;
		ct->fin = 0;
		ct->flags &= ~CT_F_NODE_JUDGED;
		ct->created_ns = now;
		ct->bytes_up = 0;
		ct->bytes_down = 0;
		ct->packets_up = 0;
		ct->packets_down = 0;
		return;
	}
	if (ct->state == CT_TCP_SYN_SENT && !from_client)
		ct->state = CT_TCP_ESTABLISHED;
	if (tcp_flags & TCPHDR_FIN)
		ct->fin |= from_client ? CT_FIN_CLIENT : CT_FIN_NODE;
	if (ct->fin == (CT_FIN_CLIENT | CT_FIN_NODE) && ct->state != CT_TCP_RESET)
		ct->state = CT_TCP_CLOSING;
}

// ct_account counts a packet (segs GSO segments, payload_len L4 payload
// bytes) in its flow.
static __always_inline void ct_account(struct ct_entry *ct, int from_client, __u32 segs, __u32 payload_len)
{
	if (from_client) {
		__sync_fetch_and_add(&ct->packets_up, segs);
		__sync_fetch_and_add(&ct->bytes_up, payload_len);
	} else {
		__sync_fetch_and_add(&ct->packets_down, segs);
		__sync_fetch_and_add(&ct->bytes_down, payload_len);
	}
}

// forget_flow removes a flow from both maps.
static __always_inline void forget_flow(const struct tuple *orig, const struct ct_entry *ct)
{
	struct tuple reply = ct->reply;
	bpf_map_delete_elem(&ebpfwd_reverse, &reply);
	bpf_map_delete_elem(&ebpfwd_conntrack, orig);
}

#endif // EBPFWD_LIB_CONNTRACK_H
