package loader

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// IP protocol numbers as the BPF structs hold them.
const (
	protoTCP = 6
	protoUDP = 17
)

// ServiceID identifies a service in the maps; its counters are indexed by it.
type ServiceID uint32

// Strategy is how the program picks a node for a new flow.
type Strategy uint32

const (
	RoundRobin = Strategy(bpf.NATStrategySTRATEGY_ROUND_ROBIN)
	Random     = Strategy(bpf.NATStrategySTRATEGY_RANDOM)
	// Hash picks by client address, so a client keeps its node.
	Hash = Strategy(bpf.NATStrategySTRATEGY_HASH)
)

// Service is one service for the tc datapath.
type Service struct {
	Network  string         // "tcp" or "udp"
	VIP      netip.AddrPort // the listen address clients connect to
	Strategy Strategy
	Nodes    []Node
	// IdleTimeout expires an established TCP flow or a UDP flow without
	// traffic; 0 means DefaultTCPIdleTimeout / DefaultUDPIdleTimeout.
	IdleTimeout time.Duration
	// MaxFails is how many new flows in a row a node may fail (refused,
	// unreachable, SYN unanswered: NodeHealth) before the program stops
	// choosing it on its own, until it answers a flow or SetNodeHealthy
	// puts it back; 0: only SetNodeHealthy takes nodes out.
	MaxFails int
}

// Node is one forward target.
type Node struct {
	Addr netip.AddrPort
	// SNAT is the source address translated flows get towards this node:
	// the node's replies must come back to it. The zero Addr means the
	// preferred source of the namespace's route to the node.
	SNAT netip.Addr
	// Unhealthy nodes get no new flows (marked by the selector's
	// maxFails/failTimeout logic in userspace).
	Unhealthy bool
	// Egress, when set, is the fixed way to the node: the program sends
	// its packets out of this device with these MACs and never asks the
	// namespace's FIB. It is how nodes in another namespace are reached
	// over a splice link; SNAT must then be set too (our address on the
	// link), since no route lookup can supply it.
	Egress *Egress
}

// Egress is a fixed layer-2 path out of the Loader's namespace: a veth
// whose peer lives in another namespace (the program uses
// bpf_redirect_peer on it, so it must be attached), our MAC on it and the
// peer's.
type Egress struct {
	Ifindex        int
	SrcMAC, DstMAC net.HardwareAddr
}

func (e *Egress) compile() (bpf.NATL2Path, error) {
	if e.Ifindex <= 0 || len(e.SrcMAC) != 6 || len(e.DstMAC) != 6 {
		return bpf.NATL2Path{}, fmt.Errorf("egress ifindex %d %s -> %s: want an interface and two Ethernet MACs", e.Ifindex, e.SrcMAC, e.DstMAC)
	}
	return bpf.NATL2Path{Ifindex: uint32(e.Ifindex), OurMac: [6]byte(e.SrcMAC), PeerMac: [6]byte(e.DstMAC)}, nil
}

type serviceState struct {
	key      bpf.NATServiceKey
	nodes    int
	maxFails uint32
}

// PutService adds a service, or replaces the one with the same VIP and
// network, and returns its ID. Routes to the nodes are looked up in the
// Loader's namespace (set by the first Attach); they give each node its
// route hint and, where Node.SNAT is unset, its SNAT address. Nodes with
// an Egress are not looked up: the egress is their route.
func (l *Loader) PutService(s Service) (ServiceID, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, errors.New("put service: loader is closed")
	}
	if l.ns == nil {
		return 0, fmt.Errorf("put service %s/%s: attach to an interface first", s.Network, s.VIP)
	}
	key, svc, nodes, err := l.compileService(s)
	if err != nil {
		return 0, fmt.Errorf("put service %s/%s: %w", s.Network, s.VIP, err)
	}

	// Reuse the ID of the service with this key (also one a previous run
	// put: its flows and counters refer to the ID), else take the lowest
	// free one.
	var old bpf.NATService
	prevNodes := 0
	if err := l.objs.EbpfwdServices.Lookup(key, &old); err == nil {
		svc.Id = old.Id
		prevNodes = int(old.NodeCount)
	} else {
		used, err := l.usedServiceIDs()
		if err != nil {
			return 0, fmt.Errorf("put service %s/%s: %w", s.Network, s.VIP, err)
		}
		for id := ServiceID(1); id < ServiceID(natLimits.Services); id++ {
			if !used[id] {
				svc.Id = uint32(id)
				break
			}
		}
		if svc.Id == 0 {
			return 0, fmt.Errorf("put service %s/%s: all %d service slots in use", s.Network, s.VIP, natLimits.Services-1)
		}
	}
	id := ServiceID(svc.Id)
	// Nodes first: the program reads node_count from the service, so it
	// must never see a count larger than the nodes present.
	for i, n := range nodes {
		nk := bpf.NATNodeKey{ServiceId: svc.Id, Index: uint32(i)}
		// Another node at this index (or none before) starts with no
		// events: the counts are the node's, not the slot's.
		var prev bpf.NATNode
		if err := l.objs.EbpfwdNodes.Lookup(nk, &prev); err != nil || prev.Addr != n.Addr || prev.Port != n.Port {
			l.deleteNodeEvents(nk)
		}
		if err := l.objs.EbpfwdNodes.Put(nk, n); err != nil {
			return 0, fmt.Errorf("put node %d of service %s/%s: %w", i, s.Network, s.VIP, err)
		}
	}
	if err := l.objs.EbpfwdServices.Put(key, svc); err != nil {
		return 0, fmt.Errorf("put service %s/%s: %w", s.Network, s.VIP, err)
	}
	for i := len(nodes); i < prevNodes; i++ {
		nk := bpf.NATNodeKey{ServiceId: svc.Id, Index: uint32(i)}
		_ = l.objs.EbpfwdNodes.Delete(nk)
		l.deleteNodeEvents(nk)
	}
	l.services[id] = &serviceState{key: key, nodes: len(nodes), maxFails: svc.MaxFails}
	return id, nil
}

