// Package bpf holds ebpfwd's eBPF programs and their generated Go bindings.
//
// nat.c is the tc datapath: NAT at tcx ingress between namespaces; lib/
// holds the headers its programs share, headers/ the vendored kernel and
// libbpf headers. The objects and bindings (nat_x86_bpfel.go,
// nat_x86_bpfel.o) are committed, so building ebpfwd needs no clang; `make
// generate` rebuilds them bit for bit (see README.md).
package bpf

// -target amd64 builds little-endian objects for x86_64 only: the machines
// ebpfwd runs on. -mcpu=v3 enables the atomic fetch-and-add the round-robin
// cursor uses. -nostdinc with -isystem headers: every header comes from
// headers/ (vendored by headers/update.sh), none from the build machine, so
// the output does not depend on its packages; no vmlinux.h is needed. The
// paths are relative (go generate runs here) and bpf2go maps this directory
// to "." in the debug info, so the checkout's location is not recorded.
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target amd64 -type tuple -type service_key -type service -type node_key -type node -type ct_entry -type l2_path -type node_events NAT nat.c -- -nostdinc -isystem headers
