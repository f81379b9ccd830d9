//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// ebpfwd tc datapath: NAT at tcx ingress that moves the packets of a direct
// TCP/UDP forward between namespaces without a socket.
//
// A packet whose (destination address, destination port, protocol) is a
// service is DNATed to a node of that service and SNATed to an address of
// ours through which the node's replies come back; replies are translated
// back. Both directions are redirected straight to the egress device found by
// bpf_fib_lookup, or, where forwarding is off and the FIB refuses, learned
// from the flow's own packets (bpf_redirect_peer for a veth whose peer lives
// in another namespace, else bpf_redirect_neigh). Everything the program cannot handle
// (IP options, fragments, no route, no SNAT port, a TCP segment of an unknown
// flow) goes to the stack untouched (TC_ACT_UNSPEC), where the service's
// ordinary socket listener serves it; every such decision is counted.
//
// Configuration reaches the program through volatile const globals (set by
// the loader before load) and the maps, never by recompiling. The parts a
// future program may share live in lib/, one concern per header:
//
//   lib/maps.h       map conventions and size limits
//   lib/proto.h      protocol numbers and header bits
//   lib/tuple.h      the 5-tuple flow key and its hashes
//   lib/counters.h   per-service per-CPU counters
//   lib/parse.h      packet parsing
//   lib/l2.h         layer-2 paths and learning them
//   lib/service.h    services, nodes and their maps
//   lib/conntrack.h  conntrack entries, TCP states, timeouts, maps
//   lib/health.h     passive node health: what flows tell of their nodes
//   lib/snat.h       SNAT port allocation
//   lib/csum.h       checksum-preserving header rewrites

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lib/conntrack.h"
#include "lib/counters.h"
#include "lib/csum.h"
#include "lib/health.h"
#include "lib/l2.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/proto.h"
#include "lib/service.h"
#include "lib/snat.h"
#include "lib/tuple.h"

char __license[] SEC("license") = "GPL";

enum iface_flags {
	// A veth whose peer is in another namespace: bpf_redirect_peer to it
	// moves a packet from our ingress straight to the peer's ingress.
	IFACE_PEER_REDIRECT = 1,
};

// Puts enum iface_flags in BTF for bpf2go (see btf_counter in counters.h).
volatile const enum iface_flags btf_iface_flags;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
	__type(key, __u32); // ifindex
	__type(value, __u32); // enum iface_flags
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_ifaces SEC(".maps");

// select_node picks the node of a new flow and sets *index to its index.
static __always_inline struct node *select_node(struct service *svc, const struct tuple *t, __u32 *index)
{
	__u32 n = svc->node_count;
	if (n == 0 || n > MAX_NODES)
		return 0;

	__u32 start;
	switch (svc->strategy) {
	case STRATEGY_RANDOM:
		start = bpf_get_prandom_u32();
		break;
	case STRATEGY_HASH:
		start = hash_addr(t->src, t->family);
		break;
	default:
		start = __sync_fetch_and_add(&svc->rr_next, 1);
		break;
	}

	// From the chosen index, take the first selectable node.
	struct node_key key = {.service_id = svc->id};
	for (__u32 i = 0; i < MAX_NODES; i++) {
		if (i >= n)
			break;
		key.index = (start + i) % n;
		struct node *node = bpf_map_lookup_elem(&ebpfwd_nodes, &key);
		if (node && node_selectable(svc, node)) {
			*index = key.index;
			return node;
		}
	}
	return 0;
}

// How a translated packet leaves.
enum route_kind {
	ROUTE_NONE,     // no usable route: to the stack
	ROUTE_DIRECT,   // fib gave egress and MACs
	ROUTE_NEIGH,    // fib gave egress and next hop, neighbour unresolved
	ROUTE_KERNEL,   // fib refused; the kernel routes on the hinted device
};

struct route {
	__u32 kind;
	__u32 ifindex;
	__u8 smac[ETH_ALEN];
	__u8 dmac[ETH_ALEN];
	struct bpf_redir_neigh nh;
};

