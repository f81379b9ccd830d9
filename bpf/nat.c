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
// Configuration reaches the program through the volatile const globals below
// (set by the loader before load) and the maps, never by recompiling.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char __license[] SEC("license") = "GPL";

// Address families as the kernel numbers them (linux/socket.h is not usable
// from BPF); bpf_fib_lookup wants these.
#define AF_INET 2
#define AF_INET6 10

// IPv4 fragment bits of iphdr.frag_off (host order): "more fragments" and the
// 13-bit fragment offset.
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// IPv6 next-header value of a fragment extension header (RFC 8200).
#define IPPROTO_FRAGMENT_HDR 44

// Byte offsets inside the headers that the rewrite touches.
#define IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP4_TTL_OFF (ETH_HLEN + offsetof(struct iphdr, ttl))
#define IP4_ADDRS_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP6_HOPLIMIT_OFF (ETH_HLEN + offsetof(struct ipv6hdr, hop_limit))
#define IP6_ADDRS_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define TCP_CSUM_OFF offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF offsetof(struct udphdr, check)

// Bytes of the TCP header that carry the flags (doff/res byte, flags byte).
#define TCP_FLAGS_BYTE 13
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

// Size limits of the maps. MAX_SERVICES bounds service ids (id 0 holds the
// counters of packets that match no service). MAX_NODES bounds the nodes of
// one service and therefore the node-selection loop. MAX_FLOWS sizes both
// conntrack maps; LRU eviction beyond it drops the oldest flows.
#define MAX_SERVICES 1024
#define MAX_NODES 64
#define MAX_FLOWS 262144
#define MAX_IFACES 256

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

// ---- map types (shared with Go through bpf2go -type) ----

// A 5-tuple. IPv4 addresses sit in the first word, the rest zero.
struct tuple {
	__be32 src[4];
	__be32 dst[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family; // 4 or 6
	__u16 pad;
};

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
};

struct node_key {
	__u32 service_id;
	__u32 index;
};

// How to reach a neighbour at layer 2: through device ifindex, from our_mac
// to peer_mac. Conntrack learns one per side of a flow from its packets;
// userspace sets one on nodes reached through a splice link.
// ifindex 0: none.
struct l2_path {
	__u32 ifindex;
	__u8 peer_mac[ETH_ALEN];
	__u8 our_mac[ETH_ALEN];
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
};

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
	__u8 pad;
	// Where the last packet of each side came from. With forwarding off
	// bpf_fib_lookup refuses, and these take its place.
	struct l2_path to_client;
	struct l2_path to_node;
};

enum iface_flags {
	// A veth whose peer is in another namespace: bpf_redirect_peer to it
	// moves a packet from our ingress straight to the peer's ingress.
	IFACE_PEER_REDIRECT = 1,
};

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

// The enums above are only used as integers, so nothing would put them in
// BTF; these read-only globals do, so that bpf2go can generate the Go
// constants from the single definition here.
volatile const enum counter btf_counter;
volatile const enum ct_state btf_ct_state;
volatile const enum iface_flags btf_iface_flags;
volatile const enum strategy btf_strategy;

// ---- maps, pinned by name under the loader's pin directory ----

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct service_key);
	__type(value, struct service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES * 16);
	__type(key, struct node_key);
	__type(value, struct node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_nodes SEC(".maps");

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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_IFACES);
	__type(key, __u32); // ifindex
	__type(value, __u32); // enum iface_flags
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_ifaces SEC(".maps");

// Counter n of service s lives at index s * COUNTER_MAX + n.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_SERVICES * COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ebpfwd_counters SEC(".maps");

// ---- helpers ----

static __always_inline void count(__u32 service_id, enum counter c, __u64 n)
{
	if (service_id >= MAX_SERVICES)
		return;
	__u32 key = service_id * COUNTER_MAX + c;
	__u64 *v = bpf_map_lookup_elem(&ebpfwd_counters, &key);
	if (v)
		*v += n; // per-CPU slot: no atomic needed
}

// What parse found about a packet.
struct packet {
	struct tuple t;     // as it arrived
	__u32 l4_off;       // offset of the TCP/UDP header
	__u32 payload_len;  // L4 payload bytes (whole GSO packet)
	__u32 segs;         // GSO segments, 1 for a plain packet
	__u8 tcp_flags;
	__u8 hop_limit;     // IPv4 TTL or IPv6 hop limit
	__u8 ip_options;
	__u8 fragment;      // 0: none, 1: first fragment, 2: later fragment
};