func (l *Loader) compileService(s Service) (bpf.NATServiceKey, bpf.NATService, []bpf.NATNode, error) {
	var proto uint8
	idle := s.IdleTimeout
	switch s.Network {
	case "tcp":
		proto = protoTCP
		if idle == 0 {
			idle = DefaultTCPIdleTimeout
		}
	case "udp":
		proto = protoUDP
		if idle == 0 {
			idle = DefaultUDPIdleTimeout
		}
	default:
		return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("network %q: want tcp or udp", s.Network)
	}
	vip := s.VIP.Addr().Unmap()
	if !vip.IsValid() || vip.IsUnspecified() || s.VIP.Port() == 0 {
		return bpf.NATServiceKey{}, bpf.NATService{}, nil, errors.New("the tc datapath needs a concrete listen address and port")
	}
	// The program ignores a service with more nodes than its selection
	// loop covers: refuse it here, where the error can say so.
	if len(s.Nodes) == 0 || len(s.Nodes) > int(natLimits.Nodes) {
		return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("%d nodes: want 1 to %d", len(s.Nodes), natLimits.Nodes)
	}
	if s.MaxFails < 0 || s.MaxFails > math.MaxUint32 {
		return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("max fails %d: want 0 or more", s.MaxFails)
	}
	if s.Strategy > Hash {
		return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("unknown strategy %d", s.Strategy)
	}
	nodes := make([]bpf.NATNode, len(s.Nodes))
	for i, n := range s.Nodes {
		addr := n.Addr.Addr().Unmap()
		if addr.Is4() != vip.Is4() || n.Addr.Port() == 0 {
			return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("node %s: want a port and the listen address's IP version", n.Addr)
		}
		var (
			ifindex int
			src     netip.Addr
			egress  bpf.NATL2Path
			err     error
		)
		if n.Egress != nil {
			// The namespace may have no route to the node, or one that
			// leads elsewhere: the fixed egress is the route.
			if egress, err = n.Egress.compile(); err != nil {
				return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("node %s: %w", n.Addr, err)
			}
			ifindex = n.Egress.Ifindex
		} else if ifindex, src, err = l.route(addr); err != nil {
			return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("node %s: %w", n.Addr, err)
		}
		snat := n.SNAT.Unmap()
		if !snat.IsValid() {
			snat = src
		}
		if !snat.IsValid() || snat.Is4() != vip.Is4() {
			return bpf.NATServiceKey{}, bpf.NATService{}, nil, fmt.Errorf("node %s: no SNAT address of its IP version", n.Addr)
		}
		nodes[i] = bpf.NATNode{
			Addr:     bpf.Addr(addr),
			SnatAddr: bpf.Addr(snat),
			Port:     bpf.Port(n.Addr.Port()),
			Ifindex:  uint32(ifindex),
			Egress:   egress,
		}
		if !n.Unhealthy {
			nodes[i].Healthy = 1
		}
	}
	key := bpf.NATServiceKey{Addr: bpf.Addr(vip), Port: bpf.Port(s.VIP.Port()), Proto: proto, Family: bpf.Family(vip)}
	svc := bpf.NATService{NodeCount: uint32(len(nodes)), Strategy: uint32(s.Strategy), IdleTimeoutNs: uint64(idle),
		MaxFails: uint32(s.MaxFails)}
	return key, svc, nodes, nil
}

// usedServiceIDs lists the IDs this run gave out and those in the services
// map, where a previous run's services stay until PruneServices.
func (l *Loader) usedServiceIDs() (map[ServiceID]bool, error) {
	used := make(map[ServiceID]bool, len(l.services))
	for id := range l.services {
		used[id] = true
	}
	var (
		key bpf.NATServiceKey
		svc bpf.NATService
	)
	it := l.objs.EbpfwdServices.Iterate()
	for it.Next(&key, &svc) {
		used[ServiceID(svc.Id)] = true
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("walk services map: %w", err)
	}
	return used, nil
}