// route_lookup asks the FIB how a packet from src to dst leaves. tot_len
// stays 0 so that the MTU check passes GSO packets (the stack segments them
// on egress).
//
// bpf_fib_lookup refuses (FWD_DISABLED) when forwarding is off on the
// ingress device, with or without BPF_FIB_LOOKUP_OUTPUT: the kernel checks
// it unconditionally. A gateway namespace need not forward for us, so then
// the path learned from the other side's packets (learned, may be NULL)
// gives egress device and MACs; before anything is learned (the first packet
// of a flow) the route hint from userspace or conntrack lets
// bpf_redirect_neigh route on that device.
static __always_inline void route_lookup(struct __sk_buff *skb, const struct tuple *out, __u32 hint,
					 const struct l2_path *learned, struct route *r)
{
	struct bpf_fib_lookup fib = {};
	fib.l4_protocol = out->proto;
	fib.ifindex = skb->ifindex;
	if (out->family == 4) {
		fib.family = AF_INET;
		fib.ipv4_src = out->src[0];
		fib.ipv4_dst = out->dst[0];
	} else {
		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, out->src, 16);
		__builtin_memcpy(fib.ipv6_dst, out->dst, 16);
	}

	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		r->kind = ROUTE_DIRECT;
		r->ifindex = fib.ifindex;
		__builtin_memcpy(r->smac, fib.smac, ETH_ALEN);
		__builtin_memcpy(r->dmac, fib.dmac, ETH_ALEN);
		break;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		r->kind = ROUTE_NEIGH;
		r->ifindex = fib.ifindex;
		if (out->family == 4) {
			r->nh.nh_family = AF_INET;
			r->nh.ipv4_nh = fib.ipv4_dst; // the gateway when there is one
		} else {
			r->nh.nh_family = AF_INET6;
			__builtin_memcpy(r->nh.ipv6_nh, fib.ipv6_dst, 16);
		}
		break;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		if (learned && learned->ifindex) {
			r->kind = ROUTE_DIRECT;
			r->ifindex = learned->ifindex;
			__builtin_memcpy(r->dmac, learned->peer_mac, ETH_ALEN);
			__builtin_memcpy(r->smac, learned->our_mac, ETH_ALEN);
			break;
		}
		if (hint) {
			r->kind = ROUTE_KERNEL;
			r->ifindex = hint;
			break;
		}
		r->kind = ROUTE_NONE;
		break;
	default:
		r->kind = ROUTE_NONE;
		break;
	}
}

// route_fixed routes along a path userspace fixed (a splice link): no FIB,
// straight out of the path's device with its MACs.
static __always_inline void route_fixed(const struct l2_path *path, struct route *r)
{
	r->kind = ROUTE_DIRECT;
	r->ifindex = path->ifindex;
	__builtin_memcpy(r->dmac, path->peer_mac, ETH_ALEN);
	__builtin_memcpy(r->smac, path->our_mac, ETH_ALEN);
}

// deliver sends a rewritten packet out along r.
static __always_inline int deliver(struct __sk_buff *skb, struct route *r, __u32 service_id)
{
	// An ingress timestamp is a receive time; on egress, fq would take it
	// for a delivery time and hold the packet.
	bpf_skb_set_tstamp(skb, 0, BPF_SKB_TSTAMP_UNSPEC);

	if (r->kind == ROUTE_DIRECT) {
		__u8 macs[2 * ETH_ALEN];
		__builtin_memcpy(macs, r->dmac, ETH_ALEN);
		__builtin_memcpy(macs + ETH_ALEN, r->smac, ETH_ALEN);
		if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0)) {
			count(service_id, COUNTER_DROP_REWRITE, 1);
			return TC_ACT_SHOT;
		}
		__u32 key = r->ifindex;
		__u32 *flags = bpf_map_lookup_elem(&ebpfwd_ifaces, &key);
		if (flags && (*flags & IFACE_PEER_REDIRECT)) {
			// The peer's stack sees the packet without a fresh
			// eth_type_trans: mark it as addressed to the host.
			bpf_skb_change_type(skb, PACKET_HOST);
			count(service_id, COUNTER_REDIRECT_PEER, 1);
			return bpf_redirect_peer(r->ifindex, 0);
		}
		count(service_id, COUNTER_REDIRECT_NEIGH, 1);
		return bpf_redirect_neigh(r->ifindex, 0, 0, 0);
	}
	count(service_id, COUNTER_REDIRECT_NEIGH, 1);
	if (r->kind == ROUTE_NEIGH)
		return bpf_redirect_neigh(r->ifindex, &r->nh, sizeof(r->nh), 0);
	return bpf_redirect_neigh(r->ifindex, 0, 0, 0);
}

