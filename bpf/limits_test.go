package bpf

import (
	"net/netip"
	"testing"
)

// TestNodeLimitIsTheSelectionBound: the loader refuses services with more
// nodes than ReadLimits reports, so the program's node-selection loop must
// reach exactly that far: the last of Nodes nodes is picked when it is the
// only healthy one, and a node count beyond Nodes is ignored (passed to
// the stack) rather than half-served.
func TestNodeLimitIsTheSelectionBound(t *testing.T) {
	spec, err := LoadNAT()
	if err != nil {
		t.Fatal(err)
	}
	limits, err := ReadLimits(spec)
	if err != nil {
		t.Fatal(err)
	}
	n := int(limits.Nodes)
	tests := []struct {
		name        string
		nodes       int
		healthy     int    // only this node index is healthy; -1: all
		wantVerdict uint32 // of a new flow's first datagram
	}{
		{"the last of Nodes nodes is reached", n, n - 1, actRedirect},
		{"more than Nodes nodes are refused", n + 1, -1, actUnspec},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tn := newTestNet(t, netOptions{forwarding: true})
			nodes := make([]netip.AddrPort, tt.nodes)
			for i := range nodes {
				nodes[i] = netip.AddrPortFrom(v4.node.Addr(), uint16(20000+i))
			}
			tn.addService(t, protoUDP, v4.vip, v4.snat, 0, nodes...)
			if tt.healthy >= 0 {
				for i := range nodes {
					if i != tt.healthy {
						tn.setHealthy(t, uint32(i), false)
					}
				}
			}
			dg := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: v4.client, dst: v4.vip, proto: protoUDP, ttl: 64}
			ret, out := tn.run(t, dg.build())
			if ret != tt.wantVerdict {
				t.Fatalf("verdict %#x, want %#x", ret, tt.wantVerdict)
			}
			if tt.healthy >= 0 {
				if got := mustParse(t, out).dst; got != nodes[tt.healthy] {
					t.Errorf("flow went to %s, want the only healthy node %s", got, nodes[tt.healthy])
				}
				return
			}
			tn.wantCounters(t, 1, map[NATCounter]uint64{NATCounterCOUNTER_PASS_NO_NODE: 1, NATCounterCOUNTER_NEW_FLOWS: 0})
		})
	}
}
