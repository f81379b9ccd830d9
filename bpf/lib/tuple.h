// SPDX-License-Identifier: GPL-2.0
//
// Flow keys: the 5-tuple every conntrack map is keyed by, and the hashes
// that spread tuples over SNAT ports and nodes.

#ifndef EBPFWD_LIB_TUPLE_H
#define EBPFWD_LIB_TUPLE_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>

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

#endif // EBPFWD_LIB_TUPLE_H
