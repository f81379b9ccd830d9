package topologies

import (
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// dockerHost is seed 002's layout (Docker 网络学习第四篇): a host with
// bridge0 10.1.1.1/24 and containers ns1 (10.1.1.2) and ns2 (10.1.1.3)
// on it by veth pairs, FORWARD rules and MASQUERADE so the containers
// reach the LAN through the host (172.31.131.149), and another machine
// on that LAN (172.31.131.150) that knows nothing of 10.1.1.0/24.
type dockerHost struct {
	host, lan, ns1, ns2 *topo.NS
	// web is ns1's TCP echo at 10.1.1.2:80 (UDP echo on the same port);
	// lanEcho the LAN machine's TCP echo at 172.31.131.150:7000.
	web, lanEcho *e2e.AcceptLog
}

const (
	hostLAN   = "172.31.131.149"
	otherLAN  = "172.31.131.150"
	bridgeIP  = "10.1.1.1"
	published = "10.1.1.2" // ns1, the container whose port is published
	ns2IP     = "10.1.1.3"
	// ebpfwdPort is published by ebpfwd, dockerPort by Docker's own
	// DNAT rule, both to port 80 of ns1.
	ebpfwdPort = "8080"
	dockerPort = "8081"
)

// dockerRules are what dockerd writes for `docker run -p 8081:80` with
// the userland proxy off (hairpin NAT instead of docker-proxy), and the
// seed's FORWARD and MASQUERADE rules. FORWARD drops by default, as on a
// Docker host.
var dockerRules = []string{
	// The seed: containers out through the host, replies back in.
	"-P FORWARD DROP",
	"-A FORWARD -i bridge0 ! -o bridge0 -j ACCEPT",
	"-A FORWARD -o bridge0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
	"-t nat -A POSTROUTING -s 10.1.1.0/24 ! -o bridge0 -j MASQUERADE",
	// Docker: containers talk to each other (icc), published ports are
	// let through to the container.
	"-A FORWARD -i bridge0 -o bridge0 -j ACCEPT",
	"-A FORWARD -d 10.1.1.2/32 ! -i bridge0 -o bridge0 -p tcp --dport 80 -j ACCEPT",
	"-A FORWARD -d 10.1.1.2/32 ! -i bridge0 -o bridge0 -p udp --dport 80 -j ACCEPT",
	// Docker's DOCKER chain, reached for local destinations from outside
	// (PREROUTING) and from the host's own processes (OUTPUT).
	"-t nat -N DOCKER",
	"-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
	"-t nat -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER",
	"-t nat -A DOCKER -p tcp --dport 8081 -j DNAT --to-destination 10.1.1.2:80",
	"-t nat -A DOCKER -p udp --dport 8081 -j DNAT --to-destination 10.1.1.2:80",
	// Hairpin NAT: a container dialing the published port comes back out
	// of bridge0; without this its peer would answer it directly over the
	// bridge, from an address it never dialed.
	"-t nat -A POSTROUTING -s 10.1.1.0/24 -o bridge0 -m conntrack --ctstate DNAT -j MASQUERADE",
}

func newDockerHost(t *testing.T) dockerHost {
	t.Helper()
	d := dockerHost{host: newNS(t, "dk-host"), lan: newNS(t, "dk-lan"), ns1: newNS(t, "dk-ns1"), ns2: newNS(t, "dk-ns2")}
	must(t, topo.Veth(d.lan, "eth0", otherLAN+"/24", d.host, "eth0", hostLAN+"/24"))
	must(t, d.host.Bridge("bridge0", bridgeIP+"/24"))
	for i, c := range []struct {
		ns *topo.NS
		ip string
	}{{d.ns1, published}, {d.ns2, ns2IP}} {
		vethb := []string{"vethb1", "vethb2"}[i]
		must(t, topo.Veth(d.host, vethb, "", c.ns, "veth1", c.ip+"/24"))
		must(t, d.host.Enslave(vethb, "bridge0"))
		// Docker turns hairpin mode on when its userland proxy is off:
		// where br_netfilter is loaded (it is on Docker hosts, and
		// bridged frames then cross iptables), the published container's
		// own DNATed frame is bridged back out of the port it came in on.
		must(t, d.host.IP("link", "set", "dev", vethb, "type", "bridge_slave", "hairpin", "on"))
		// The seed's first step: bridge0 is the container's gateway.
		must(t, c.ns.AddRoute("default", bridgeIP))
	}
	must(t, d.host.EnableForwarding())
	iptables(t, ipv4, d.host, dockerRules...)
	d.web = e2e.EchoIn(t, d.ns1, published+":80")
	e2e.UDPEchoIn(t, d.ns1, published+":80")
	d.lanEcho = e2e.EchoIn(t, d.lan, otherLAN+":7000")
	return d
}

// TestSeed002DockerHost publishes ns1's port 80 on the host's LAN address
// with ebpfwd (8080) beside Docker's own DNAT (8081), and reaches both
// from the LAN, from the other container and from the published container
// itself (hairpin), and from the host; the containers keep reaching the
// LAN through the host's MASQUERADE while ebpfwd runs.
func TestSeed002DockerHost(t *testing.T) {
	t.Parallel()
	d := newDockerHost(t)
	ebpfwdAddr := hostLAN + ":" + ebpfwdPort
	dockerAddr := hostLAN + ":" + dockerPort
	var paths []path
	for _, c := range []struct {
		who  string
		from *topo.NS
		// dnatSource is whom the container sees behind Docker's DNAT:
		// LAN clients keep their address, bridge clients are
		// hairpin-masqueraded to bridge0's, the host's own dials leave
		// from its LAN address (the route to 10.1.1.0/24 picks the
		// destination's original, local, source).
		dnatSource string
		// kernel: on tc, the program carries it (all but the host's own
		// processes, which reach ebpfwd's socket).
		kernel bool
	}{
		{"LAN", d.lan, otherLAN, true},
		{"other container (hairpin)", d.ns2, bridgeIP, true},
		{"published container itself (hairpin)", d.ns1, bridgeIP, true},
		{"host process", d.host, hostLAN, false},
	} {
		paths = append(paths,
			// ebpfwd dials from the host (userspace) or SNATs to the
			// host's address towards ns1 (tc): bridge0's, either way.
			path{name: c.who + " -> ebpfwd tcp", from: c.from, proto: "tcp", addr: ebpfwdAddr, server: d.web, source: bridgeIP, kernel: c.kernel},
			path{name: c.who + " -> ebpfwd udp", from: c.from, proto: "udp", addr: ebpfwdAddr},
			path{name: c.who + " -> docker dnat tcp", from: c.from, proto: "tcp", addr: dockerAddr, server: d.web, source: c.dnatSource},
			path{name: c.who + " -> docker dnat udp", from: c.from, proto: "udp", addr: dockerAddr},
		)
	}
	// The seed's point: a container reaches the LAN through the host's
	// MASQUERADE. ebpfwd's program sits on every interface of the host and
	// must pass this traffic on untouched.
	for name, c := range map[string]*topo.NS{"ns1": d.ns1, "ns2": d.ns2} {
		paths = append(paths, path{name: name + " -> LAN via masquerade", from: c, proto: "tcp", addr: otherLAN + ":7000", server: d.lanEcho, source: hostLAN})
	}

	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			// `docker run -p 8080:80` done by ebpfwd, running on the host.
			e2e.Start(t, "dk-"+dp, services(forward("publish", ebpfwdAddr, published+":80", dp, "")), e2e.Options{In: d.host})
			check(t, dp, paths)
		})
	}
}
