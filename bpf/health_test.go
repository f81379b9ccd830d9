package bpf

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// Passive node health (lib/health.h): what the program counts of a node
// from its flows' packets, and how it stops choosing a node that failed
// max_fails new flows in a row.

const (
	protoICMP   = 1
	protoICMPv6 = 58
)

// setMaxFails sets max_fails of the test's one service.
func (tn *testNet) setMaxFails(t *testing.T, n uint32) {
	t.Helper()
	var (
		key NATServiceKey
		svc NATService
	)
	it := tn.objs.EbpfwdServices.Iterate()
	if !it.Next(&key, &svc) {
		t.Fatalf("no service: %v", it.Err())
	}
	svc.MaxFails = n
	if err := tn.objs.EbpfwdServices.Put(key, svc); err != nil {
		t.Fatal(err)
	}
}

// nodeEvents sums the per-CPU events of node index of service 1; a node
// without events reads all zero.
func (tn *testNet) nodeEvents(t *testing.T, index uint32) [NATNodeEventNODE_EVENT_MAX]uint64 {
	t.Helper()
	var (
		perCPU []NATNodeEvents
		sum    [NATNodeEventNODE_EVENT_MAX]uint64
	)
	if err := tn.objs.EbpfwdNodeEvents.Lookup(NATNodeKey{ServiceId: 1, Index: index}, &perCPU); err != nil {
		return sum
	}
	for _, c := range perCPU {
		for i := range sum {
			sum[i] += c.N[i]
		}
	}
	return sum
}

func (tn *testNet) nodeFails(t *testing.T, index uint32) uint32 {
	t.Helper()
	var n NATNode
	if err := tn.objs.EbpfwdNodes.Lookup(NATNodeKey{ServiceId: 1, Index: index}, &n); err != nil {
		t.Fatal(err)
	}
	return n.Fails
}

func events(refused, unreachable, synTimeout, answered uint64) [NATNodeEventNODE_EVENT_MAX]uint64 {
	return [NATNodeEventNODE_EVENT_MAX]uint64{refused, unreachable, synTimeout, answered}
}

// send runs f through the program, expects it redirected and returns the
// frame it became.
func (tn *testNet) send(t *testing.T, what string, f frame) frame {
	t.Helper()
	ret, out := tn.run(t, f.build())
	if ret != actRedirect {
		t.Fatalf("%s: verdict %#x, want TC_ACT_REDIRECT", what, ret)
	}
	return mustParse(t, out)
}

// unreachable is the ICMP (or ICMPv6) destination unreachable with code
// that a node (from) sends back to the gateway for the packet it was sent
// (quoted, as the program wrote it: Ethernet frame included).
func unreachable(t *testing.T, tn *testNet, quoted []byte, code uint8) []byte {
	t.Helper()
	q, err := parseFrame(quoted)
	if err != nil {
		t.Fatal(err)
	}
	ipLen := ipv6Len
	if q.src.Addr().Is4() {
		ipLen = ipv4Len
	}
	// RFC 792 quotes the IP header and 8 bytes of its payload (RFC 4443:
	// as much as fits; 8 bytes are all the program reads).
	body := append([]byte(nil), quoted[ethLen:ethLen+ipLen+8]...)
	msg := make([]byte, 8, 8+len(body))
	msg[1] = code
	msg = append(msg, body...)
	from, to := q.dst.Addr(), q.src.Addr()

	out := append([]byte(nil), tn.mac...)
	out = append(out, nodeMAC...)
	if from.Is4() {
		msg[0] = 3 // destination unreachable
		binary.BigEndian.PutUint16(msg[2:], ^fold(checksum(0, msg)))
		out = binary.BigEndian.AppendUint16(out, etherTypeIPv4)
		ip := make([]byte, ipv4Len)
		ip[0] = 4<<4 | ipv4Len/4
		binary.BigEndian.PutUint16(ip[2:], uint16(ipv4Len+len(msg)))
		ip[8], ip[9] = 64, protoICMP
		s, d := from.As4(), to.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], ^fold(checksum(0, ip)))
		return append(append(out, ip...), msg...)
	}
	msg[0] = 1 // destination unreachable
	binary.BigEndian.PutUint16(msg[2:], ^fold(checksum(pseudoHeaderSum(from, to, protoICMPv6, len(msg)), msg)))
	out = binary.BigEndian.AppendUint16(out, etherTypeIPv6)
	ip := make([]byte, ipv6Len)
	ip[0] = 6 << 4
	binary.BigEndian.PutUint16(ip[4:], uint16(len(msg)))
	ip[6], ip[7] = protoICMPv6, 64
	s, d := from.As16(), to.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(out, ip...), msg...)
}