// translate_and_deliver is the common tail of both directions. With fixed
// set, learned is the path userspace fixed and is taken without a FIB lookup.
static __always_inline int translate_and_deliver(struct __sk_buff *skb, const struct packet *p,
						 const struct tuple *out, __u32 hint,
						 const struct l2_path *learned, int fixed,
						 __u32 service_id, int up)
{
	struct route r = {};
	if (fixed)
		route_fixed(learned, &r);
	else
		route_lookup(skb, out, hint, learned, &r);
	if (r.kind == ROUTE_NONE) {
		count(service_id, COUNTER_PASS_NO_ROUTE, 1);
		return TC_ACT_UNSPEC;
	}
	if (rewrite(skb, p, out)) {
		count(service_id, COUNTER_DROP_REWRITE, 1);
		return TC_ACT_SHOT;
	}
	count(service_id, up ? COUNTER_PACKETS_UP : COUNTER_PACKETS_DOWN, p->segs);
	count(service_id, up ? COUNTER_BYTES_UP : COUNTER_BYTES_DOWN, p->payload_len);
	return deliver(skb, &r, service_id);
}

// forward_tuple is what a client's packet becomes: snat -> node.
static __always_inline void forward_tuple(const struct ct_entry *ct, struct tuple *out)
{
	__builtin_memcpy(out->src, ct->reply.dst, 16);
	__builtin_memcpy(out->dst, ct->reply.src, 16);
	out->sport = ct->reply.dport;
	out->dport = ct->reply.sport;
	out->proto = ct->reply.proto;
	out->family = ct->reply.family;
}

static __always_inline int new_flow(struct __sk_buff *skb, const struct packet *p, struct service *svc, __u64 now)
{
	__u32 node_index = 0;
	struct node *node = select_node(svc, &p->t, &node_index);
	if (!node) {
		count(svc->id, COUNTER_PASS_NO_NODE, 1);
		return TC_ACT_UNSPEC;
	}

	struct ct_entry ct = {
		.last_seen_ns = now,
		.created_ns = now,
		.bytes_up = p->payload_len,
		.packets_up = p->segs,
		.idle_timeout_ns = svc->idle_timeout_ns,
		.service_id = svc->id,
		.client_ifindex = skb->ifindex,
		.node_ifindex = node->ifindex,
		.state = p->t.proto == IPPROTO_TCP ? CT_TCP_SYN_SENT : CT_UDP,
		.node_index = node_index,
	};
	learn_path(skb, &ct.to_client);
	if (node->egress.ifindex) {
		ct.to_node = node->egress;
		ct.flags |= CT_F_NODE_EGRESS_FIXED;
	}
	__builtin_memcpy(ct.reply.src, node->addr, 16);
	__builtin_memcpy(ct.reply.dst, node->snat_addr, 16);
	ct.reply.sport = node->port;
	ct.reply.proto = p->t.proto;
	ct.reply.family = p->t.family;

	// Route before reserving anything: an unroutable flow is the
	// listener's, and must not hold a SNAT port.
	struct tuple out = {};
	forward_tuple(&ct, &out);
	struct route r = {};
	if (ct.flags & CT_F_NODE_EGRESS_FIXED)
		route_fixed(&ct.to_node, &r);
	else
		route_lookup(skb, &out, node->ifindex, 0, &r);
	if (r.kind == ROUTE_NONE) {
		count(svc->id, COUNTER_PASS_NO_ROUTE, 1);
		return TC_ACT_UNSPEC;
	}

	if (!snat_allocate(&ct.reply, &p->t, now)) {
		count(svc->id, COUNTER_SNAT_FAILURES, 1);
		return TC_ACT_UNSPEC;
	}
	if (bpf_map_update_elem(&ebpfwd_conntrack, &p->t, &ct, BPF_NOEXIST)) {
		// Another CPU created the flow first (a retransmitted SYN):
		// give the port back; the retransmission will find the flow.
		bpf_map_delete_elem(&ebpfwd_reverse, &ct.reply);
		count(svc->id, COUNTER_DROP_CONNTRACK, 1);
		return TC_ACT_SHOT;
	}
	count(svc->id, COUNTER_NEW_FLOWS, 1);

	out.sport = ct.reply.dport;
	if (rewrite(skb, p, &out)) {
		count(svc->id, COUNTER_DROP_REWRITE, 1);
		return TC_ACT_SHOT;
	}
	count(svc->id, COUNTER_PACKETS_UP, p->segs);
	count(svc->id, COUNTER_BYTES_UP, p->payload_len);
	return deliver(skb, &r, svc->id);
}

