package bpf

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
)

// Hand-built Ethernet/IP/TCP/UDP frames for BPF_PROG_TEST_RUN, and a parser
// that checks every checksum of what the program wrote by recomputing it.

const (
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
	protoTCP      = 6
	protoUDP      = 17
	ethLen        = 14
	ipv4Len       = 20
	ipv6Len       = 40
	tcpLen        = 20
	udpLen        = 8
)

// TCP flags as they appear in the flags byte.
const (
	flagFIN = 0x01
	flagSYN = 0x02
	flagRST = 0x04
	flagACK = 0x10
)

// frame describes a packet to build or a packet parsed back.
type frame struct {
	dstMAC, srcMAC net.HardwareAddr
	src, dst       netip.AddrPort
	proto          uint8
	ttl            uint8 // TTL or hop limit
	tcpFlags       uint8
	payload        []byte
	// zeroUDPChecksum builds an IPv4 UDP datagram without a checksum.
	zeroUDPChecksum bool
	// ipOptions adds 4 bytes of IPv4 options (NOPs + EOL).
	ipOptions bool
	// fragOffset/moreFragments set the IPv4 fragment fields.
	fragOffset    uint16
	moreFragments bool

	// Filled by parseFrame.
	l4Checksum uint16
}

// checksum is the Internet checksum (RFC 1071) of b, continuing from sum.
func checksum(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// pseudoHeaderSum sums the TCP/UDP pseudo-header (RFC 793, RFC 8200 8.1).
func pseudoHeaderSum(src, dst netip.Addr, proto uint8, l4len int) uint32 {
	sum := checksum(0, src.AsSlice())
	sum = checksum(sum, dst.AsSlice())
	sum += uint32(proto)
	return sum + uint32(l4len)
}

func (f frame) build() []byte {
	var l4 []byte
	switch f.proto {
	case protoTCP:
		l4 = make([]byte, tcpLen, tcpLen+len(f.payload))
		binary.BigEndian.PutUint16(l4[0:], f.src.Port())
		binary.BigEndian.PutUint16(l4[2:], f.dst.Port())
		binary.BigEndian.PutUint32(l4[4:], 1000) // sequence number
		l4[12] = tcpLen / 4 << 4
		l4[13] = f.tcpFlags
		binary.BigEndian.PutUint16(l4[14:], 65535) // window
	case protoUDP:
		l4 = make([]byte, udpLen, udpLen+len(f.payload))
		binary.BigEndian.PutUint16(l4[0:], f.src.Port())
		binary.BigEndian.PutUint16(l4[2:], f.dst.Port())
		binary.BigEndian.PutUint16(l4[4:], uint16(udpLen+len(f.payload)))
	}
	l4 = append(l4, f.payload...)
	csumOff := 16
	if f.proto == protoUDP {
		csumOff = 6
	}
	if !(f.proto == protoUDP && f.zeroUDPChecksum) {
		sum := fold(checksum(pseudoHeaderSum(f.src.Addr(), f.dst.Addr(), f.proto, len(l4)), l4))
		c := ^sum
		if c == 0 && f.proto == protoUDP {
			c = 0xffff // RFC 768: a computed 0 is sent as all ones
		}
		binary.BigEndian.PutUint16(l4[csumOff:], c)
	}

	out := make([]byte, 0, ethLen+ipv6Len+len(l4))
	out = append(out, f.dstMAC...)
	out = append(out, f.srcMAC...)
	if f.src.Addr().Is4() {
		out = binary.BigEndian.AppendUint16(out, etherTypeIPv4)
		hdrLen := ipv4Len
		if f.ipOptions {
			hdrLen += 4
		}
		ip := make([]byte, hdrLen)
		ip[0] = 4<<4 | byte(hdrLen/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(hdrLen+len(l4)))
		binary.BigEndian.PutUint16(ip[4:], 0x1234) // identification
		frag := f.fragOffset
		if f.moreFragments {
			frag |= 0x2000
		}
		binary.BigEndian.PutUint16(ip[6:], frag)
		ip[8] = f.ttl
		ip[9] = f.proto
		s, d := f.src.Addr().As4(), f.dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		if f.ipOptions {
			copy(ip[20:], []byte{1, 1, 1, 0}) // NOP NOP NOP EOL
		}
		binary.BigEndian.PutUint16(ip[10:], ^fold(checksum(0, ip)))
		out = append(out, ip...)
	} else {
		out = binary.BigEndian.AppendUint16(out, etherTypeIPv6)
		ip := make([]byte, ipv6Len)
		ip[0] = 6 << 4
		binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
		ip[6] = f.proto
		ip[7] = f.ttl
		s, d := f.src.Addr().As16(), f.dst.Addr().As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		out = append(out, ip...)
	}
	return append(out, l4...)
}

// parseFrame reads a frame back and verifies the IPv4 header checksum and the
// TCP/UDP checksum over the pseudo-header. An IPv4 UDP checksum of 0 is
// reported as zeroUDPChecksum instead of being verified.
func parseFrame(b []byte) (frame, error) {
	var f frame
	if len(b) < ethLen {
		return f, fmt.Errorf("frame of %d bytes is shorter than Ethernet", len(b))
	}
	f.dstMAC = net.HardwareAddr(b[0:6])
	f.srcMAC = net.HardwareAddr(b[6:12])
	var src, dst netip.Addr
	var l4 []byte
	switch et := binary.BigEndian.Uint16(b[12:]); et {
	case etherTypeIPv4:
		ip := b[ethLen:]
		hdrLen := int(ip[0]&0x0f) * 4
		if got := fold(checksum(0, ip[:hdrLen])); got != 0xffff {
			return f, fmt.Errorf("IPv4 header checksum invalid (sum %#04x)", got)
		}
		f.ttl = ip[8]
		f.proto = ip[9]
		src = netip.AddrFrom4([4]byte(ip[12:16]))
		dst = netip.AddrFrom4([4]byte(ip[16:20]))
		l4 = ip[hdrLen:binary.BigEndian.Uint16(ip[2:])]
	case etherTypeIPv6:
		ip := b[ethLen:]
		f.proto = ip[6]
		f.ttl = ip[7]
		src = netip.AddrFrom16([16]byte(ip[8:24]))
		dst = netip.AddrFrom16([16]byte(ip[24:40]))
		l4 = ip[ipv6Len : ipv6Len+int(binary.BigEndian.Uint16(ip[4:]))]
	default:
		return f, fmt.Errorf("unexpected EtherType %#04x", et)
	}
	f.src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(l4[0:]))
	f.dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(l4[2:]))
	switch f.proto {
	case protoTCP:
		f.tcpFlags = l4[13]
		f.l4Checksum = binary.BigEndian.Uint16(l4[16:])
		f.payload = l4[int(l4[12]>>4)*4:]
	case protoUDP:
		f.l4Checksum = binary.BigEndian.Uint16(l4[6:])
		f.payload = l4[udpLen:]
		if f.l4Checksum == 0 && src.Is4() {
			f.zeroUDPChecksum = true
			return f, nil
		}
	}
	if got := fold(checksum(pseudoHeaderSum(src, dst, f.proto, len(l4)), l4)); got != 0xffff {
		return f, fmt.Errorf("%d checksum %#04x invalid for %s -> %s (sum %#04x)", f.proto, f.l4Checksum, f.src, f.dst, got)
	}
	return f, nil
}
