package bpf

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The benchmarks below measure what the NAT program itself costs per
// packet, by kind of packet: the kernel's own accounting of the program
// (BPF_ENABLE_STATS, held only while a benchmark runs, so the machine's
// kernel.bpf_stats_enabled is left alone) over BPF_PROG_TEST_RUN runs, so
// neither the syscall nor the test's frame building is in the figure. The
// redirect itself (bpf_redirect_peer/neigh moving the packet) happens
// after the program returns and is not in it either, on a real interface
// or here. Run them with a fixed count, as the maps hold at most MAX_FLOWS
// flows:
//
//	go test ./bpf -run '^$' -bench NAT -benchtime 20000x
//
// docs/DATAPATHS.md has the figures and what they mean.

// programCost runs frame(i) for i in 0..b.N-1, one BPF_PROG_TEST_RUN
// each, and reports the program's median and 90th-percentile run time
// (the machine is shared: a run the scheduler interrupted would skew a
// mean) and the share of runs whose verdict was not want (for a new flow:
// no SNAT port, the packet went to the stack).
func programCost(b *testing.B, tn *testNet, want uint32, frame func(i int) []byte) {
	b.Helper()
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skipf("BPF run-time statistics: %v", err)
	}
	defer stats.Close()
	frames := make([][]byte, b.N)
	for i := range frames {
		frames[i] = frame(i)
	}
	times := make([]time.Duration, 0, b.N)
	missed := 0
	b.ResetTimer()
	for i := range frames {
		before, err := tn.objs.EbpfwdNat.Stats()
		if err != nil {
			b.Fatal(err)
		}
		if ret, _ := tn.run(b, frames[i]); ret != want {
			missed++
		}
		after, err := tn.objs.EbpfwdNat.Stats()
		if err != nil {
			b.Fatal(err)
		}
		if after.RunCount != before.RunCount+1 {
			b.Fatalf("packet %d: the program's run count moved by %d, want 1", i, after.RunCount-before.RunCount)
		}
		times = append(times, after.Runtime-before.Runtime)
	}
	b.StopTimer()
	slices.Sort(times)
	b.ReportMetric(float64(times[len(times)/2]), "ns/packet-p50")
	b.ReportMetric(float64(times[len(times)*9/10]), "ns/packet-p90")
	b.ReportMetric(float64(missed)/float64(b.N), "missed/packet")
	b.ReportMetric(0, "ns/op") // the syscalls', not the program's: left out
}

// clientOf is the i-th distinct client address and source port, with ports
// from base up (wrapping within base..65535) and one address per wrap.
func clientOf(i int, base uint16) netip.AddrPort {
	span := 65536 - int(base)
	a := v4.client.Addr().As4()
	a[2] = byte(100 + i/span) // 10.20.100.x: distinct addresses, none the test's own
	return netip.AddrPortFrom(netip.AddrFrom4(a), base+uint16(i%span))
}

func synFrom(tn *testNet, client netip.AddrPort) []byte {
	return frame{dstMAC: tn.mac, srcMAC: clientMAC, src: client, dst: v4.vip, proto: protoTCP, ttl: 64, tcpFlags: flagSYN}.build()
}

// spliceEgress gives the service's node a fixed egress, as a splice link
// into netns.out does: packets to the node leave without a FIB lookup.
func spliceEgress(b *testing.B, tn *testNet) {
	b.Helper()
	key := NATNodeKey{ServiceId: 1, Index: 0}
	var n NATNode
	if err := tn.objs.EbpfwdNodes.Lookup(key, &n); err != nil {
		b.Fatal(err)
	}
	n.Egress = NATL2Path{Ifindex: uint32(tn.ifindex), PeerMac: [6]uint8(nodeMAC), OurMac: [6]uint8(tn.mac)}
	if err := tn.objs.EbpfwdNodes.Put(key, n); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkNATNewFlow: a client's SYN that starts a flow (node choice,
// route, SNAT port, conntrack insert, rewrite), with the client's source
// port inside the SNAT range (1024-32767) and outside it (as the kernel's
// default ephemeral range 32768-60999 makes it), on empty maps and with
// 16384 flows to the node open already (half the SNAT ports taken).
func BenchmarkNATNewFlow(b *testing.B) {
	for _, bc := range []struct {
		name     string
		base     uint16 // the clients' first source port
		occupied int    // flows to the node open before the measured ones
		splice   bool   // the node is reached over a splice link
	}{
		{"port in range", 1024, 0, false},
		{"port outside range", 32768, 0, false},
		{"port in range, half the ports taken", 1024, 16384, false},
		{"port outside range, half the ports taken", 32768, 16384, false},
		{"port outside range, splice link", 32768, 0, true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			tn := newTestNet(b, netOptions{forwarding: true})
			tn.addService(b, protoTCP, v4.vip, v4.snat, 0, v4.node)
			if bc.splice {
				spliceEgress(b, tn)
			}
			// Flows of other clients (10.20.200.x) hold ports first.
			for i := range bc.occupied {
				a := v4.client.Addr().As4()
				a[2] = 200
				a[3] = byte(i / 256)
				if ret, _ := tn.run(b, synFrom(tn, netip.AddrPortFrom(netip.AddrFrom4(a), uint16(1024+i%256*100)))); ret != actRedirect {
					b.Fatalf("occupying flow %d: verdict %#x", i, ret)
				}
			}
			programCost(b, tn, actRedirect, func(i int) []byte { return synFrom(tn, clientOf(i, bc.base)) })
		})
	}
}

// BenchmarkNATEstablished: a packet of a known flow each way (conntrack
// lookup, state and byte counts, route, rewrite), and the client's over a
// splice link (no FIB lookup towards the node).
func BenchmarkNATEstablished(b *testing.B) {
	for _, bc := range []struct {
		name       string
		up, splice bool
	}{{"client to node", true, false}, {"node to client", false, false}, {"client to node, splice link", true, true}} {
		up := bc.up
		b.Run(bc.name, func(b *testing.B) {
			tn := newTestNet(b, netOptions{forwarding: true})
			tn.addService(b, protoTCP, v4.vip, v4.snat, 0, v4.node)
			if bc.splice {
				spliceEgress(b, tn)
			}
			ret, out := tn.run(b, synFrom(tn, v4.client))
			if ret != actRedirect {
				b.Fatalf("SYN: verdict %#x", ret)
			}
			snat := mustParse(b, out).src
			data := frame{dstMAC: tn.mac, srcMAC: clientMAC, src: v4.client, dst: v4.vip, proto: protoTCP, ttl: 64,
				tcpFlags: flagACK, payload: make([]byte, 64)}
			if !up {
				data = frame{dstMAC: tn.mac, srcMAC: nodeMAC, src: v4.node, dst: snat, proto: protoTCP, ttl: 64,
					tcpFlags: flagACK, payload: make([]byte, 64)}
			}
			f := data.build()
			programCost(b, tn, actRedirect, func(int) []byte { return f })
		})
	}
}
