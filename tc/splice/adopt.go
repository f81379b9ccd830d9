package splice

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/ebpfwd/ebpfwd/netns"
)

// errNoLink: no link of the pair's name exists, so there is nothing to
// adopt.
var errNoLink = errors.New("no splice link of that name")

// adopt returns the link a previous run of this instance left between
// listen and out, checked to be exactly what Create builds: a veth pair
// whose ends are each other's peers, carry this instance's alias, are up
// and hold the two addresses of one pool slot. Flows over it keep their
// interface indexes and MACs, which the tc program's maps hold. It returns
// errNoLink when there is no such link, another error when there is one
// that does not pass.
func (s *Links) adopt(listen, out netns.NS, name string) (*Link, error) {
	l := &Link{Name: name, Listen: End{NS: listen}, Out: End{NS: out}}
	var peerIndex int
	found := false
	err := listen.Do(func() error {
		lnk, err := netlink.LinkByName(name)
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return nil
		}
		if err != nil {
			return err
		}
		found = true
		veth, ok := lnk.(*netlink.Veth)
		if !ok {
			return fmt.Errorf("%s is a %s device, not a veth", name, lnk.Type())
		}
		if peerIndex, err = netlink.VethPeerIndex(veth); err != nil {
			return fmt.Errorf("find the peer of %s: %w", name, err)
		}
		return s.readEnd(&l.Listen, lnk)
	})
	if err != nil {
		return nil, fmt.Errorf("listen end in netns %s: %w", listen, err)
	}
	if !found {
		return nil, errNoLink
	}
	err = out.Do(func() error {
		lnk, err := netlink.LinkByName(name)
		if err != nil {
			return err
		}
		if lnk.Attrs().Index != peerIndex {
			return fmt.Errorf("%s (ifindex %d) is not the listen end's peer (ifindex %d)", name, lnk.Attrs().Index, peerIndex)
		}
		return s.readEnd(&l.Out, lnk)
	})
	if err != nil {
		return nil, fmt.Errorf("out end in netns %s: %w", out, err)
	}
	ends, ok := s.pool.endsOf(l.Listen.Addr4)
	if !ok || ends.Out4.Addr() != l.Out.Addr4 {
		return nil, fmt.Errorf("addresses %s and %s are not the two ends of one slot of %s", l.Listen.Addr4, l.Out.Addr4, s.pool.V4)
	}
	if l.Listen.Addr6.IsValid() != l.Out.Addr6.IsValid() ||
		(l.Listen.Addr6.IsValid() && (l.Listen.Addr6 != ends.Listen6.Addr() || l.Out.Addr6 != ends.Out6.Addr())) {
		return nil, fmt.Errorf("IPv6 addresses %v and %v are not the ends of the slot of %s", l.Listen.Addr6, l.Out.Addr6, l.Listen.Addr4)
	}
	return l, nil
}

// readEnd checks one end of an existing link (in the calling thread's
// namespace) and records its ifindex, MAC and pool addresses in e.
func (s *Links) readEnd(e *End, lnk netlink.Link) error {
	attrs := lnk.Attrs()
	if attrs.Alias != s.alias() {
		return fmt.Errorf("%s has alias %q, not this instance's %q", attrs.Name, attrs.Alias, s.alias())
	}
	if attrs.Flags&net.FlagUp == 0 {
		return fmt.Errorf("%s is down", attrs.Name)
	}
	addrs, err := netlink.AddrList(lnk, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", attrs.Name, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		bits, _ := a.Mask.Size()
		var slot *netip.Addr
		switch {
		case ip.Is4() && bits == subnetBits4 && s.pool.V4.Contains(ip):
			slot = &e.Addr4
		case ip.Is6() && bits == subnetBits6 && s.pool.V6.Contains(ip):
			slot = &e.Addr6
		default:
			continue // not a pool address (an IPv6 link-local, say)
		}
		if slot.IsValid() {
			return fmt.Errorf("%s has two pool addresses, %s and %s", attrs.Name, *slot, ip)
		}
		*slot = ip
	}
	if !e.Addr4.IsValid() {
		return fmt.Errorf("%s has no IPv4 address from %s", attrs.Name, s.pool.V4)
	}
	e.Ifindex = attrs.Index
	e.MAC = attrs.HardwareAddr
	return nil
}

// endsOf returns the ends of the slot whose listen end is listen4.
func (p Pool) endsOf(listen4 netip.Addr) (Ends, bool) {
	for i := range p.slots() {
		e := p.ends(i)
		if e.Listen4.Addr() == listen4 {
			return e, true
		}
	}
	return Ends{}, false
}