enum parse_result {
	PARSE_OK,
	PARSE_NOT_OURS, // not IPv4/IPv6 TCP/UDP: never counted
};

static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	__u32 l4_hdr_len;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
			return PARSE_NOT_OURS;
		if (ip.version != 4 || ip.ihl < 5)
			return PARSE_NOT_OURS;
		if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
			return PARSE_NOT_OURS;
		p->t.family = 4;
		p->t.proto = ip.protocol;
		p->t.src[0] = ip.saddr;
		p->t.dst[0] = ip.daddr;
		p->hop_limit = ip.ttl;
		p->ip_options = ip.ihl > 5;
		__u16 frag = bpf_ntohs(ip.frag_off);
		if (frag & IP_OFFSET)
			p->fragment = 2;
		else if (frag & IP_MF)
			p->fragment = 1;
		p->l4_off = ETH_HLEN + ip.ihl * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)))
			return PARSE_NOT_OURS;
		if (ip6.version != 6)
			return PARSE_NOT_OURS;
		p->t.family = 6;
		__builtin_memcpy(p->t.src, &ip6.saddr, 16);
		__builtin_memcpy(p->t.dst, &ip6.daddr, 16);
		p->hop_limit = ip6.hop_limit;
		p->l4_off = ETH_HLEN + sizeof(ip6);
		if (ip6.nexthdr == IPPROTO_FRAGMENT_HDR) {
			// Which service a fragment belongs to is unknowable
			// without reassembly; the stack does that.
			p->fragment = 2;
			return PARSE_OK;
		}
		// Other extension headers are not ours to walk: the stack
		// handles them (and the listener serves the flow).
		if (ip6.nexthdr != IPPROTO_TCP && ip6.nexthdr != IPPROTO_UDP)
			return PARSE_NOT_OURS;
		p->t.proto = ip6.nexthdr;
	} else {
		return PARSE_NOT_OURS;
	}

	if (p->fragment == 2)
		return PARSE_OK; // no L4 header in this fragment

	__be16 ports[2];
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)))
		return PARSE_NOT_OURS;
	p->t.sport = ports[0];
	p->t.dport = ports[1];

	if (p->t.proto == IPPROTO_TCP) {
		__u8 hdr[2]; // data offset byte, flags byte
		if (bpf_skb_load_bytes(skb, p->l4_off + TCP_FLAGS_BYTE - 1, hdr, sizeof(hdr)))
			return PARSE_NOT_OURS;
		p->tcp_flags = hdr[1];
		l4_hdr_len = (hdr[0] >> 4) * 4;
	} else {
		l4_hdr_len = sizeof(struct udphdr);
	}
	if (skb->len > p->l4_off + l4_hdr_len)
		p->payload_len = skb->len - p->l4_off - l4_hdr_len;
	p->segs = skb->gso_segs > 1 ? skb->gso_segs : 1;
	return PARSE_OK;
}

// murmur3's 32-bit finaliser: cheap, and every input bit affects every
// output bit, so ports and nodes spread evenly.
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 hash_addr(const __be32 a[4], __u32 seed)
{
	__u32 h = seed;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ a[i]);
	return h;
}

static __always_inline __u32 hash_tuple(const struct tuple *t)
{
	__u32 h = hash_addr(t->src, t->proto);
	h = hash_addr(t->dst, h);
	return mix32(h ^ ((__u32)t->sport << 16 | t->dport));
}

