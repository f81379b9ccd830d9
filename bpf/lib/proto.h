// SPDX-License-Identifier: GPL-2.0
//
// Protocol numbers and header bits the datapath needs that no uapi header
// usable from BPF provides.

#ifndef EBPFWD_LIB_PROTO_H
#define EBPFWD_LIB_PROTO_H

// Address families as the kernel numbers them (the uapi headers leave them
// to libc's sys/socket.h, which is not for BPF); bpf_fib_lookup wants these.
#define AF_INET 2
#define AF_INET6 10

// IPv4 fragment bits of iphdr.frag_off (host order): "more fragments" and the
// 13-bit fragment offset.
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// IPv6 next-header value of a fragment extension header (RFC 8200).
#define IPPROTO_FRAGMENT_HDR 44

// Offset of the flags byte in the TCP header (RFC 9293); the byte before it
// holds the data offset. The flag bits follow, named as the kernel's
// net/tcp.h names them (linux/tcp.h's TCP_FLAG_* are 32-bit word masks).
#define TCP_FLAGS_BYTE 13
#define TCPHDR_FIN 0x01
#define TCPHDR_SYN 0x02
#define TCPHDR_RST 0x04
#define TCPHDR_ACK 0x10

// ICMP destination unreachable (RFC 792, type 3) and the codes that say the
// destination cannot take a flow (RFC 792, RFC 1812 for 9, 10 and 13), as
// linux/icmp.h names them (that header is not vendored: these are all the
// program needs of it).
#define ICMP_DEST_UNREACH 3
#define ICMP_NET_UNREACH 0
#define ICMP_HOST_UNREACH 1
#define ICMP_PROT_UNREACH 2
#define ICMP_PORT_UNREACH 3
#define ICMP_NET_ANO 9
#define ICMP_HOST_ANO 10
#define ICMP_PKT_FILTERED 13

// ICMPv6 destination unreachable (RFC 4443, type 1) and its codes, as
// linux/icmpv6.h names them.
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_NOROUTE 0
#define ICMPV6_ADM_PROHIBITED 1
#define ICMPV6_ADDR_UNREACH 3
#define ICMPV6_PORT_UNREACH 4
#define ICMPV6_POLICY_FAIL 5
#define ICMPV6_REJECT_ROUTE 6

#endif // EBPFWD_LIB_PROTO_H
