// SPDX-License-Identifier: GPL-2.0
//
// Passive node health: what a new flow's packets tell of its node, with no
// probe traffic. A node fails a flow when it refuses the connection (an RST
// in reply to the SYN), when an ICMP destination unreachable comes back for
// the flow, or when the client sends its SYN again with no SYN-ACK after
// tcp_syn_answer_bound_ns; it answers a flow with a SYN-ACK, or with the
// first reply of a UDP flow. A flow is judged once, whichever comes first
// (CT_F_NODE_JUDGED), except that every ICMP unreachable of a UDP flow
// counts: UDP has no handshake, and a port that closes under a live
// session shows no other way.
//
// Two records of it: per-CPU counters of every outcome per node, which
// userspace reads into its maxFails/failTimeout marking (and metrics), and
// the node's consecutive failures in struct node, which let the program stop
// choosing a node at once when they reach the service's max_fails: a poll
// by userspace would let every new flow of the poll interval fail too.

#ifndef EBPFWD_LIB_HEALTH_H
#define EBPFWD_LIB_HEALTH_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "conntrack.h"
#include "maps.h"
#include "proto.h"
#include "service.h"
#include "tuple.h"

// A client that sends its SYN again this long after the first has had no
// SYN-ACK: Linux retransmits a SYN after 1s (TCP_TIMEOUT_INIT), and a
// duplicate of the first SYN (a retransmission by a middlebox, or the same
// SYN seen twice) comes well within this bound. The loader may set it.
volatile const __u64 tcp_syn_answer_bound_ns = 500ULL * 1000000ULL;

enum node_event {
	NODE_FAIL_REFUSED = 0,  // RST from the node in reply to the SYN
	NODE_FAIL_UNREACHABLE,  // ICMP destination unreachable for the flow
	NODE_FAIL_SYN_TIMEOUT,  // the client resent its SYN, unanswered
	NODE_ANSWERED,          // SYN-ACK, or a UDP flow's first reply
	NODE_EVENT_MAX,
};

// Puts enum node_event in BTF for bpf2go (see btf_counter in counters.h).
volatile const enum node_event btf_node_event;

struct node_events {
	__u64 n[NODE_EVENT_MAX];
};

// Per node (keyed as ebpfwd_nodes), per CPU. Created by the program on a
// node's first event, deleted by userspace with the node; sized as
// ebpfwd_nodes.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_SERVICES * 16);
	__type(key, struct node_key);
	__type(value, struct node_events);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_node_events SEC(".maps");

// node_selectable says whether a node may get new flows: userspace has not
// marked it dead, and it has not failed max_fails flows in a row since it
// last answered one (max_fails 0: only userspace decides).
static __always_inline int node_selectable(const struct service *svc, const struct node *node)
{
	if (!node->healthy)
		return 0;
	return svc->max_fails == 0 || node->fails < svc->max_fails;
}

// flow_node is the node of a flow, or 0 when that node is no longer at its
// index (a reload moved or removed it: another node must not take the
// flow's blame or credit).
static __always_inline struct node *flow_node(const struct ct_entry *ct)
{
	struct node_key key = {.service_id = ct->service_id, .index = ct->node_index};
	struct node *node = bpf_map_lookup_elem(&ebpfwd_nodes, &key);
	if (!node || node->port != ct->reply.sport || node->addr[0] != ct->reply.src[0] ||
	    node->addr[1] != ct->reply.src[1] || node->addr[2] != ct->reply.src[2] ||
	    node->addr[3] != ct->reply.src[3])
		return 0;
	return node;
}

// node_count records an event of a flow's node and returns the node (0: see
// flow_node).
static __always_inline struct node *node_count(struct ct_entry *ct, enum node_event ev)
{
	struct node *node = flow_node(ct);
	if (!node)
		return 0;
	if (ev == NODE_ANSWERED) {
		if (node->fails) // written only on change: every new flow reads the node
			node->fails = 0;
	} else {
		__sync_fetch_and_add(&node->fails, 1);
	}

	struct node_key key = {.service_id = ct->service_id, .index = ct->node_index};
	struct node_events *e = bpf_map_lookup_elem(&ebpfwd_node_events, &key);
	if (!e) {
		struct node_events zero = {};
		bpf_map_update_elem(&ebpfwd_node_events, &key, &zero, BPF_NOEXIST);
		e = bpf_map_lookup_elem(&ebpfwd_node_events, &key);
	}
	if (e && ev < NODE_EVENT_MAX)
		e->n[ev]++; // per-CPU slot: no atomic needed
	return node;
}