static __always_inline int tuple_equal(const struct tuple *a, const struct tuple *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
#pragma unroll
	for (int i = 0; i < sizeof(struct tuple) / 4; i++)
		if (x[i] != y[i])
			return 0;
	return 1;
}

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
	if (tcp_flags & TCP_FLAG_RST) {
		ct->state = CT_TCP_RESET;
		return;
	}
	if (tcp_flags & TCP_FLAG_SYN && !(tcp_flags & TCP_FLAG_ACK) && from_client &&
	    ct->state >= CT_TCP_CLOSING) {
		// The client reuses the tuple of a finished flow: start over on
		// the same node and SNAT port.
		ct->state = CT_TCP_SYN_SENT;
		ct->fin = 0;
		return;
	}
	if (ct->state == CT_TCP_SYN_SENT && !from_client)
		ct->state = CT_TCP_ESTABLISHED;
	if (tcp_flags & TCP_FLAG_FIN)
		ct->fin |= from_client ? CT_FIN_CLIENT : CT_FIN_NODE;
	if (ct->fin == (CT_FIN_CLIENT | CT_FIN_NODE) && ct->state != CT_TCP_RESET)
		ct->state = CT_TCP_CLOSING;
}

// forget_flow removes a flow from both maps.
static __always_inline void forget_flow(const struct tuple *orig, const struct ct_entry *ct)
{
	struct tuple reply = ct->reply;
	bpf_map_delete_elem(&ebpfwd_reverse, &reply);
	bpf_map_delete_elem(&ebpfwd_conntrack, orig);
}

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

// snat_allocate picks a SNAT port for a new flow and reserves it by inserting
// reply -> orig into the reverse map. reply must be complete except for its
// dport. Returns 0 when every probed port is taken.
static __always_inline __u16 snat_allocate(struct tuple *reply, const struct tuple *orig, __u64 now)
{
	__u32 range = (__u32)snat_port_max - snat_port_min + 1;
	__u32 start = hash_tuple(orig) ^ hash_addr(reply->src, reply->sport);

	for (__u32 i = 0; i < SNAT_PROBES; i++) {
		if (i >= range)
			break;
		__u16 port = snat_port_min + (start + i) % range;
		reply->dport = bpf_htons(port);
		if (!bpf_map_update_elem(&ebpfwd_reverse, reply, orig, BPF_NOEXIST))
			return port;
		if (reclaim_if_stale(reply, now) &&
		    !bpf_map_update_elem(&ebpfwd_reverse, reply, orig, BPF_NOEXIST))
			return port;
	}
	return 0;
}

static __always_inline struct node *select_node(struct service *svc, const struct tuple *t)
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

	// From the chosen index, take the first healthy node.
	struct node_key key = {.service_id = svc->id};
	for (__u32 i = 0; i < MAX_NODES; i++) {
		if (i >= n)
			break;
		key.index = (start + i) % n;
		struct node *node = bpf_map_lookup_elem(&ebpfwd_nodes, &key);
		if (node && node->healthy)
			return node;
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

// rewrite turns the packet's tuple p->t into out (addresses and ports) and
// decrements the TTL / hop limit, keeping every checksum valid: the IPv4
// header checksum and the TCP/UDP checksum including its pseudo-header. The
// csum helpers also keep skb->csum right for CHECKSUM_COMPLETE and only
// touch the pseudo-header sum for CHECKSUM_PARTIAL (GSO) packets.
static __always_inline int rewrite(struct __sk_buff *skb, const struct packet *p, const struct tuple *out)
{
	__u32 l4_csum = p->l4_off + (p->t.proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	// A UDP checksum of 0 means "none" (IPv4): keep it 0, and write a
	// computed 0 as 0xffff (BPF_F_MARK_MANGLED_0).
	__u64 l4_flags = p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 addr_len = p->t.family == 4 ? 4 : 16;

	// Addresses: one diff over source and destination together.
	__be32 old_addrs[8] = {}, new_addrs[8] = {};
	__builtin_memcpy(old_addrs, p->t.src, 16);
	__builtin_memcpy(old_addrs + 4, p->t.dst, 16);
	__builtin_memcpy(new_addrs, out->src, 16);
	__builtin_memcpy(new_addrs + 4, out->dst, 16);
	__s64 diff;
	if (p->t.family == 4) {
		__be32 o[2] = {p->t.src[0], p->t.dst[0]};
		__be32 n[2] = {out->src[0], out->dst[0]};
		diff = bpf_csum_diff(o, sizeof(o), n, sizeof(n), 0);
	} else {
		diff = bpf_csum_diff(old_addrs, sizeof(old_addrs), new_addrs, sizeof(new_addrs), 0);
	}
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, l4_csum, 0, diff, BPF_F_PSEUDO_HDR | l4_flags))
		return -1;

	// Ports: plain L4 header fields, not part of the pseudo-header.
	if (p->t.sport != out->sport &&
	    bpf_l4_csum_replace(skb, l4_csum, p->t.sport, out->sport, l4_flags | sizeof(__be16)))
		return -1;
	if (p->t.dport != out->dport &&
	    bpf_l4_csum_replace(skb, l4_csum, p->t.dport, out->dport, l4_flags | sizeof(__be16)))
		return -1;
	__be16 ports[2] = {out->sport, out->dport};
	if (bpf_skb_store_bytes(skb, p->l4_off, ports, sizeof(ports), 0))
		return -1;

	if (p->t.family == 4) {
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, 0, diff, 0))
			return -1;
		// TTL shares a 16-bit checksum word with the protocol byte.
		__be16 old_word = bpf_htons((__u16)p->hop_limit << 8 | p->t.proto);
		__be16 new_word = bpf_htons((__u16)(p->hop_limit - 1) << 8 | p->t.proto);
		if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old_word, new_word, sizeof(__be16)))
			return -1;
		__u8 ttl = p->hop_limit - 1;
		if (bpf_skb_store_bytes(skb, IP4_TTL_OFF, &ttl, 1, 0))
			return -1;
		__be32 addrs[2] = {out->src[0], out->dst[0]};
		if (bpf_skb_store_bytes(skb, IP4_ADDRS_OFF, addrs, 2 * addr_len, 0))
			return -1;
	} else {
		__u8 hl = p->hop_limit - 1;
		if (bpf_skb_store_bytes(skb, IP6_HOPLIMIT_OFF, &hl, 1, 0))
			return -1;
		if (bpf_skb_store_bytes(skb, IP6_ADDRS_OFF, new_addrs, 2 * addr_len, 0))
			return -1;
	}
	return 0;
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