// syn_goes_elsewhere is asked of a client's SYN for a flow still waiting
// for its node's SYN-ACK. Past tcp_syn_answer_bound_ns it is a
// retransmission the node left unanswered, which counts against the node;
// when the node is out of the choice now (this failure or an earlier one,
// an ICMP unreachable, took it out), the flow had better start over on
// another node than wait on this one for the client's next retransmission.
static __always_inline int syn_goes_elsewhere(struct ct_entry *ct, const struct service *svc, __u64 now)
{
	__u64 created = ct->created_ns;
	if (!(now > created && now - created > tcp_syn_answer_bound_ns))
		return 0;
	node_judge(ct, NODE_FAIL_SYN_TIMEOUT);
	struct node *node = flow_node(ct);
	return !node || !node_selectable(svc, node);
}

// from_client handles a packet addressed to a service.
static __always_inline int from_client(struct __sk_buff *skb, const struct packet *p, struct service *svc)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *ct = bpf_map_lookup_elem(&ebpfwd_conntrack, &p->t);
	if (ct && ct_expired(ct, now)) {
		forget_flow(&p->t, ct);
		ct = 0;
	}
	if (ct && ct->state == CT_TCP_SYN_SENT && (p->tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == TCPHDR_SYN &&
	    syn_goes_elsewhere(ct, svc, now)) {
		forget_flow(&p->t, ct);
		ct = 0;
	}
	if (!ct) {
		// Only a SYN starts a TCP flow: anything else belongs to a
		// connection the listener owns (or one we forgot), and the
		// stack answers it properly.
		if (p->t.proto == IPPROTO_TCP &&
		    (p->tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) != TCPHDR_SYN) {
			count(svc->id, COUNTER_PASS_NO_FLOW, 1);
			return TC_ACT_UNSPEC;
		}
		return new_flow(skb, p, svc, now);
	}
	ct_update(ct, p->tcp_flags, 1, now);
	ct_account(ct, 1, p->segs, p->payload_len);
	learn_path(skb, &ct->to_client);
	struct tuple out = {};
	forward_tuple(ct, &out);
	struct l2_path to_node = ct->to_node;
	int fixed = ct->flags & CT_F_NODE_EGRESS_FIXED;
	return translate_and_deliver(skb, p, &out, ct->node_ifindex, &to_node, fixed, ct->service_id, 1);
}

// from_node handles a packet that may be a reply of one of our flows.
static __always_inline int from_node(struct __sk_buff *skb, const struct packet *p)
{
	struct tuple *orig_p = bpf_map_lookup_elem(&ebpfwd_reverse, &p->t);
	if (!orig_p)
		return TC_ACT_UNSPEC;
	struct tuple orig = *orig_p;
	struct ct_entry *ct = bpf_map_lookup_elem(&ebpfwd_conntrack, &orig);
	__u64 now = bpf_ktime_get_ns();
	if (!ct || !tuple_equal(&ct->reply, &p->t) || ct_expired(ct, now)) {
		// A reverse entry without its flow: not ours any more.
		return TC_ACT_UNSPEC;
	}
	if (p->hop_limit <= 1) {
		count(ct->service_id, COUNTER_DROP_TTL, 1);
		return TC_ACT_SHOT;
	}
	// The node's first word on a new flow says whether it took it.
	if (ct->state == CT_UDP)
		node_judge(ct, NODE_ANSWERED);
	else if (ct->state == CT_TCP_SYN_SENT && p->tcp_flags & TCPHDR_RST)
		node_judge(ct, NODE_FAIL_REFUSED);
	else if (ct->state == CT_TCP_SYN_SENT && (p->tcp_flags & (TCPHDR_SYN | TCPHDR_ACK)) == (TCPHDR_SYN | TCPHDR_ACK))
		node_judge(ct, NODE_ANSWERED);
	ct_update(ct, p->tcp_flags, 0, now);
	ct_account(ct, 0, p->segs, p->payload_len);
	// A fixed path stays what userspace set, whatever the replies show.
	if (!(ct->flags & CT_F_NODE_EGRESS_FIXED))
		learn_path(skb, &ct->to_node);

	// Back to what the client expects: service -> client.
	struct tuple out = {};
	__builtin_memcpy(out.src, orig.dst, 16);
	__builtin_memcpy(out.dst, orig.src, 16);
	out.sport = orig.dport;
	out.dport = orig.sport;
	out.proto = orig.proto;
	out.family = orig.family;
	struct l2_path to_client = ct->to_client;
	return translate_and_deliver(skb, p, &out, ct->client_ifindex, &to_client, 0, ct->service_id, 0);
}

