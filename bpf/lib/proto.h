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

#endif // EBPFWD_LIB_PROTO_H