// learn_path records where a packet came from, writing only on change so
// that the common case stays a read of shared conntrack memory.
static __always_inline void learn_path(struct __sk_buff *skb, struct l2_path *path)
{
	struct l2_path seen = {.ifindex = skb->ifindex};
	__u8 eth[2 * ETH_ALEN];
	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)))
		return;
	__builtin_memcpy(seen.our_mac, eth, ETH_ALEN);
	__builtin_memcpy(seen.peer_mac, eth + ETH_ALEN, ETH_ALEN);
	const __u32 *a = (const __u32 *)&seen, *b = (const __u32 *)path;
	if (a[0] != b[0] || a[1] != b[1] || a[2] != b[2] || a[3] != b[3])
		*path = seen;
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
	struct node *node = select_node(svc, &p->t);
	if (!node) {
		count(svc->id, COUNTER_PASS_NO_NODE, 1);
		return TC_ACT_UNSPEC;
	}

	struct ct_entry ct = {
		.last_seen_ns = now,
		.idle_timeout_ns = svc->idle_timeout_ns,
		.service_id = svc->id,
		.client_ifindex = skb->ifindex,
		.node_ifindex = node->ifindex,
		.state = p->t.proto == IPPROTO_TCP ? CT_TCP_SYN_SENT : CT_UDP,
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

// from_client handles a packet addressed to a service.
static __always_inline int from_client(struct __sk_buff *skb, const struct packet *p, struct service *svc)
{
	__u64 now = bpf_ktime_get_ns();
	struct ct_entry *ct = bpf_map_lookup_elem(&ebpfwd_conntrack, &p->t);
	if (ct && ct_expired(ct, now)) {
		forget_flow(&p->t, ct);
		ct = 0;
	}
	if (!ct) {
		// Only a SYN starts a TCP flow: anything else belongs to a
		// connection the listener owns (or one we forgot), and the
		// stack answers it properly.
		if (p->t.proto == IPPROTO_TCP &&
		    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN) {
			count(svc->id, COUNTER_PASS_NO_FLOW, 1);
			return TC_ACT_UNSPEC;
		}
		return new_flow(skb, p, svc, now);
	}
	ct_update(ct, p->tcp_flags, 1, now);
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
	ct_update(ct, p->tcp_flags, 0, now);
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

SEC("tcx/ingress")
int ebpfwd_nat(struct __sk_buff *skb)
{
	struct packet p = {};
	if (parse(skb, &p) != PARSE_OK)
		return TC_ACT_UNSPEC;

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