// node_unreachable judges the flow an ICMP destination unreachable is
// about: a new TCP flow's node failed it; a UDP flow's node failed it
// whenever it comes (UDP has no handshake: a node that stops, or a port
// that closes, shows only this way). A UDP flow whose node is out of the
// choice then is forgotten, so the client's next datagram starts a new flow
// on another node. The message itself goes on to the stack, as before.
static __always_inline int node_unreachable(struct __sk_buff *skb)
{
	struct tuple reply = {};
	if (!parse_unreachable(skb, &reply))
		return TC_ACT_UNSPEC;
	__u16 port = bpf_ntohs(reply.dport);
	if (port < snat_port_min || port > snat_port_max)
		return TC_ACT_UNSPEC;
	struct tuple *orig_p = bpf_map_lookup_elem(&ebpfwd_reverse, &reply);
	if (!orig_p)
		return TC_ACT_UNSPEC;
	struct tuple orig = *orig_p;
	struct ct_entry *ct = bpf_map_lookup_elem(&ebpfwd_conntrack, &orig);
	if (!ct || !tuple_equal(&ct->reply, &reply))
		return TC_ACT_UNSPEC;
	if (ct->state == CT_TCP_SYN_SENT) {
		node_judge(ct, NODE_FAIL_UNREACHABLE);
		return TC_ACT_UNSPEC;
	}
	if (ct->state != CT_UDP)
		return TC_ACT_UNSPEC; // a TCP node that answered: its flow's own packets tell the rest
	struct node *node = node_count(ct, NODE_FAIL_UNREACHABLE);
	struct service_key key = {.port = orig.dport, .proto = orig.proto, .family = orig.family};
	__builtin_memcpy(key.addr, orig.dst, 16);
	struct service *svc = bpf_map_lookup_elem(&ebpfwd_services, &key);
	if (!node || !svc || !node_selectable(svc, node))
		forget_flow(&orig, ct);
	return TC_ACT_UNSPEC;
}

SEC("tcx/ingress")
int ebpfwd_nat(struct __sk_buff *skb)
{
	struct packet p = {};
	if (parse(skb, &p) != PARSE_OK)
		return node_unreachable(skb);

	if (p.fragment == 2) {
		count(0, COUNTER_PASS_FRAGMENT, 1);
		return TC_ACT_UNSPEC;
	}

	struct service_key key = {
		.port = p.t.dport,
		.proto = p.t.proto,
		.family = p.t.family,
	};
	__builtin_memcpy(key.addr, p.t.dst, 16);
	struct service *svc = bpf_map_lookup_elem(&ebpfwd_services, &key);

	if (p.fragment || p.ip_options) {
		__u32 id = svc ? svc->id : 0;
		count(id, p.fragment ? COUNTER_PASS_FRAGMENT : COUNTER_PASS_IP_OPTIONS, 1);
		return TC_ACT_UNSPEC;
	}

	if (svc) {
		if (p.hop_limit <= 1) {
			count(svc->id, COUNTER_DROP_TTL, 1);
			return TC_ACT_SHOT;
		}
		return from_client(skb, &p, svc);
	}

	// Replies come to a SNAT port: anything else is not ours.
	__u16 dport = bpf_ntohs(p.t.dport);
	if (dport < snat_port_min || dport > snat_port_max)
		return TC_ACT_UNSPEC;
	return from_node(skb, &p);
}
