package bpf

import (
	"encoding/binary"
	"net/netip"
)

// The BPF structs hold addresses and ports in network byte order, but
// bpf2go types them as native integers ([4]uint32, uint16). These helpers
// convert between the two so that the bytes in map memory are exactly the
// bytes on the wire.

// Addr returns a as the [4]uint32 the BPF structs hold: IPv4 in the first
// word, the other three zero; IPv6 in all four.
func Addr(a netip.Addr) [4]uint32 {
	var w [4]uint32
	if a.Is4() {
		b := a.As4()
		w[0] = binary.NativeEndian.Uint32(b[:])
		return w
	}
	b := a.As16()
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

// AddrFrom is the inverse of Addr for the given IP version (4 or 6).
func AddrFrom(w [4]uint32, family uint8) netip.Addr {
	var b [16]byte
	for i := range w {
		binary.NativeEndian.PutUint32(b[4*i:], w[i])
	}
	if family == 4 {
		return netip.AddrFrom4([4]byte(b[:4]))
	}
	return netip.AddrFrom16(b)
}

// Port returns p as the network-order uint16 the BPF structs hold.
func Port(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return binary.NativeEndian.Uint16(b[:])
}

// PortFrom is the inverse of Port.
func PortFrom(p uint16) uint16 {
	var b [2]byte
	binary.NativeEndian.PutUint16(b[:], p)
	return binary.BigEndian.Uint16(b[:])
}

// Family returns the IP version of a (4 or 6) as the BPF structs hold it.
func Family(a netip.Addr) uint8 {
	if a.Is4() {
		return 4
	}
	return 6
}
