package tc

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/selector"
)

// Applies reports why the tc datapath cannot carry svc, or nil when it can:
// what the service's shape allows (applicable), then what its namespaces
// allow (nodesReachable).
func (*Datapath) Applies(svc datapath.Service) error {
	if err := applicable(svc); err != nil {
		return err
	}
	return nodesReachable(svc)
}

// Probe reports whether this kernel (and this process's privileges) can
// run the tc datapath, with the first reason it cannot. It probes once.
func (*Datapath) Probe() error { return probe() }

// applicable checks what the service's configuration alone decides.
func applicable(svc datapath.Service) error {
	switch {
	case svc.Proxy:
		return datapath.NeverApplies("http proxy services terminate connections in userspace")
	case svc.Chained:
		return datapath.NeverApplies("traffic goes through proxy hops, which need a userspace connection")
	case svc.AcceptProxyHeader:
		return datapath.NeverApplies("the service reads a PROXY protocol header (proxyProtocol) before the client's bytes: packets forwarded in the kernel cannot have it stripped")
	case svc.SendProxyHeader > 0:
		return datapath.NeverApplies("the nodes get a PROXY protocol header (handler proxyProtocol) before the client's bytes: packets forwarded in the kernel cannot carry one")
	case svc.Network == "udp" && !svc.PacketKeepAlive:
		return datapath.NeverApplies("udp sessions end with their first reply (listener keepAlive is false, GOST's default); a kernel flow lives until ttl: set keepAlive: true to run on tc")
	case svc.Network == "udp" && svc.PacketReadSize > 0:
		return datapath.NeverApplies("readBufferSize cuts longer datagrams; the kernel forwards whole packets")
	case svc.Network != "tcp" && svc.Network != "udp":
		return fmt.Errorf("network %q is not tcp or udp", svc.Network)
	case len(svc.Nodes) == 0:
		return errors.New("no forward nodes")
	case len(svc.Limiters) > 0:
		// Not NeverApplies: the service could run on tc without them, so
		// auto's fallback is worth a metric and a line in ebpfwd plan.
		return fmt.Errorf("the kernel path does not enforce GOST limiters (%s); the userspace relay does",
			strings.Join(svc.Limiters, ", "))
	}
	if _, err := bpfStrategy(svc.Strategy); err != nil {
		return err
	}
	vip := svc.Listen
	if !vip.IsValid() {
		return fmt.Errorf("listen address %q is not a single IP address and port", svc.Addr)
	}
	if vip.Addr().IsLoopback() || vip.Addr().IsUnspecified() {
		return fmt.Errorf("listen address %s never crosses an interface", vip)
	}
	for _, n := range svc.Nodes {
		if !n.IP.IsValid() {
			return fmt.Errorf("node %s: address %q is not an IP address and port", n.Name, n.Addr)
		}
		if n.IP.Addr().Is4() != vip.Addr().Is4() {
			return fmt.Errorf("node %s: %s is not of the listen address's IP version", n.Name, n.Addr)
		}
	}
	return nil
}

// bpfStrategy maps a selector strategy to the program's.
func bpfStrategy(s selector.Strategy) (loader.Strategy, error) {
	switch s {
	case "", selector.Round:
		return loader.RoundRobin, nil
	case selector.Rand:
		return loader.Random, nil
	case selector.Hash:
		return loader.Hash, nil
	}
	return 0, fmt.Errorf("selector strategy %q is not implemented in BPF (round, rand and hash are)", s)
}

// nodesReachable checks what applicable cannot without entering
// namespaces: a service crossing into netns.out over a splice link gets
// its nodes' replies back only from nodes that are addresses of netns.out
// itself. A node beyond it would answer the splice link's address, which
// nothing routes back (the userspace datapath, whose connections come
// from netns.out's own address, has no such limit).
func nodesReachable(svc datapath.Service) error {
	out := svc.OutNS
	if same, err := svc.ListenNS.Same(out); err != nil || same {
		return err
	}
	local := map[netip.Addr]bool{}
	err := out.Do(func() error {
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
		if !local[n.IP.Addr().Unmap()] {
			return fmt.Errorf("node %s (%s) is not an address of netns.out %s: across a splice link only nodes in netns.out itself get their replies back", n.Name, n.IP.Addr(), out)
		}
	}
	return nil
}
