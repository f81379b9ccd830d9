// Package bpf holds ebpfwd's eBPF programs and their generated Go bindings.
//
// nat.c is the tc datapath: NAT at tcx ingress between namespaces. The
// objects and bindings (nat_x86_bpfel.go, nat_x86_bpfel.o) are committed, so
// building ebpfwd needs no clang; `make generate` rebuilds them with clang-19.
package bpf

// -target amd64 builds little-endian objects for x86_64 only: the machines
// ebpfwd runs on. -mcpu=v3 enables the atomic fetch-and-add the round-robin
// cursor uses. The uapi headers come from linux-libc-dev, the helpers from
// libbpf-dev; no vmlinux.h is needed.
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target amd64 -type tuple -type service_key -type service -type node_key -type node -type ct_entry -type l2_path NAT nat.c -- -I/usr/include/x86_64-linux-gnu
