// Package proxyproto reads and writes the PROXY protocol header (HAProxy's
// proxy-protocol.txt, version 1 text and version 2 binary) that carries a
// connection's real client address across a proxy.
//
// It is written here rather than taken from github.com/pires/go-proxyproto
// (the library GOST uses) for three reasons: ebpfwd requires the header
// (that library's default lets a connection without one through as if it
// came from the proxy's address, which would let any client forge its
// place in hash selection and logs by simply not sending one); the bytes
// read past the header must reach the splice(2) relay as pending data on the
// raw socket (relay.Tunnel), which a buffered reader in front of the socket
// hides; and the protocol is small: one line or a 16-byte prefix plus
// addresses. FuzzParse covers the parser.
package proxyproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
)

// Errors of Parse and Read, to tell apart in counters: a peer that sent
// something else, a header that is wrong, and one that never came.
var (
	// ErrNoHeader: the connection does not start with a PROXY header.
	ErrNoHeader = errors.New("no PROXY protocol header")
	// ErrMalformed: the connection starts like a PROXY header but is not a
	// valid one.
	ErrMalformed = errors.New("malformed PROXY protocol header")
	// ErrTimeout: the header did not arrive in time.
	ErrTimeout = errors.New("timed out waiting for the PROXY protocol header")
	// errIncomplete: what was read so far is a valid beginning.
	errIncomplete = errors.New("incomplete PROXY protocol header")
)

const (
	// maxV1 is the longest version 1 line, CRLF included (the spec's
	// "PROXY UNKNOWN" plus two IPv6 addresses and ports).
	maxV1 = 107
	// v2Fixed is the signature, version/command, family and length.
	v2Fixed = 16
	// MaxHeader bounds a version 2 header with its TLVs. The spec lets
	// the length field reach 64 KiB, but TLVs in use (AWS, Azure, SSL
	// details) are a few hundred bytes; a longer one is refused rather
	// than buffered.
	MaxHeader = 4096
)

// v2Signature opens every version 2 header.
var v2Signature = []byte("\r\n\r\n\x00\r\nQUIT\n")

var v1Prefix = []byte("PROXY ")

// Header is one parsed PROXY header.
type Header struct {
	Version int // 1 or 2
	// Local is a header without addresses: version 2's LOCAL command (a
	// health check from the proxy itself), version 1's UNKNOWN, or an
	// address family this package does not carry (AF_UNIX). The
	// connection's own addresses stand.
	Local bool
	// Source is the real client, Destination the address it connected to
	// (both zero when Local).
	Source, Destination netip.AddrPort
}

// Parse reads a header at the start of b and returns it with its length
// in bytes. The error wraps ErrNoHeader when b does not start like a
// header, ErrMalformed when it is not a valid one, and is errIncomplete
// (see Read) when b is a valid beginning that needs more bytes.
func Parse(b []byte) (Header, int, error) {
	if len(b) == 0 {
		return Header{}, 0, errIncomplete
	}
	switch b[0] {
	case v2Signature[0]:
		return parseV2(b)
	case v1Prefix[0]:
		return parseV1(b)
	}
	return Header{}, 0, fmt.Errorf("%w: the connection starts with %q", ErrNoHeader, clip(b))
}

// prefixMatch reports whether b and prefix agree over their common length.
func prefixMatch(b, prefix []byte) bool {
	n := min(len(b), len(prefix))
	return bytes.Equal(b[:n], prefix[:n])
}

func parseV1(b []byte) (Header, int, error) {
	if !prefixMatch(b, v1Prefix) {
		return Header{}, 0, fmt.Errorf("%w: the connection starts with %q", ErrNoHeader, clip(b))
	}
	end := bytes.IndexByte(b[:min(len(b), maxV1)], '\n')
	if end < 0 {
		if len(b) >= maxV1 {
			return Header{}, 0, fmt.Errorf("%w: version 1 line longer than %d bytes", ErrMalformed, maxV1)
		}
		return Header{}, 0, errIncomplete
	}
	if end == 0 || b[end-1] != '\r' {
		return Header{}, 0, fmt.Errorf("%w: version 1 line does not end in CRLF", ErrMalformed)
	}
	line, n := string(b[:end-1]), end+1
	h := Header{Version: 1}
	fields := splitSpaces(line)
	if len(fields) >= 2 && fields[1] == "UNKNOWN" {
		// The rest of the line is to be ignored (spec 2.1).
		h.Local = true
		return h, n, nil
	}
	if len(fields) != 6 {
		return Header{}, 0, fmt.Errorf("%w: version 1 line %q has %d fields, want 6", ErrMalformed, line, len(fields))
	}
	var want4 bool
	switch fields[1] {
	case "TCP4":
		want4 = true
	case "TCP6":
	default:
		return Header{}, 0, fmt.Errorf("%w: version 1 protocol %q (TCP4, TCP6 or UNKNOWN)", ErrMalformed, fields[1])
	}
	src, err := v1Addr(fields[2], fields[4], want4)
	if err != nil {
		return Header{}, 0, err
	}
	dst, err := v1Addr(fields[3], fields[5], want4)
	if err != nil {
		return Header{}, 0, err
	}
	h.Source, h.Destination = src, dst
	return h, n, nil
}

// splitSpaces splits on single spaces; an empty field (two spaces in a
// row) stays, so that the field count catches it.
func splitSpaces(s string) []string {
	var out []string
	for {
		i := bytes.IndexByte([]byte(s), ' ')
		if i < 0 {
			return append(out, s)
		}
		out = append(out, s[:i])
		s = s[i+1:]
	}
}