// TestNodeRefusalsTakeANodeOut: RSTs in reply to SYNs count against the
// node, a SYN-ACK clears its run of failures, and at max_fails in a row the
// program sends new flows elsewhere.
func TestNodeRefusalsTakeANodeOut(t *testing.T) {
	for _, a := range []addresses{v4, v6} {
		t.Run(a.name, func(t *testing.T) {
			tn := newTestNet(t, netOptions{forwarding: true})
			tn.addService(t, protoTCP, a.vip, a.snat, 0, a.node, a.node2)
			tn.setMaxFails(t, 2)
			port := uint16(41000)
			// flow starts a connection, expects it on node want and
			// answers it with flags from the node.
			flow := func(want netip.AddrPort, answer uint8) {
				t.Helper()
				port++
				client := netip.AddrPortFrom(a.client.Addr(), port)
				syn := tn.send(t, "SYN", frame{dstMAC: tn.mac, srcMAC: clientMAC, src: client, dst: a.vip, proto: protoTCP, ttl: 64, tcpFlags: flagSYN})
				if syn.dst != want {
					t.Fatalf("flow from %s went to %s, want %s", client, syn.dst, want)
				}
				tn.send(t, "answer", frame{dstMAC: tn.mac, srcMAC: nodeMAC, src: syn.dst, dst: syn.src, proto: protoTCP, ttl: 64, tcpFlags: answer})
			}
			flow(a.node, flagRST|flagACK)
			flow(a.node2, flagSYN|flagACK)
			if f := tn.nodeFails(t, 0); f != 1 {
				t.Fatalf("node 0: %d failures in a row, want 1", f)
			}
			flow(a.node, flagSYN|flagACK) // answers: its run starts over
			flow(a.node2, flagSYN|flagACK)
			flow(a.node, flagRST|flagACK)
			flow(a.node2, flagSYN|flagACK)
			flow(a.node, flagRST|flagACK) // the second in a row: out
			for range 3 {
				flow(a.node2, flagSYN|flagACK)
			}
			if got, want := tn.nodeEvents(t, 0), events(3, 0, 0, 1); got != want {
				t.Errorf("node 0 events %v, want %v (refused, unreachable, syn timeout, answered)", got, want)
			}
			if got, want := tn.nodeEvents(t, 1), events(0, 0, 0, 6); got != want {
				t.Errorf("node 1 events %v, want %v", got, want)
			}
			// A later RST of an answered flow is no verdict on the node.
			if f := tn.nodeFails(t, 1); f != 0 {
				t.Errorf("node 1: %d failures in a row, want 0", f)
			}
		})
	}
}

// TestUnansweredSYNGoesElsewhere: a client's SYN sent again past the bound
// counts against the node; with max_fails 1 that takes the node out, and
// the retransmission itself starts the flow over on the other node. A
// duplicate within the bound changes nothing.
func TestUnansweredSYNGoesElsewhere(t *testing.T) {
	for _, tt := range []struct {
		name      string
		bound     time.Duration
		wantNode  func(addresses) netip.AddrPort
		wantEvent [NATNodeEventNODE_EVENT_MAX]uint64
	}{
		{"past the bound", time.Nanosecond, func(a addresses) netip.AddrPort { return a.node2 }, events(0, 0, 1, 0)},
		{"within the bound", time.Hour, func(a addresses) netip.AddrPort { return a.node }, events(0, 0, 0, 0)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a := v4
			tn := newTestNet(t, netOptions{forwarding: true, synAnswerBound: tt.bound})
			tn.addService(t, protoTCP, a.vip, a.snat, 0, a.node, a.node2)
			tn.setMaxFails(t, 1)
			syn := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: a.client, dst: a.vip, proto: protoTCP, ttl: 64, tcpFlags: flagSYN}
			if got := tn.send(t, "SYN", syn); got.dst != a.node {
				t.Fatalf("first SYN to %s, want %s", got.dst, a.node)
			}
			again := tn.send(t, "SYN again", syn)
			if want := tt.wantNode(a); again.dst != want {
				t.Fatalf("SYN again to %s, want %s", again.dst, want)
			}
			if got := tn.nodeEvents(t, 0); got != tt.wantEvent {
				t.Errorf("node 0 events %v, want %v", got, tt.wantEvent)
			}
			// The flow now lives where the SYN went: its SYN-ACK comes
			// back to the client.
			back := tn.send(t, "SYN-ACK", frame{dstMAC: tn.mac, srcMAC: nodeMAC, src: again.dst, dst: again.src, proto: protoTCP, ttl: 64, tcpFlags: flagSYN | flagACK})
			if back.dst != a.client {
				t.Errorf("SYN-ACK to %s, want the client %s", back.dst, a.client)
			}
		})
	}
}