// route looks up the namespace's route to dst: its egress interface and
// preferred source address.
func (l *Loader) route(dst netip.Addr) (int, netip.Addr, error) {
	var ifindex int
	var src netip.Addr
	err := l.ns.Do(func() error {
		routes, err := netlink.RouteGet(net.IP(dst.AsSlice()))
		if err != nil {
			return err
		}
		if len(routes) == 0 {
			return errors.New("no route")
		}
		ifindex = routes[0].LinkIndex
		if a, ok := netip.AddrFromSlice(routes[0].Src); ok {
			src = a.Unmap()
		}
		return nil
	})
	if err != nil {
		return 0, netip.Addr{}, fmt.Errorf("route lookup in netns %s: %w", l.ns, err)
	}
	return ifindex, src, nil
}

// DeleteService removes a service. Its flows in progress keep going until
// they expire; new ones go to the stack.
func (l *Loader) DeleteService(id ServiceID) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.services[id]
	if !ok {
		return fmt.Errorf("delete service %d: no such service", id)
	}
	if err := l.objs.EbpfwdServices.Delete(st.key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete service %d: %w", id, err)
	}
	for i := range st.nodes {
		nk := bpf.NATNodeKey{ServiceId: uint32(id), Index: uint32(i)}
		_ = l.objs.EbpfwdNodes.Delete(nk)
		l.deleteNodeEvents(nk)
	}
	delete(l.services, id)
	return nil
}

// SetNodeHealthy marks node index of a service healthy or not; unhealthy
// nodes get no new flows. Healthy also lets a node the program took out
// (MaxFails failures in a row) get new flows again, with its run of
// failures kept one short of MaxFails: as with GOST's marking, a node
// back after failTimeout goes out again at its next failure.
func (l *Loader) SetNodeHealthy(id ServiceID, index int, healthy bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	st, ok := l.services[id]
	if !ok || index < 0 || index >= st.nodes {
		return fmt.Errorf("set health of node %d of service %d: no such node", index, id)
	}
	key := bpf.NATNodeKey{ServiceId: uint32(id), Index: uint32(index)}
	var n bpf.NATNode
	if err := l.objs.EbpfwdNodes.Lookup(key, &n); err != nil {
		return fmt.Errorf("set health of node %d of service %d: %w", index, id, err)
	}
	n.Healthy = 0
	if healthy {
		n.Healthy = 1
		if st.maxFails > 0 && n.Fails >= st.maxFails {
			n.Fails = st.maxFails - 1
		}
	}
	if err := l.objs.EbpfwdNodes.Update(key, n, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("set health of node %d of service %d: %w", index, id, err)
	}
	return nil
}

// RefreshRouteHints looks the route to every node up again and updates
// the nodes whose route hint changed, returning how many did. The hint is
// an ifindex: an interface deleted and created again under the same name
// (a link flap, a CNI plugin re-plumbing a veth) comes back with a new
// one, and with forwarding off the program would go on redirecting the
// node's new flows to the index that is gone, where they vanish. A node
// with no route now gets 0, which leaves its new flows to the stack (the
// service's listener, whose dial fails cleanly and is counted). Nodes with
// a fixed egress are not looked up. The tc datapath calls it when the
// namespace's interfaces change and when a node's health changes (its
// route may have come back with an address added after the interface).
func (l *Loader) RefreshRouteHints() (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || l.ns == nil {
		return 0, nil
	}
	changed := 0
	var errs []error
	for id, st := range l.services {
		for i := range st.nodes {
			ok, err := l.refreshRouteHint(id, st, i)
			if err != nil {
				errs = append(errs, err)
			}
			if ok {
				changed++
			}
		}
	}
	return changed, errors.Join(errs...)
}

// refreshRouteHint updates node index of a service to its current route
// hint and reports whether it changed. l.mu is held.
func (l *Loader) refreshRouteHint(id ServiceID, st *serviceState, index int) (bool, error) {
	key := bpf.NATNodeKey{ServiceId: uint32(id), Index: uint32(index)}
	var n bpf.NATNode
	if err := l.objs.EbpfwdNodes.Lookup(key, &n); err != nil {
		return false, fmt.Errorf("route hint of node %d of service %d: %w", index, id, err)
	}
	if n.Egress.Ifindex != 0 {
		return false, nil
	}
	hint := 0
	if ifindex, _, err := l.route(bpf.AddrFrom(n.Addr, st.key.Family)); err == nil {
		hint = ifindex
	}
	if uint32(hint) == n.Ifindex {
		return false, nil
	}
	n.Ifindex = uint32(hint)
	if err := l.objs.EbpfwdNodes.Update(key, n, ebpf.UpdateExist); err != nil {
		return false, fmt.Errorf("route hint of node %d of service %d: %w", index, id, err)
	}
	return true, nil
}
