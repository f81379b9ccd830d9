package netns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
)

// Resolve returns the addresses of host as seen from inside the namespace.
// IP literals are returned as they are. For a named namespace,
// /etc/netns/NAME/hosts is consulted instead of /etc/hosts when it exists,
// and DNS queries are sent from inside the namespace, to the nameservers of
// /etc/netns/NAME/resolv.conf when that file exists. "localhost" resolves to
// 127.0.0.1 and ::1 when the hosts file does not list it.
//
// One difference from `ip netns exec` remains: Go's resolver consults the
// system /etc/hosts itself before asking DNS, so a name missing from the
// namespace's own hosts file but listed in /etc/hosts resolves to the
// /etc/hosts entry.
func (n NS) Resolve(ctx context.Context, host string) ([]netip.Addr, error) {
	if host == "" {
		return nil, &opError{op: "lookup", ns: n, err: errors.New("empty host name")}
	}
	if addr, err := netip.ParseAddr(host); err == nil {
		return []netip.Addr{addr}, nil
	}
	addrs, err := n.lookup(ctx, host)
	if err != nil {
		return nil, &opError{op: "lookup", addr: host, ns: n, err: err}
	}
	return addrs, nil
}

func (n NS) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	if n.IsOwn() {
		// The daemon's own namespace needs no redirection: the system
		// resolver (nsswitch, cgo or Go) answers exactly as it would for
		// any other program.
		addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		return unmapAll(addrs), err
	}
	hosts, err := pickFile(hostsFiles, n.etcPath("hosts"), "/etc/hosts")
	if err != nil {
		return nil, err
	}
	if addrs := hosts.lookup(host); len(addrs) > 0 {
		return addrs, nil
	}
	if hostKey(host) == "localhost" {
		return []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}, nil
	}
	resolver, err := n.dnsResolver()
	if err != nil {
		return nil, err
	}
	addrs, err := resolver.LookupNetIP(ctx, "ip", host)
	return unmapAll(addrs), err
}

// dnsResolver returns a Go resolver whose queries leave from inside n.
//
// Go's resolver takes nameservers, search domains and timeouts from
// /etc/resolv.conf and calls Dial once per query attempt with the server it
// picked. When the namespace has its own resolv.conf, that choice is
// replaced by the namespace's nameservers; each Dial takes the next one, so
// the resolver's retries rotate through all of them.
func (n NS) dnsResolver() (*net.Resolver, error) {
	var servers []netip.Addr
	if path := n.etcPath("resolv.conf"); path != "" {
		conf, exists, err := resolvFiles.get(path)
		if err != nil {
			return nil, &opError{op: "read", addr: path, ns: n, err: err}
		}
		if exists {
			servers = conf.nameservers
			if len(servers) == 0 {
				// resolv.conf(5): without nameserver lines the
				// local machine is queried.
				servers = []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()}
			}
		}
	}
	var next atomic.Uint32
	dial := func(ctx context.Context, network, address string) (net.Conn, error) {
		if len(servers) > 0 {
			i := (next.Add(1) - 1) % uint32(len(servers))
			address = netip.AddrPortFrom(servers[i], 53).String()
		}
		return n.dialOne(ctx, network, address)
	}
	return &net.Resolver{PreferGo: true, Dial: dial}, nil
}

// unmapAll turns IPv4-mapped IPv6 addresses into plain IPv4 ones: the
// resolver returns IPv4 answers in 16-byte form, and callers filter by family.
func unmapAll(addrs []netip.Addr) []netip.Addr {
	for i := range addrs {
		addrs[i] = addrs[i].Unmap()
	}
	return addrs
}
