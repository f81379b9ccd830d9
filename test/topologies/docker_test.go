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
//
// It is dual stack, as Docker's IPv6 mode makes it (`"ipv6": true,
// "ip6tables": true, "fixed-cidr-v6"` in daemon.json): bridge0 and the
// containers also have unique local addresses, the LAN a global prefix
// (the documentation one here), and ip6tables carries the same FORWARD,
// MASQUERADE and DNAT rules as iptables.
type dockerHost struct {
	host, lan, ns1, ns2 *topo.NS
	// web is ns1's TCP echo at port 80 (UDP echo on the same port),
	// lanEcho the LAN machine's TCP echo at port 7000, each on both
	// families' addresses.
	web, lanEcho map[family]*e2e.AcceptLog
}

// dockerAddrs are one family's addresses of seed 002's layout.
type dockerAddrs struct {
	fam family
	// hostLAN and otherLAN are on the LAN (prefix lanBits); bridge0,
	// ns1 (the container whose port is published) and ns2 are in subnet.
	hostLAN, otherLAN, lanBits         string
	bridgeIP, published, ns2IP, subnet string
	// loopback is what Docker's OUTPUT rule leaves out (! -d).
	loopback string
}

// bridgeBits is subnet's prefix length.
func (a dockerAddrs) bridgeBits() string {
	return a.subnet[len(a.subnet)-2:]
}

// dockerFamilies are the seed's IPv4 addresses and their IPv6 twins.
var dockerFamilies = []dockerAddrs{
	{fam: ipv4, hostLAN: "172.31.131.149", otherLAN: "172.31.131.150", lanBits: "24",
		bridgeIP: "10.1.1.1", published: "10.1.1.2", ns2IP: "10.1.1.3", subnet: "10.1.1.0/24", loopback: "127.0.0.0/8"},
	{fam: ipv6, hostLAN: "2001:db8:131::149", otherLAN: "2001:db8:131::150", lanBits: "64",
		bridgeIP: "fd00:1:1:1::1", published: "fd00:1:1:1::2", ns2IP: "fd00:1:1:1::3", subnet: "fd00:1:1:1::/64", loopback: "::1/128"},
}

const (
	// ebpfwdPort is published by ebpfwd, dockerPort by Docker's own
	// DNAT rule, both to port 80 of ns1.
	ebpfwdPort = "8080"
	dockerPort = "8081"
)

// dockerRules are what dockerd writes for `docker run -p 8081:80` with
// the userland proxy off (hairpin NAT instead of docker-proxy), and the
// seed's FORWARD and MASQUERADE rules, in iptables and, with the IPv6
// addresses, ip6tables alike. FORWARD drops by default, as on a Docker
// host. $SUBNET is the bridge's subnet, $PUB the published container's
// address, $TO its port 80 as DNAT writes it, $LOOP loopback.
var dockerRules = []string{
	// The seed: containers out through the host, replies back in.
	"-P FORWARD DROP",
	"-A FORWARD -i bridge0 ! -o bridge0 -j ACCEPT",
	"-A FORWARD -o bridge0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
	"-t nat -A POSTROUTING -s $SUBNET ! -o bridge0 -j MASQUERADE",
	// Docker: containers talk to each other (icc), published ports are
	// let through to the container.
	"-A FORWARD -i bridge0 -o bridge0 -j ACCEPT",
	"-A FORWARD -d $PUB ! -i bridge0 -o bridge0 -p tcp --dport 80 -j ACCEPT",
	"-A FORWARD -d $PUB ! -i bridge0 -o bridge0 -p udp --dport 80 -j ACCEPT",
	// Docker's DOCKER chain, reached for local destinations from outside
	// (PREROUTING) and from the host's own processes (OUTPUT).
	"-t nat -N DOCKER",
	"-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER",
	"-t nat -A OUTPUT ! -d $LOOP -m addrtype --dst-type LOCAL -j DOCKER",
	"-t nat -A DOCKER -p tcp --dport 8081 -j DNAT --to-destination $TO",
	"-t nat -A DOCKER -p udp --dport 8081 -j DNAT --to-destination $TO",
	// Hairpin NAT: a container dialing the published port comes back out
	// of bridge0; without this its peer would answer it directly over the
	// bridge, from an address it never dialed.
	"-t nat -A POSTROUTING -s $SUBNET -o bridge0 -m conntrack --ctstate DNAT -j MASQUERADE",
}

// rules are dockerRules with a's addresses.
func (a dockerAddrs) rules() []string {
	vars := map[string]string{"SUBNET": a.subnet, "PUB": a.published, "TO": hostPort(a.published, "80"), "LOOP": a.loopback}
	out := make([]string, len(dockerRules))
	for i, r := range dockerRules {
		out[i] = e2e.Config(r, vars)
	}
	return out
}