func v1Addr(ip, port string, want4 bool) (netip.AddrPort, error) {
	a, err := netip.ParseAddr(ip)
	if err != nil || a.Zone() != "" || a.Is4() != want4 || (!want4 && a.Is4In6()) {
		fam := "IPv6"
		if want4 {
			fam = "IPv4"
		}
		return netip.AddrPort{}, fmt.Errorf("%w: %q is not an %s address", ErrMalformed, ip, fam)
	}
	// Decimal, no sign, no leading zero (spec: "0" to "65535").
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || (len(port) > 1 && port[0] == '0') {
		return netip.AddrPort{}, fmt.Errorf("%w: port %q", ErrMalformed, port)
	}
	return netip.AddrPortFrom(a, uint16(p)), nil
}

// Version 2 command, family and transport values (spec 2.2).
const (
	v2Local   = 0x0
	v2Proxy   = 0x1
	famUnspec = 0x0
	famInet   = 0x1
	famInet6  = 0x2
	famUnix   = 0x3
	// The address block sizes of each family: two addresses, two ports.
	inetLen  = 4 + 4 + 2 + 2
	inet6Len = 16 + 16 + 2 + 2
)

func parseV2(b []byte) (Header, int, error) {
	if !prefixMatch(b, v2Signature) {
		return Header{}, 0, fmt.Errorf("%w: the connection starts with %q", ErrNoHeader, clip(b))
	}
	if len(b) < v2Fixed {
		return Header{}, 0, errIncomplete
	}
	verCmd, famProto := b[12], b[13]
	if verCmd>>4 != 2 {
		return Header{}, 0, fmt.Errorf("%w: version 2 signature with version %d", ErrMalformed, verCmd>>4)
	}
	length := int(binary.BigEndian.Uint16(b[14:16]))
	total := v2Fixed + length
	if total > MaxHeader {
		return Header{}, 0, fmt.Errorf("%w: version 2 header of %d bytes (at most %d)", ErrMalformed, total, MaxHeader)
	}
	cmd, fam, proto := verCmd&0xf, famProto>>4, famProto&0xf
	if cmd != v2Local && cmd != v2Proxy {
		return Header{}, 0, fmt.Errorf("%w: version 2 command %#x", ErrMalformed, cmd)
	}
	if fam > famUnix || proto > 2 {
		return Header{}, 0, fmt.Errorf("%w: version 2 family/protocol %#02x", ErrMalformed, famProto)
	}
	need := 0
	switch fam {
	case famInet:
		need = inetLen
	case famInet6:
		need = inet6Len
	}
	if length < need {
		return Header{}, 0, fmt.Errorf("%w: version 2 address block of %d bytes, family needs %d", ErrMalformed, length, need)
	}
	if len(b) < total {
		return Header{}, 0, errIncomplete
	}
	h := Header{Version: 2}
	addrs := b[v2Fixed:total]
	switch {
	case cmd == v2Local, fam == famUnspec, fam == famUnix:
		// LOCAL: the proxy speaks for itself. UNSPEC and UNIX carry no
		// IP address: the spec says to use the connection's own.
		h.Local = true
	case fam == famInet:
		h.Source = netip.AddrPortFrom(netip.AddrFrom4([4]byte(addrs[0:4])), binary.BigEndian.Uint16(addrs[8:10]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom4([4]byte(addrs[4:8])), binary.BigEndian.Uint16(addrs[10:12]))
	case fam == famInet6:
		h.Source = netip.AddrPortFrom(netip.AddrFrom16([16]byte(addrs[0:16])).Unmap(), binary.BigEndian.Uint16(addrs[32:34]))
		h.Destination = netip.AddrPortFrom(netip.AddrFrom16([16]byte(addrs[16:32])).Unmap(), binary.BigEndian.Uint16(addrs[34:36]))
	}
	return h, total, nil
}

// clip shortens what a peer sent for an error message.
func clip(b []byte) []byte { return b[:min(len(b), 16)] }

// Append appends the header for a TCP connection from src to dst in the
// given version (1 or 2) to b. An invalid src or dst gives a header without
// addresses (v1 UNKNOWN, v2 LOCAL), as the spec asks when the addresses are
// not known. Addresses of different families are both sent as IPv6.
func Append(b []byte, version int, src, dst netip.AddrPort) ([]byte, error) {
	if version != 1 && version != 2 {
		return b, fmt.Errorf("PROXY protocol version %d (1 or 2)", version)
	}
	known := src.IsValid() && dst.IsValid()
	s, d := src.Addr().Unmap(), dst.Addr().Unmap()
	v4 := s.Is4() && d.Is4()
	if known && !v4 {
		s, d = netip.AddrFrom16(s.As16()), netip.AddrFrom16(d.As16())
	}
	if version == 1 {
		if !known {
			return append(b, "PROXY UNKNOWN\r\n"...), nil
		}
		proto := "TCP6"
		if v4 {
			proto = "TCP4"
		}
		return fmt.Appendf(b, "PROXY %s %s %s %d %d\r\n", proto, s, d, src.Port(), dst.Port()), nil
	}
	b = append(b, v2Signature...)
	if !known {
		return append(b, 0x20|v2Local, famUnspec<<4, 0, 0), nil
	}
	const stream = 0x1
	if v4 {
		b = append(b, 0x20|v2Proxy, famInet<<4|stream, 0, inetLen)
		s4, d4 := s.As4(), d.As4()
		b = append(b, s4[:]...)
		b = append(b, d4[:]...)
	} else {
		b = append(b, 0x20|v2Proxy, famInet6<<4|stream, 0, inet6Len)
		s16, d16 := s.As16(), d.As16()
		b = append(b, s16[:]...)
		b = append(b, d16[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port()), nil
}