// node_judge is node_count once per flow: the flow's first outcome is its
// verdict on the node.
static __always_inline void node_judge(struct ct_entry *ct, enum node_event ev)
{
	if (ct->flags & CT_F_NODE_JUDGED)
		return;
	// Two CPUs may judge one flow at once (a SYN retransmission and the
	// SYN-ACK crossing): the flow then counts twice, which an atomic
	// test-and-set would cost every flow to prevent.
	ct->flags |= CT_F_NODE_JUDGED;
	node_count(ct, ev);
}

// ICMP (RFC 792) and ICMPv6 (RFC 4443) destination unreachable codes that
// say a node cannot take the flow. Fragmentation needed (IPv4 code 4) and
// packet too big (an ICMPv6 type of its own) are path MTU discovery, not a
// failure, and source route failed (code 5) is about a route we never set.
static __always_inline int icmp_fails_node(__u8 code)
{
	switch (code) {
	case ICMP_NET_UNREACH:
	case ICMP_HOST_UNREACH:
	case ICMP_PROT_UNREACH:
	case ICMP_PORT_UNREACH:
	case ICMP_NET_ANO:
	case ICMP_HOST_ANO:
	case ICMP_PKT_FILTERED:
		return 1;
	}
	return 0;
}

static __always_inline int icmp6_fails_node(__u8 code)
{
	switch (code) {
	case ICMPV6_NOROUTE:
	case ICMPV6_ADM_PROHIBITED:
	case ICMPV6_ADDR_UNREACH:
	case ICMPV6_PORT_UNREACH:
	case ICMPV6_POLICY_FAIL:
	case ICMPV6_REJECT_ROUTE:
		return 1;
	}
	return 0;
}

// Size of an ICMP/ICMPv6 header before the quoted packet (type, code,
// checksum, 4 unused bytes).
#define ICMP_ERROR_HDR_LEN 8

// parse_unreachable reads an ICMP(v6) destination unreachable that quotes a
// TCP or UDP packet of ours (snat -> node) and gives the reply tuple of the
// quoted flow (node -> snat), as ebpfwd_reverse is keyed. 0: it is not one.
static __always_inline int parse_unreachable(struct __sk_buff *skb, struct tuple *reply)
{
	__u32 off;
	__u8 proto;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return 0;
		if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_ICMP ||
		    bpf_ntohs(ip.frag_off) & (IP_MF | IP_OFFSET))
			return 0;
		off = ETH_HLEN + ip.ihl * 4;
		__u8 tc[2]; // type, code
		if (bpf_skb_load_bytes(skb, off, tc, sizeof(tc)))
			return 0;
		if (tc[0] != ICMP_DEST_UNREACH || !icmp_fails_node(tc[1]))
			return 0;
		off += ICMP_ERROR_HDR_LEN;
		struct iphdr in;
		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)))
			return 0;
		if (in.version != 4 || in.ihl < 5)
			return 0;
		proto = in.protocol;
		reply->family = 4;
		reply->src[0] = in.daddr;
		reply->dst[0] = in.saddr;
		off += in.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return 0;
		if (ip6.version != 6 || ip6.nexthdr != IPPROTO_ICMPV6)
			return 0;
		off = ETH_HLEN + sizeof(ip6);
		__u8 tc[2];
		if (bpf_skb_load_bytes(skb, off, tc, sizeof(tc)))
			return 0;
		if (tc[0] != ICMPV6_DEST_UNREACH || !icmp6_fails_node(tc[1]))
			return 0;
		off += ICMP_ERROR_HDR_LEN;
		struct ipv6hdr in;
		if (bpf_skb_load_bytes(skb, off, &in, sizeof(in)))
			return 0;
		if (in.version != 6)
			return 0;
		proto = in.nexthdr; // a packet of ours has no extension headers
		reply->family = 6;
		__builtin_memcpy(reply->src, &in.daddr, 16);
		__builtin_memcpy(reply->dst, &in.saddr, 16);
		off += sizeof(in);
	} else {
		return 0;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 0;
	__be16 ports[2]; // as we sent them: snat port, node port
	if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)))
		return 0;
	reply->proto = proto;
	reply->sport = ports[1];
	reply->dport = ports[0];
	return 1;
}

#endif // EBPFWD_LIB_HEALTH_H
