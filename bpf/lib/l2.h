// SPDX-License-Identifier: GPL-2.0
//
// Layer-2 paths: how to reach a neighbour without asking the FIB, and
// learning them from the packets that arrive.

#ifndef EBPFWD_LIB_L2_H
#define EBPFWD_LIB_L2_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>

// How to reach a neighbour at layer 2: through device ifindex, from our_mac
// to peer_mac. Conntrack learns one per side of a flow from its packets;
// userspace sets one on nodes reached through a splice link.
// ifindex 0: none.
struct l2_path {
	__u32 ifindex;
	__u8 peer_mac[ETH_ALEN];
	__u8 our_mac[ETH_ALEN];
};

_Static_assert(sizeof(struct l2_path) == 16, "learn_path compares struct l2_path as four words");

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
	// Compared as the four 32-bit words the struct is (asserted above).
	const __u32 *a = (const __u32 *)&seen, *b = (const __u32 *)path;
	if (a[0] != b[0] || a[1] != b[1] || a[2] != b[2] || a[3] != b[3])
		*path = seen;
}

#endif // EBPFWD_LIB_L2_H