// TestICMPUnreachableCountsAgainstTheNode: an ICMP destination unreachable
// for a new TCP flow, or for any UDP flow, fails its node; a UDP flow whose
// node is then out of the choice is forgotten, so the client's next
// datagram goes to the other node. Path MTU messages are no failure.
func TestICMPUnreachableCountsAgainstTheNode(t *testing.T) {
	const (
		icmpPortUnreachable  = 3 // ICMPv4 code
		icmp6PortUnreachable = 4 // ICMPv6 code
		icmpFragNeeded       = 4 // ICMPv4 code: path MTU
	)
	for _, a := range []addresses{v4, v6} {
		code := uint8(icmpPortUnreachable)
		if a.node.Addr().Is6() {
			code = icmp6PortUnreachable
		}
		t.Run(a.name+" UDP", func(t *testing.T) {
			tn := newTestNet(t, netOptions{forwarding: true})
			tn.addService(t, protoUDP, a.vip, a.snat, 0, a.node, a.node2)
			tn.setMaxFails(t, 1)
			dg := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: a.client, dst: a.vip, proto: protoUDP, ttl: 64, payload: []byte("q")}
			first := tn.run2(t, dg)
			if ret, _ := tn.run(t, unreachable(t, tn, first, code)); ret != actUnspec {
				t.Fatalf("ICMP verdict %#x, want TC_ACT_UNSPEC (the stack's)", ret)
			}
			if got, want := tn.nodeEvents(t, 0), events(0, 1, 0, 0); got != want {
				t.Errorf("node 0 events %v, want %v", got, want)
			}
			if got := tn.send(t, "next datagram", dg); got.dst != a.node2 {
				t.Errorf("the client's next datagram went to %s, want %s", got.dst, a.node2)
			}
		})
		t.Run(a.name+" TCP", func(t *testing.T) {
			tn := newTestNet(t, netOptions{forwarding: true, synAnswerBound: time.Nanosecond})
			tn.addService(t, protoTCP, a.vip, a.snat, 0, a.node, a.node2)
			tn.setMaxFails(t, 1)
			syn := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: a.client, dst: a.vip, proto: protoTCP, ttl: 64, tcpFlags: flagSYN}
			first := tn.run2(t, syn)
			if ret, _ := tn.run(t, unreachable(t, tn, first, code)); ret != actUnspec {
				t.Fatalf("ICMP verdict %#x, want TC_ACT_UNSPEC", ret)
			}
			// Counted once: the retransmission finds the flow judged,
			// and its node out of the choice.
			if got := tn.send(t, "SYN again", syn); got.dst != a.node2 {
				t.Errorf("SYN again went to %s, want %s", got.dst, a.node2)
			}
			if got, want := tn.nodeEvents(t, 0), events(0, 1, 0, 0); got != want {
				t.Errorf("node 0 events %v, want %v", got, want)
			}
		})
	}
	t.Run("path MTU", func(t *testing.T) {
		a := v4
		tn := newTestNet(t, netOptions{forwarding: true})
		tn.addService(t, protoUDP, a.vip, a.snat, 0, a.node, a.node2)
		tn.setMaxFails(t, 1)
		dg := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: a.client, dst: a.vip, proto: protoUDP, ttl: 64, payload: []byte("q")}
		tn.run(t, unreachable(t, tn, tn.run2(t, dg), icmpFragNeeded))
		if got := tn.nodeEvents(t, 0); got != events(0, 0, 0, 0) {
			t.Errorf("node 0 events %v after fragmentation needed, want none", got)
		}
		if got := tn.send(t, "next datagram", dg); got.dst != a.node {
			t.Errorf("the flow moved to %s", got.dst)
		}
	})
}

// run2 runs f, expects it redirected and returns the frame as written.
func (tn *testNet) run2(t *testing.T, f frame) []byte {
	t.Helper()
	ret, out := tn.run(t, f.build())
	if ret != actRedirect {
		t.Fatalf("verdict %#x, want TC_ACT_REDIRECT", ret)
	}
	return out
}
