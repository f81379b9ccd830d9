// SPDX-License-Identifier: GPL-2.0
//
// Checksum-preserving header rewrites: a packet's addresses, ports and TTL
// change, and every checksum stays valid without being recomputed from
// scratch (RFC 1624 incremental updates through the kernel's csum helpers).

#ifndef EBPFWD_LIB_CSUM_H
#define EBPFWD_LIB_CSUM_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "parse.h"
#include "tuple.h"

// Byte offsets inside the headers that the rewrite touches.
#define IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP4_TTL_OFF (ETH_HLEN + offsetof(struct iphdr, ttl))
#define IP4_ADDRS_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP6_HOPLIMIT_OFF (ETH_HLEN + offsetof(struct ipv6hdr, hop_limit))
#define IP6_ADDRS_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define TCP_CSUM_OFF offsetof(struct tcphdr, check)
#define UDP_CSUM_OFF offsetof(struct udphdr, check)

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

#endif // EBPFWD_LIB_CSUM_H
