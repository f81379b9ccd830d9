package testutil

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync/atomic"
)

// DNS wire constants used by the test server (RFC 1035).
const (
	dnsHeaderLen = 12
	dnsTypeA     = 1
	dnsClassIN   = 1
)

// ServeDNS answers every A query arriving on pc with answer and every other
// query with an empty NOERROR response, until pc is closed. It returns the
// number of queries answered so far. It is a nameserver for tests that
// resolve through a namespace's own resolv.conf (a server inside the
// namespace), with nothing of the wider DNS behind it.
func ServeDNS(pc net.PacketConn, answer netip.Addr) *atomic.Int32 {
	var answered atomic.Int32
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return // closed by the test
			}
			resp, ok := dnsResponse(buf[:n], answer)
			if !ok {
				continue
			}
			if _, err := pc.WriteTo(resp, from); err == nil {
				answered.Add(1)
			}
		}
	}()
	return &answered
}

// dnsResponse builds the response to a one-question query: the header with
// the query's ID and opcode, the question copied back, and for an A question
// one answer record pointing at the question's name.
func dnsResponse(query []byte, answer netip.Addr) ([]byte, bool) {
	if len(query) < dnsHeaderLen || binary.BigEndian.Uint16(query[4:]) != 1 {
		return nil, false
	}
	end := dnsHeaderLen
	for end < len(query) && query[end] != 0 { // walk the name's labels
		if query[end]&0xc0 != 0 {
			return nil, false // queries carry no compression pointers
		}
		end += 1 + int(query[end])
	}
	end += 1 + 4 // the root label, QTYPE and QCLASS
	if end > len(query) {
		return nil, false
	}
	question := query[dnsHeaderLen:end]
	qtype := binary.BigEndian.Uint16(question[len(question)-4:])

	var ancount uint16
	if qtype == dnsTypeA {
		ancount = 1
	}
	resp := make([]byte, dnsHeaderLen, dnsHeaderLen+len(question)+16)
	copy(resp[0:2], query[0:2])                   // ID
	resp[2] = 0x80 | query[2]&0x79                // QR, the query's opcode and RD
	resp[3] = 0x80                                // RA, RCODE 0
	binary.BigEndian.PutUint16(resp[4:], 1)       // QDCOUNT
	binary.BigEndian.PutUint16(resp[6:], ancount) // ANCOUNT
	resp = append(resp, question...)
	if qtype == dnsTypeA {
		ip := answer.As4()
		resp = append(resp, 0xc0, dnsHeaderLen) // name: pointer to the question's
		resp = binary.BigEndian.AppendUint16(resp, dnsTypeA)
		resp = binary.BigEndian.AppendUint16(resp, dnsClassIN)
		resp = binary.BigEndian.AppendUint32(resp, 60) // TTL
		resp = binary.BigEndian.AppendUint16(resp, 4)  // RDLENGTH
		resp = append(resp, ip[:]...)
	}
	return resp, true
}

// ServeNXDOMAIN answers every query arriving on pc with NXDOMAIN (the name
// does not exist), until pc is closed: the nameserver of a test that needs
// a name to fail to resolve at once.
func ServeNXDOMAIN(pc net.PacketConn) {
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return // closed by the test
			}
			if n < dnsHeaderLen {
				continue
			}
			resp := append([]byte(nil), buf[:n]...)
			flags := binary.BigEndian.Uint16(resp[2:])
			// QR set, the query's opcode and RD kept, RA set, RCODE 3.
			const qr, keep, ra, nxdomain = 0x8000, 0x7900, 0x0080, 3
			binary.BigEndian.PutUint16(resp[2:], qr|flags&keep|ra|nxdomain)
			_, _ = pc.WriteTo(resp, from)
		}
	}()
}
