package daemon

import (
	"net"
	"net/netip"
	"strconv"

	"github.com/ebpfwd/ebpfwd/netns"
)

// isOwnListener reports whether ap, dialed from namespace ns, reaches one
// of the daemon's own TCP listeners: a service listening in that same
// namespace (by identity, however it is spelled) on ap, or on ap's port at
// every address when ap is an address of that namespace. The HTTP proxy
// refuses such targets (a loop through itself).
func (d *Daemon) isOwnListener(ns netns.NS, ap netip.AddrPort) bool {
	local := -1 // whether ap's address belongs to ns: -1 not yet asked
	for _, s := range d.current() {
		if s.cfg.Listener.Type != "tcp" {
			continue
		}
		addr, port, ok := listenAddrPort(s.cfg.Addr)
		if !ok || port != ap.Port() {
			continue
		}
		if same, err := s.listenNS.Same(ns); err != nil || !same {
			continue
		}
		if !addr.IsUnspecified() {
			if addr.Unmap() == ap.Addr() {
				return true
			}
			continue
		}
		if local < 0 {
			local = 0
			if isLocalAddr(ns, ap.Addr()) {
				local = 1
			}
		}
		if local == 1 {
			return true
		}
	}
	return false
}

// listenAddrPort parses a service's listen address; an empty host is the
// unspecified address (every address).
func listenAddrPort(addr string) (netip.Addr, uint16, bool) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return netip.Addr{}, 0, false
	}
	port, err := strconv.ParseUint(p, 10, 16)
	if err != nil {
		return netip.Addr{}, 0, false
	}
	if host == "" {
		return netip.IPv4Unspecified(), uint16(port), true
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Addr{}, 0, false
	}
	return ip, uint16(port), true
}

// isLocalAddr reports whether ip is an address of namespace ns (loopback
// and the unspecified address, which connect to the host itself, count).
// A namespace that cannot be entered says no.
func isLocalAddr(ns netns.NS, ip netip.Addr) bool {
	if ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	found := false
	_ = ns.Do(func() error {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if na, ok := netip.AddrFromSlice(n.IP); ok && na.Unmap() == ip {
					found = true
				}
			}
		}
		return nil
	})
	return found
}
