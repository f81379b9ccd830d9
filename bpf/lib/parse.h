// SPDX-License-Identifier: GPL-2.0
//
// Packet parsing: the tuple and the facts about an IPv4/IPv6 TCP/UDP packet
// that decide whether the datapath may translate it. Headers are copied out
// with bpf_skb_load_bytes, so no bounds checks against skb->data_end are
// needed and non-linear skbs parse the same.

#ifndef EBPFWD_LIB_PARSE_H
#define EBPFWD_LIB_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "proto.h"
#include "tuple.h"

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

#endif // EBPFWD_LIB_PARSE_H
