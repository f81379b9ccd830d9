package bpf

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"testing"
)

// MACs of a splice link as the loader would put them into a node's egress:
// our end (in the listen namespace) and its peer (in netns.out).
var (
	spliceOurMAC  = net.HardwareAddr{0x02, 0xeb, 0, 0, 0, 1}
	splicePeerMAC = net.HardwareAddr{0x02, 0xeb, 0, 0, 0, 2}
)

// TestNodeEgressOverride covers nodes reached through a splice link: the
// node's fixed egress (device and both MACs) replaces the FIB for every
// packet towards the node, whether the listen namespace has a route to it
// (which must not be taken), has none (the seed's shape), or forwards at
// all; replies still go back along the client's path, and what the replies
// show never replaces the fixed path.
func TestNodeEgressOverride(t *testing.T) {
	unrouted4 := netip.MustParseAddrPort("10.99.0.2:8000")
	unrouted6 := netip.MustParseAddrPort("[fd00:99::2]:8000")
	tests := []struct {
		name       string
		a          addresses
		node       netip.AddrPort
		snat       netip.Addr
		forwarding bool
	}{
		{"IPv4 node without a route", v4, unrouted4, netip.MustParseAddr("169.254.200.1"), true},
		{"IPv4 node routed elsewhere", v4, v4.node, netip.MustParseAddr("169.254.200.1"), true},
		{"IPv4 forwarding off", v4, unrouted4, netip.MustParseAddr("169.254.200.1"), false},
		{"IPv6 node without a route", v6, unrouted6, netip.MustParseAddr("fd65:6270:6677::1"), true},
		{"IPv6 node routed elsewhere", v6, v6.node, netip.MustParseAddr("fd65:6270:6677::1"), true},
		{"IPv6 forwarding off", v6, unrouted6, netip.MustParseAddr("fd65:6270:6677::1"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tn := newTestNet(t, netOptions{forwarding: tt.forwarding})
			// nat1 plays our end of the splice link; flagged like a veth
			// whose peer is in another namespace, as Attach does.
			var spliceIfindex int
			err := tn.ns.Do(func() error {
				iface, err := net.InterfaceByName("nat1")
				if err != nil {
					return err
				}
				spliceIfindex = iface.Index
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if err := tn.objs.EbpfwdIfaces.Put(uint32(spliceIfindex), uint32(NATIfaceFlagsIFACE_PEER_REDIRECT)); err != nil {
				t.Fatal(err)
			}
			// Replies go back out of nat0: a real veth to the client.
			if err := tn.objs.EbpfwdIfaces.Put(uint32(tn.ifindex), uint32(NATIfaceFlagsIFACE_PEER_REDIRECT)); err != nil {
				t.Fatal(err)
			}
			tn.addService(t, protoTCP, tt.a.vip, tt.snat, spliceIfindex, tt.node)
			tn.setEgress(t, 0, NATL2Path{Ifindex: uint32(spliceIfindex), PeerMac: [6]byte(splicePeerMAC), OurMac: [6]byte(spliceOurMAC)})

			wantToNode := func(step string, out []byte) frame {
				t.Helper()
				got := mustParse(t, out)
				if got.dst != tt.node || got.src.Addr() != tt.snat || !inSNATRange(got.src.Port()) {
					t.Errorf("%s rewritten to %s -> %s, want %s:6100x -> %s", step, got.src, got.dst, tt.snat, tt.node)
				}
				if !bytes.Equal(got.dstMAC, splicePeerMAC) || !bytes.Equal(got.srcMAC, spliceOurMAC) {
					t.Errorf("%s MACs %s <- %s, want the splice link's %s <- %s", step, got.dstMAC, got.srcMAC, splicePeerMAC, spliceOurMAC)
				}
				return got
			}

			syn := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: tt.a.client, dst: tt.a.vip, proto: protoTCP, ttl: 64, tcpFlags: flagSYN}
			ret, out := tn.run(t, syn.build())
			if ret != actRedirect {
				t.Fatalf("SYN verdict %#x, want TC_ACT_REDIRECT", ret)
			}
			snat := wantToNode("SYN", out).src

			// The reply arrives with MACs other than the fixed ones: they
			// must not be learned as the way to the node.
			reply := frame{dstMAC: tn.mac, srcMAC: nodeMAC, src: tt.node, dst: snat, proto: protoTCP, ttl: 64, tcpFlags: flagSYN | flagACK}
			ret, out = tn.run(t, reply.build())
			if ret != actRedirect {
				t.Fatalf("SYN-ACK verdict %#x, want TC_ACT_REDIRECT", ret)
			}
			back := mustParse(t, out)
			if back.src != tt.a.vip || back.dst != tt.a.client {
				t.Errorf("SYN-ACK rewritten to %s -> %s, want %s -> %s", back.src, back.dst, tt.a.vip, tt.a.client)
			}
			if !bytes.Equal(back.dstMAC, clientMAC) {
				t.Errorf("SYN-ACK destination MAC %s, want the client's %s", back.dstMAC, clientMAC)
			}

			ack := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: tt.a.client, dst: tt.a.vip, proto: protoTCP, ttl: 64, tcpFlags: flagACK, payload: []byte("data")}
			ret, out = tn.run(t, ack.build())
			if ret != actRedirect {
				t.Fatalf("ACK verdict %#x, want TC_ACT_REDIRECT", ret)
			}
			if got := wantToNode("ACK", out); got.src != snat {
				t.Errorf("ACK left from %s, the flow's SNAT is %s", got.src, snat)
			}
			tn.wantCounters(t, 1, map[NATCounter]uint64{
				NATCounterCOUNTER_NEW_FLOWS:      1,
				NATCounterCOUNTER_REDIRECT_PEER:  3,
				NATCounterCOUNTER_REDIRECT_NEIGH: 0,
				NATCounterCOUNTER_PASS_NO_ROUTE:  0,
			})
		})
	}
}

// setEgress gives node index of service 1 a fixed egress.
func (tn *testNet) setEgress(t *testing.T, index uint32, egress NATL2Path) {
	t.Helper()
	key := NATNodeKey{ServiceId: 1, Index: index}
	var n NATNode
	if err := tn.objs.EbpfwdNodes.Lookup(key, &n); err != nil {
		t.Fatal(fmt.Errorf("look up node %d: %w", index, err))
	}
	n.Egress = egress
	if err := tn.objs.EbpfwdNodes.Put(key, n); err != nil {
		t.Fatal(fmt.Errorf("put node %d: %w", index, err))
	}
}
