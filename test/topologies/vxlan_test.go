package topologies

import (
	"fmt"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// Seed 001 (网络命名空间, "使用网络命名空间实现虚拟路由"): a router
// namespace ns1 with a public side (veth15.1, 123.123.123.123/23) and a
// private side (veth17.1, 192.168.10.3/24) that MASQUERADEs the private
// network out of the public one; the private network is bridge br-pr on
// physical host A, stretched to host B by vxlan1070, and vm-b
// (192.168.10.20) sits behind host B's br-pr. ebpfwd in the router
// publishes vm-b's port on the public address.
//
// The seed's vxlan uses multicast group 239.0.4.46; here the two hosts are
// joined point to point (remote), as seed 002 joins its two hosts, so the
// test needs no multicast routing on the underlay veth. The overlay keeps
// the MTU its encapsulation leaves (1450 on a 1500 underlay) everywhere
// on the private network: a 1 MiB stream must cross it in full-sized
// segments, none lost to a too-big frame.
//
// The overlay carries IPv6 beside IPv4 (dual stack on the private and the
// public side); the underlay stays IPv4, as the seed's is (its hosts reach
// each other, and the multicast group, over their IPv4 network). That is
// how IPv6 usually reaches VMs: the tenant network is where addresses are
// handed out, the provider's fabric under it is left as it is, and an IPv4
// underlay leaves the overlay 1450 bytes (an IPv6 one, 40 more bytes of
// outer header, 1430).
const (
	overlayMTU = "1450"
	vxlanBytes = 1 << 20
)

// vxlanAddrs are one family's addresses of seed 001's layout.
type vxlanAddrs struct {
	fam family
	// routerPublic and publicClient are on the public side (prefix
	// publicBits), routerLAN and vmB on the private network over the
	// overlay (prefix lanBits).
	routerPublic, publicClient string
	routerLAN, vmB             string
	publicBits, lanBits        string
	// bigUDP is the largest UDP payload of a 1500-byte packet on the
	// public side: too big for the overlay, so it must be fragmented on
	// the way (IPv4, by a router or the tunnel) or by its sender (IPv6,
	// whose routers never fragment).
	bigUDP int
}

// vxlanFamilies are the seed's IPv4 addresses and their IPv6 twins: a
// documentation prefix for the public side, a unique local one for the
// private network.
var vxlanFamilies = []vxlanAddrs{
	{fam: ipv4, routerPublic: "123.123.123.123", publicClient: "123.123.123.200", publicBits: "23",
		routerLAN: "192.168.10.3", vmB: "192.168.10.20", lanBits: "24", bigUDP: 1500 - 20 - 8},
	{fam: ipv6, routerPublic: "2001:db8:123::123", publicClient: "2001:db8:123::200", publicBits: "64",
		routerLAN: "fd00:192:168:10::3", vmB: "fd00:192:168:10::20", lanBits: "64", bigUDP: 1500 - 40 - 8},
}

// vxlanRouter is seed 001's layout, dual stack. With routerIsHostA the
// router holds host A's side itself (vxlan1070 in the router, carrying its
// private addresses, its underlay on the router's eth0): the tc program's
// egress towards vm-b is then the vxlan device (MTU 1450 on its own).
// Otherwise the router is a namespace on host A as in the seed, and its
// egress is veth17.1 into host A's br-pr.
type vxlanRouter struct {
	public, router, hostB, vmb *topo.NS
	// web and pubEcho are vm-b's echo at port 9000 and the public
	// client's at 7000, each on both families' addresses.
	web, pubEcho map[family]*e2e.AcceptLog
}

func newVXLANRouter(t *testing.T, routerIsHostA bool) vxlanRouter {
	t.Helper()
	v := vxlanRouter{public: newNS(t, "vx-pub"), router: newNS(t, "vx-rt"), hostB: newNS(t, "vx-hb"), vmb: newNS(t, "vx-vmb"),
		web: map[family]*e2e.AcceptLog{}, pubEcho: map[family]*e2e.AcceptLog{}}
	must(t, topo.Veth(v.public, "eth1", "", v.router, "veth15.1", ""))

	// The underlay between the two hosts, and on each a br-pr with
	// vxlan1070 in it.
	hostA := v.router
	if !routerIsHostA {
		hostA = newNS(t, "vx-ha")
	}
	must(t, topo.Veth(hostA, "eth0", "10.99.0.1/24", v.hostB, "eth0", "10.99.0.2/24"))
	// routerLANDev carries the router's private addresses.
	routerLANDev := "veth17.1"
	for _, h := range []struct {
		ns     *topo.NS
		remote string
	}{{hostA, "10.99.0.2"}, {v.hostB, "10.99.0.1"}} {
		must(t, h.ns.IP("link", "add", "vxlan1070", "type", "vxlan", "id", "1070", "remote", h.remote, "dstport", "4789", "dev", "eth0"))
		must(t, h.ns.IP("link", "set", "dev", "vxlan1070", "up"))
		if routerIsHostA && h.ns == v.router {
			// The router's private addresses on the vxlan device
			// itself: no bridge between the program and the tunnel.
			routerLANDev = "vxlan1070"
			continue
		}
		must(t, h.ns.Bridge("br-pr", ""))
		must(t, h.ns.Enslave("vxlan1070", "br-pr"))
	}
	// vm-b on host B's br-pr, at the overlay's MTU.
	must(t, topo.Veth(v.hostB, "vnet15", "", v.vmb, "eth0", ""))
	must(t, v.hostB.Enslave("vnet15", "br-pr"))
	for _, l := range []struct {
		ns  *topo.NS
		dev string
	}{{v.hostB, "vnet15"}, {v.vmb, "eth0"}} {
		must(t, l.ns.IP("link", "set", "dev", l.dev, "mtu", overlayMTU))
	}

	if !routerIsHostA {
		// The seed's veth17.0 (on host A's br-pr) and veth17.1 (the
		// router's private side).
		must(t, topo.Veth(hostA, "veth17.0", "", v.router, "veth17.1", ""))
		must(t, hostA.Enslave("veth17.0", "br-pr"))
		must(t, hostA.IP("link", "set", "dev", "veth17.0", "mtu", overlayMTU))
		must(t, v.router.IP("link", "set", "dev", "veth17.1", "mtu", overlayMTU))
	}
	// The seed's router: forwarding on, private traffic masqueraded out
	// of the public side.
	must(t, v.router.EnableForwarding())
	for _, a := range vxlanFamilies {
		must(t, v.public.AddAddr("eth1", a.publicClient+"/"+a.publicBits))
		must(t, v.router.AddAddr("veth15.1", a.routerPublic+"/"+a.publicBits))
		must(t, v.router.AddAddr(routerLANDev, a.routerLAN+"/"+a.lanBits))
		must(t, v.vmb.AddAddr("eth0", a.vmB+"/"+a.lanBits))
		must(t, v.vmb.AddRoute("default", a.routerLAN))
		iptables(t, a.fam, v.router, "-t nat -I POSTROUTING -o veth15.1 -j MASQUERADE")

		v.web[a.fam] = e2e.EchoIn(t, v.vmb, hostPort(a.vmB, "9000"))
		e2e.UDPEchoIn(t, v.vmb, hostPort(a.vmB, "9000"))
		v.pubEcho[a.fam] = e2e.EchoIn(t, v.public, hostPort(a.publicClient, "7000"))
	}
	return v
}

// TestSeed001VXLANRouter publishes vm-b's port 9000 on the router's
// public addresses, IPv4 and IPv6 (ebpfwd in the router), 1 MiB each way
// through the overlay, and checks that vm-b still reaches the public side
// through the router's MASQUERADE while ebpfwd runs.
func TestSeed001VXLANRouter(t *testing.T) {
	t.Parallel()
	for _, layout := range []struct {
		name          string
		routerIsHostA bool
	}{
		{"router beside host A's bridge", false},
		{"router owns the vxlan device", true},
	} {
		t.Run(layout.name, func(t *testing.T) {
			t.Parallel()
			v := newVXLANRouter(t, layout.routerIsHostA)
			for _, dp := range datapaths {
				t.Run(dp, func(t *testing.T) {
					var fwds []string
					for _, a := range vxlanFamilies {
						fwds = append(fwds, forward("publish-"+a.fam.name, hostPort(a.routerPublic, "8000"), hostPort(a.vmB, "9000"), dp, ""))
					}
					e2e.Start(t, "vx-"+dp, services(fwds...), e2e.Options{In: v.router})
					for _, a := range vxlanFamilies {
						published := hostPort(a.routerPublic, "8000")
						t.Run(a.fam.name, func(t *testing.T) {
							check(t, dp, []path{
								{name: "public -> vm-b tcp 1MiB", from: v.public, proto: "tcp", addr: published, server: v.web[a.fam], source: a.routerLAN, kernel: true, size: vxlanBytes},
								{name: "public -> vm-b udp", from: v.public, proto: "udp", addr: published},
								// A datagram filling the public side's
								// 1500 bytes is too big for the overlay:
								// it must arrive, not be dropped.
								{name: fmt.Sprintf("public -> vm-b udp %d bytes", a.bigUDP), from: v.public, proto: "udp", addr: published, size: a.bigUDP},
								{name: "vm-b -> public via masquerade", from: v.vmb, proto: "tcp", addr: hostPort(a.publicClient, "7000"), server: v.pubEcho[a.fam], source: a.routerPublic, size: vxlanBytes},
							})
						})
					}
				})
			}
		})
	}
}
