package tc

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// NodesReachable checks what Applicable cannot without entering
// namespaces: a service crossing into netns.out over a splice link gets
// its nodes' replies back only from nodes that are addresses of netns.out
// itself. A node beyond it would answer the splice link's address, which
// nothing routes back (the userspace datapath, whose connections come
// from netns.out's own address, has no such limit).
func NodesReachable(svc datapath.Service) error {
	listen, err := netns.Parse(svc.ListenNS)
	if err != nil {
		return err
	}
	out, err := netns.Parse(svc.OutNS)
	if err != nil {
		return err
	}
	if same, err := splice.SameNamespace(listen, out); err != nil || same {
		return err
	}
	local := map[netip.Addr]bool{}
	err = out.Do(func() error {
		addrs, err := net.InterfaceAddrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					local[ip.Unmap()] = true
				}
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("list the addresses of netns.out %s: %w", out, err)
	}
	for _, n := range svc.Nodes {
		ap, err := netip.ParseAddrPort(n.Addr)
		if err != nil {
			return fmt.Errorf("node %s: address %q is not an IP address and port", n.Name, n.Addr)
		}
		if !local[ap.Addr().Unmap()] {
			return fmt.Errorf("node %s (%s) is not an address of netns.out %s: across a splice link only nodes in netns.out itself get their replies back", n.Name, ap.Addr(), out)
		}
	}
	return nil
}
