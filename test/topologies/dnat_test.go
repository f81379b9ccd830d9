package topologies

import (
	"context"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// Seed 003 (Network namespace, "Docker如何使用Network namespace"): br0
// with ns1 (10.1.1.2) and ns2 (10.1.1.3) on it by br-veth0 and br-veth1,
// and `docker run -p 80:80`, which is one DNAT rule:
//
//	-A DOCKER ! -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.2:80
//
// Here the host (br0 10.1.1.1, outside 192.168.50.1) maps its port 80 to
// ns1's port 80 for a client outside (192.168.50.2).
const (
	mapHostIP   = "192.168.50.1"
	mapClientIP = "192.168.50.2"
	mapBridgeIP = "10.1.1.1"
	mapNS1IP    = "10.1.1.2"
)

// dnatRules are the seed's rule for tcp, and the same for udp.
var dnatRules = []string{
	"-t nat -A PREROUTING ! -i br0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.1.1.2:80",
	"-t nat -A PREROUTING ! -i br0 -p udp -m udp --dport 80 -j DNAT --to-destination 10.1.1.2:80",
}

type bridgeHost struct {
	host, client, ns1, ns2 *topo.NS
	web                    *e2e.AcceptLog
}

func newBridgeHost(t *testing.T, withDNAT bool) bridgeHost {
	t.Helper()
	b := bridgeHost{host: newNS(t, "br-host"), client: newNS(t, "br-cl"), ns1: newNS(t, "br-ns1"), ns2: newNS(t, "br-ns2")}
	must(t, topo.Veth(b.client, "eth0", mapClientIP+"/24", b.host, "eth0", mapHostIP+"/24"))
	must(t, b.host.Bridge("br0", mapBridgeIP+"/24"))
	for i, ns := range []*topo.NS{b.ns1, b.ns2} {
		// The seed's names: veth0/veth1 in the namespaces,
		// br-veth0/br-veth1 on the bridge.
		inNS := []string{"veth0", "veth1"}[i]
		onBr := []string{"br-veth0", "br-veth1"}[i]
		ip := []string{mapNS1IP, "10.1.1.3"}[i]
		must(t, topo.Veth(b.host, onBr, "", ns, inNS, ip+"/24"))
		must(t, b.host.Enslave(onBr, "br0"))
		must(t, ns.AddRoute("default", mapBridgeIP))
	}
	if withDNAT {
		// A DNATed flow is routed by the host.
		must(t, b.host.EnableForwarding())
		iptables(t, ipv4, b.host, dnatRules...)
	}
	b.web = e2e.EchoIn(t, b.ns1, mapNS1IP+":80")
	e2e.UDPEchoIn(t, b.ns1, mapNS1IP+":80")
	return b
}

// TestSeed003PortMapping does the seed's port mapping with ebpfwd instead
// of the DNAT rule, and then with the rule left in place for the same
// port, where the two must not fight: each datapath's flows are carried
// end to end, by whichever path the kernel hands them to first, and a
// connection the rule carried before ebpfwd started keeps going.
func TestSeed003PortMapping(t *testing.T) {
	t.Parallel()
	mapped := mapHostIP + ":80"

	t.Run("ebpfwd instead of DNAT", func(t *testing.T) {
		t.Parallel()
		b := newBridgeHost(t, false)
		for _, dp := range datapaths {
			t.Run(dp, func(t *testing.T) {
				e2e.Start(t, "map-"+dp, services(forward("map", mapped, mapNS1IP+":80", dp, "")), e2e.Options{In: b.host})
				check(t, dp, []path{
					// Forwarding is off in the host: only ebpfwd
					// can carry these.
					{name: "tcp", from: b.client, proto: "tcp", addr: mapped, server: b.web, source: mapBridgeIP, kernel: true},
					{name: "udp", from: b.client, proto: "udp", addr: mapped},
				})
			})
		}
	})

	t.Run("ebpfwd beside the DNAT rule", func(t *testing.T) {
		t.Parallel()
		b := newBridgeHost(t, true)
		// Who gets a new flow depends on the datapath, not on luck: the
		// tc program runs at tcx ingress, before netfilter's PREROUTING,
		// so it translates the flow (the server sees the host's br0
		// address) and conntrack never sees it; without it PREROUTING's
		// DNAT rewrites the packet before any socket lookup, so
		// ebpfwd's listener never gets it and the server sees the
		// client itself.
		source := map[string]string{"tc": mapBridgeIP, "userspace": mapClientIP}
		for _, dp := range datapaths {
			t.Run(dp, func(t *testing.T) {
				// A connection the DNAT rule carries before ebpfwd
				// starts: conntrack holds it, and the program
				// starts flows only on a SYN, so it must keep going.
				ctx, cancel := context.WithTimeout(context.Background(), exchangeTimeout)
				defer cancel()
				held, err := e2e.DialFrom(ctx, t, b.client, "tcp", mapped)
				if err != nil {
					t.Fatalf("dial %s through the DNAT rule: %v", mapped, err)
				}
				defer held.Close()

				e2e.Start(t, "mapdnat-"+dp, services(forward("map", mapped, mapNS1IP+":80", dp, "")), e2e.Options{In: b.host})
				check(t, dp, []path{
					{name: "tcp", from: b.client, proto: "tcp", addr: mapped, server: b.web, source: source[dp], kernel: true},
					{name: "udp", from: b.client, proto: "udp", addr: mapped},
				})
				t.Run("connection from before ebpfwd", func(t *testing.T) {
					before := len(b.web.Remotes())
					if err := peer.Exchange(ctx, held, streamBytes); err != nil {
						t.Fatalf("the connection the DNAT rule carried before ebpfwd started: %v", err)
					}
					remotes := b.web.Remotes()
					if len(remotes) <= before || hostOf(remotes[before]) != mapClientIP {
						t.Errorf("the held connection reached the server as %v, want from %s (DNAT keeps the client's address)", remotes[before:], mapClientIP)
					}
				})
			})
		}
	})
}