func newDockerHost(t *testing.T) dockerHost {
	t.Helper()
	d := dockerHost{host: newNS(t, "dk-host"), lan: newNS(t, "dk-lan"), ns1: newNS(t, "dk-ns1"), ns2: newNS(t, "dk-ns2"),
		web: map[family]*e2e.AcceptLog{}, lanEcho: map[family]*e2e.AcceptLog{}}
	must(t, topo.Veth(d.lan, "eth0", "", d.host, "eth0", ""))
	must(t, d.host.Bridge("bridge0", ""))
	containers := []struct {
		ns    *topo.NS
		vethb string
		ip    func(dockerAddrs) string
	}{
		{d.ns1, "vethb1", func(a dockerAddrs) string { return a.published }},
		{d.ns2, "vethb2", func(a dockerAddrs) string { return a.ns2IP }},
	}
	for _, c := range containers {
		must(t, topo.Veth(d.host, c.vethb, "", c.ns, "veth1", ""))
		must(t, d.host.Enslave(c.vethb, "bridge0"))
		// Docker turns hairpin mode on when its userland proxy is off:
		// where br_netfilter is loaded (it is on Docker hosts, and
		// bridged frames then cross iptables), the published container's
		// own DNATed frame is bridged back out of the port it came in on.
		must(t, d.host.IP("link", "set", "dev", c.vethb, "type", "bridge_slave", "hairpin", "on"))
	}
	must(t, d.host.EnableForwarding())
	for _, a := range dockerFamilies {
		must(t, d.lan.AddAddr("eth0", a.otherLAN+"/"+a.lanBits))
		must(t, d.host.AddAddr("eth0", a.hostLAN+"/"+a.lanBits))
		must(t, d.host.AddAddr("bridge0", a.bridgeIP+"/"+a.bridgeBits()))
		for _, c := range containers {
			must(t, c.ns.AddAddr("veth1", c.ip(a)+"/"+a.bridgeBits()))
			// The seed's first step: bridge0 is the container's gateway.
			must(t, c.ns.AddRoute("default", a.bridgeIP))
		}
		iptables(t, a.fam, d.host, a.rules()...)
		d.web[a.fam] = e2e.EchoIn(t, d.ns1, hostPort(a.published, "80"))
		e2e.UDPEchoIn(t, d.ns1, hostPort(a.published, "80"))
		d.lanEcho[a.fam] = e2e.EchoIn(t, d.lan, hostPort(a.otherLAN, "7000"))
	}
	return d
}

// TestSeed002DockerHost publishes ns1's port 80 on the host's LAN
// addresses, IPv4 and IPv6, with ebpfwd (8080) beside Docker's own DNAT
// (8081), and reaches both from the LAN, from the other container and from
// the published container itself (hairpin), and from the host; the
// containers keep reaching the LAN through the host's MASQUERADE while
// ebpfwd runs.
func TestSeed002DockerHost(t *testing.T) {
	t.Parallel()
	d := newDockerHost(t)
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			// `docker run -p 8080:80` done by ebpfwd, running on the
			// host, on each family's LAN address.
			var fwds []string
			for _, a := range dockerFamilies {
				fwds = append(fwds, forward("publish-"+a.fam.name, hostPort(a.hostLAN, ebpfwdPort), hostPort(a.published, "80"), dp, ""))
			}
			e2e.Start(t, "dk-"+dp, services(fwds...), e2e.Options{In: d.host})
			for _, a := range dockerFamilies {
				t.Run(a.fam.name, func(t *testing.T) {
					check(t, dp, d.paths(a))
				})
			}
		})
	}
}

// paths are seed 002's checks in one family.
func (d dockerHost) paths(a dockerAddrs) []path {
	ebpfwdAddr := hostPort(a.hostLAN, ebpfwdPort)
	dockerAddr := hostPort(a.hostLAN, dockerPort)
	web := d.web[a.fam]
	var paths []path
	for _, c := range []struct {
		who  string
		from *topo.NS
		// dnatSource is whom the container sees behind Docker's DNAT:
		// LAN clients keep their address, bridge clients are
		// hairpin-masqueraded to bridge0's, the host's own dials leave
		// from its LAN address (the route to the bridge's subnet picks
		// the destination's original, local, source).
		dnatSource string
		// kernel: on tc, the program carries it (all but the host's own
		// processes, which reach ebpfwd's socket).
		kernel bool
	}{
		{"LAN", d.lan, a.otherLAN, true},
		{"other container (hairpin)", d.ns2, a.bridgeIP, true},
		{"published container itself (hairpin)", d.ns1, a.bridgeIP, true},
		{"host process", d.host, a.hostLAN, false},
	} {
		paths = append(paths,
			// ebpfwd dials from the host (userspace) or SNATs to the
			// host's address towards ns1 (tc): bridge0's, either way.
			path{name: c.who + " -> ebpfwd tcp", from: c.from, proto: "tcp", addr: ebpfwdAddr, server: web, source: a.bridgeIP, kernel: c.kernel},
			path{name: c.who + " -> ebpfwd udp", from: c.from, proto: "udp", addr: ebpfwdAddr},
			path{name: c.who + " -> docker dnat tcp", from: c.from, proto: "tcp", addr: dockerAddr, server: web, source: c.dnatSource},
			path{name: c.who + " -> docker dnat udp", from: c.from, proto: "udp", addr: dockerAddr},
		)
	}
	// The seed's point: a container reaches the LAN through the host's
	// MASQUERADE. ebpfwd's program sits on every interface of the host and
	// must pass this traffic on untouched.
	for _, c := range []struct {
		name string
		ns   *topo.NS
	}{{"ns1", d.ns1}, {"ns2", d.ns2}} {
		paths = append(paths, path{name: c.name + " -> LAN via masquerade", from: c.ns, proto: "tcp", addr: hostPort(a.otherLAN, "7000"), server: d.lanEcho[a.fam], source: a.hostLAN})
	}
	return paths
}
