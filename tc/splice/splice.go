// Package splice creates and removes the splice links of the tc datapath:
// veth pairs that join a service's listen namespace to its netns.out
// namespace when the first cannot route to the nodes the second reaches.
//
// The tc program in the listen namespace sends a service's packets to its
// end of the link with bpf_redirect_peer, SNATed to that end's address; they
// arrive in netns.out on the peer end, where the node is local or routed as
// usual, and the node's replies come back over the link's connected subnet.
// Nothing is added to either namespace but the link, its two addresses per
// IP version and their connected routes; in particular no route to any node
// is added to the listen namespace, so how its other traffic reaches the
// node does not change.
//
// A link is created directly inside its two namespaces (never in the
// daemon's own unless one of the two is the daemon's own). Both ends carry
// the same name, ebs<12 hex digits> hashed from the instance and the two
// namespaces, and the alias "ebpfwd splice <instance>". A later run of the
// same instance (after a restart or a crash) adopts the link of a pair it
// needs again, so flows over it keep going, and removes with RemoveUnused
// the links of its instance that no service needs any more.
package splice

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/netns"
)

// NamePrefix starts the name of every splice link.
const NamePrefix = "ebs"

// aliasPrefix starts the alias of every splice link; the instance follows.
const aliasPrefix = "ebpfwd splice "

// IsSpliceLink reports whether a link is a splice link of any ebpfwd
// instance. Such links are attached to explicitly by their owner and are
// no place for clients, so generic attachment skips them.
func IsSpliceLink(attrs *netlink.LinkAttrs) bool {
	return strings.HasPrefix(attrs.Name, NamePrefix) && strings.HasPrefix(attrs.Alias, aliasPrefix)
}

// End is one end of a splice link.
type End struct {
	NS      netns.NS
	Ifindex int
	MAC     net.HardwareAddr
	// Addr4 and Addr6 are the end's addresses; Addr6 is invalid when the
	// namespace refused IPv6 (disabled), and IPv6 services cannot use the
	// link then.
	Addr4, Addr6 netip.Addr
}

// Link is a splice link between a listen namespace and a netns.out
// namespace.
type Link struct {
	// Name is the interface name of both ends.
	Name   string
	Listen End // in the listen namespace: the program redirects here
	Out    End // in netns.out: packets arrive here
}

// Addr returns the listen end's address of the IP version of node: the
// SNAT address of flows to it over the link.
func (l *Link) Addr(node netip.Addr) (netip.Addr, error) {
	a := l.Listen.Addr4
	if node.Unmap().Is6() {
		a = l.Listen.Addr6
	}
	if !a.IsValid() {
		return a, fmt.Errorf("splice link %s has no address of %s's IP version (IPv6 disabled in netns %s or %s?)",
			l.Name, node, l.Listen.NS, l.Out.NS)
	}
	return a, nil
}

// Links creates and removes the splice links of one daemon instance.
type Links struct {
	instance string
	pool     Pool
	log      *slog.Logger

	// mu serialises creation and removal: address allocation reads the
	// addresses of both namespaces and must not race another link's.
	mu   sync.Mutex
	live map[string]*Link // by name
}

// NewLinks returns the link manager of an instance. Zero prefixes of pool
// take the defaults.
func NewLinks(instance string, pool Pool, log *slog.Logger) (*Links, error) {
	if instance == "" {
		return nil, errors.New("splice links: empty instance name")
	}
	p, err := pool.withDefaults()
	if err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &Links{instance: instance, pool: p, log: log, live: map[string]*Link{}}, nil
}

func (s *Links) alias() string { return aliasPrefix + s.instance }

// name is the interface name of the link between listen and out: unique
// per instance and pair, stable across restarts.
func (s *Links) name(listen, out netns.NS) string {
	h := sha256.Sum256([]byte(s.instance + "\x00" + listen.Path() + "\x00" + out.Path()))
	return NamePrefix + hex.EncodeToString(h[:])[:unix.IFNAMSIZ-1-len(NamePrefix)]
}

// Create builds the link between listen and out, or adopts the one a
// previous run of this instance left between them when both its ends and
// their addresses are as Create makes them (a link that is not is
// replaced). The two must be different namespaces (netns.NS.Same).
func (s *Links) Create(listen, out netns.NS) (*Link, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name := s.name(listen, out)
	if _, ok := s.live[name]; ok {
		return nil, fmt.Errorf("splice link %s between netns %s and %s already exists", name, listen, out)
	}
	l, err := s.adopt(listen, out, name)
	if err == nil {
		// A link a run without permanent neighbours made gets them.
		err = l.setNeighbours()
	}
	if err == nil {
		s.live[name] = l
		s.log.Info("splice link of a previous run adopted", "link", name, "listen_netns", listen.String(),
			"out_netns", out.String(), "listen_addr", l.Listen.Addr4, "out_addr", l.Out.Addr4)
		return l, nil
	}
	if !errors.Is(err, errNoLink) {
		s.log.Warn("splice link of a previous run cannot be adopted: recreating it", "link", name, "err", err)
		if err := s.remove(&Link{Name: name, Listen: End{NS: listen}, Out: End{NS: out}}); err != nil {
			return nil, err
		}
	}
	var inUse []netip.Prefix
	for _, ns := range []netns.NS{listen, out} {
		p, err := addressesIn(ns)
		if err != nil {
			return nil, err
		}
		inUse = append(inUse, p...)
	}
	slot, err := s.pool.free(inUse)
	if err != nil {
		return nil, fmt.Errorf("splice link between netns %s and %s: %w", listen, out, err)
	}
	ends := s.pool.ends(slot)

	outFD, err := openNS(out)
	if err != nil {
		return nil, fmt.Errorf("splice link %s: %w", name, err)
	}
	defer unix.Close(outFD)

	l = &Link{Name: name, Listen: End{NS: listen}, Out: End{NS: out}}
	err = listen.Do(func() error {
		attrs := netlink.NewLinkAttrs()
		attrs.Name = name
		attrs.Alias = s.alias()
		veth := &netlink.Veth{LinkAttrs: attrs, PeerName: name, PeerNamespace: netlink.NsFd(outFD)}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("create veth pair: %w", err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("splice link %s between netns %s and %s: %w", name, listen, out, err)
	}
	// From here on a failure removes the pair again; deleting either end
	// deletes both.
	if err := s.configure(&l.Listen, name, ends.Listen4, ends.Listen6); err != nil {
		s.remove(l)
		return nil, err
	}
	if err := s.configure(&l.Out, name, ends.Out4, ends.Out6); err != nil {
		s.remove(l)
		return nil, err
	}
	if err := l.setNeighbours(); err != nil {
		s.remove(l)
		return nil, err
	}
	s.live[name] = l
	s.log.Info("splice link created", "link", name, "listen_netns", listen.String(), "out_netns", out.String(),
		"listen_addr", l.Listen.Addr4, "out_addr", l.Out.Addr4, "listen_addr6", l.Listen.Addr6, "out_addr6", l.Out.Addr6)
	return l, nil
}

// configure sets the alias (the listen end has it from creation), the
// addresses and the up state of one end, and records its ifindex and MAC.
func (s *Links) configure(e *End, name string, addr4, addr6 netip.Prefix) error {
	err := e.NS.Do(func() error {
		lnk, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("find %s: %w", name, err)
		}
		if lnk.Attrs().Alias != s.alias() {
			if err := netlink.LinkSetAlias(lnk, s.alias()); err != nil {
				return fmt.Errorf("set alias of %s: %w", name, err)
			}
		}
		if err := netlink.AddrAdd(lnk, &netlink.Addr{IPNet: ipNet(addr4)}); err != nil {
			return fmt.Errorf("add %s to %s: %w", addr4, name, err)
		}
		e.Addr4 = addr4.Addr()
		// No duplicate address detection: the subnet has just these two
		// addresses, and a tentative address would refuse replies for
		// a second or two.
		err = netlink.AddrAdd(lnk, &netlink.Addr{IPNet: ipNet(addr6), Flags: unix.IFA_F_NODAD})
		switch {
		case err == nil:
			e.Addr6 = addr6.Addr()
		case errors.Is(err, unix.EACCES), errors.Is(err, unix.EPERM), errors.Is(err, unix.EAFNOSUPPORT):
			// IPv6 disabled in this namespace: IPv4 services can still use the link.
			s.log.Warn("splice link without IPv6", "link", name, "netns", e.NS.String(), "err", err)
		default:
			return fmt.Errorf("add %s to %s: %w", addr6, name, err)
		}
		if err := netlink.LinkSetUp(lnk); err != nil {
			return fmt.Errorf("bring %s up: %w", name, err)
		}
		e.Ifindex = lnk.Attrs().Index
		e.MAC = lnk.Attrs().HardwareAddr
		return nil
	})
	if err != nil {
		return fmt.Errorf("configure splice link end in netns %s: %w", e.NS, err)
	}
	return nil
}

// setNeighbours gives each end a permanent neighbour entry for the other
// end's addresses, so neither ever resolves its peer (ARP, IPv6 neighbour
// discovery): the link has only these two ends, and the tc program sends
// over it with fixed MACs anyway. The stack's packets over it are the
// node's replies in netns.out, which must not wait on a resolution: over
// IPv6 on a link that had just come up, resolving the listen end held the
// node's first SYN-ACK for about two seconds (seed 000's forms on tc,
// test/seed_test.go). Setting an entry that exists is no error, so an
// adopted link gets them too.
func (l *Link) setNeighbours() error {
	for _, e := range []struct{ at, peer *End }{{&l.Listen, &l.Out}, {&l.Out, &l.Listen}} {
		err := e.at.NS.Do(func() error {
			for _, addr := range []netip.Addr{e.peer.Addr4, e.peer.Addr6} {
				if !addr.IsValid() {
					continue
				}
				family := netlink.FAMILY_V4
				if addr.Is6() {
					family = netlink.FAMILY_V6
				}
				n := &netlink.Neigh{LinkIndex: e.at.Ifindex, Family: family, State: netlink.NUD_PERMANENT,
					IP: net.IP(addr.AsSlice()), HardwareAddr: e.peer.MAC}
				if err := netlink.NeighSet(n); err != nil {
					return fmt.Errorf("neighbour %s (%s) on %s: %w", addr, e.peer.MAC, l.Name, err)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("splice link end in netns %s: %w", e.at.NS, err)
		}
	}
	return nil
}

// Delete removes a link created by Create. A link whose namespace is gone
// went with it.
func (s *Links) Delete(l *Link) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.live, l.Name)
	if err := s.remove(l); err != nil {
		return err
	}
	s.log.Info("splice link removed", "link", l.Name, "listen_netns", l.Listen.NS.String(), "out_netns", l.Out.NS.String())
	return nil
}

// remove deletes the pair through its listen end, or through its out end
// when the listen namespace is gone (deleting a namespace normally takes
// its veth pairs with it, but the out end may outlive a failed creation).
func (s *Links) remove(l *Link) error {
	var errs []error
	for _, ns := range []netns.NS{l.Listen.NS, l.Out.NS} {
		err := ns.Do(func() error { return s.deleteOurs(l.Name) })
		if err == nil {
			return nil
		}
		if errors.Is(err, netns.ErrGone) {
			continue
		}
		errs = append(errs, fmt.Errorf("in netns %s: %w", ns, err))
	}
	if len(errs) == 0 {
		return nil // both namespaces are gone, and the link with them
	}
	return fmt.Errorf("delete splice link %s: %w", l.Name, errors.Join(errs...))
}

// deleteOurs deletes link name in the calling thread's namespace if it is
// one of ours (by alias).
func (s *Links) deleteOurs(name string) error {
	lnk, err := netlink.LinkByName(name)
	var notFound netlink.LinkNotFoundError
	if errors.As(err, &notFound) {
		return nil // already gone with its peer
	}
	if err != nil {
		return err
	}
	if lnk.Attrs().Alias != s.alias() {
		return fmt.Errorf("link %s has alias %q, not this instance's %q: refusing to delete it", name, lnk.Attrs().Alias, s.alias())
	}
	return netlink.LinkDel(lnk)
}

// RemoveUnused deletes the splice links of this instance in the given
// namespaces, and in those of the live links' ends, that no live link is:
// what a previous run left and this run does not need. A daemon calls it
// once every service is set up, after Create has adopted the links it
// needs again.
func (s *Links) RemoveUnused(nss ...netns.NS) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	var scan []netns.NS
	for _, l := range s.live {
		nss = append(nss, l.Listen.NS, l.Out.NS)
	}
	for _, ns := range nss {
		if !seen[ns.Path()] {
			seen[ns.Path()] = true
			scan = append(scan, ns)
		}
	}
	var errs []error
	for _, ns := range scan {
		if err := s.removeStale(ns); err != nil && !errors.Is(err, netns.ErrGone) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// removeStale deletes the splice links of this instance in ns that are not
// live in this process.
func (s *Links) removeStale(ns netns.NS) error {
	var removed []string
	err := ns.Do(func() error {
		links, err := netlink.LinkList()
		if err != nil {
			return err
		}
		for _, lnk := range links {
			a := lnk.Attrs()
			if a.Alias != s.alias() {
				continue
			}
			if _, ours := s.live[a.Name]; ours {
				continue
			}
			if err := netlink.LinkDel(lnk); err != nil {
				var notFound netlink.LinkNotFoundError
				if errors.As(err, &notFound) || errors.Is(err, unix.ENODEV) {
					continue // its peer's deletion took it meanwhile
				}
				return fmt.Errorf("delete %s: %w", a.Name, err)
			}
			removed = append(removed, a.Name)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("remove stale splice links in netns %s: %w", ns, err)
	}
	if len(removed) > 0 {
		s.log.Warn("removed splice links of a previous run that no service needs", "netns", ns.String(),
			"links", strings.Join(removed, ","))
	}
	return nil
}

// addressesIn lists the prefixes of every address in ns.
func addressesIn(ns netns.NS) ([]netip.Prefix, error) {
	var out []netip.Prefix
	err := ns.Do(func() error {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			bits, _ := a.Mask.Size()
			out = append(out, netip.PrefixFrom(ip.Unmap(), bits).Masked())
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list addresses in netns %s: %w", ns, err)
	}
	return out, nil
}

// openNS opens a file descriptor of ns: from a thread inside it, so the
// daemon's own namespace works like any other.
func openNS(ns netns.NS) (int, error) {
	fd := -1
	err := ns.Do(func() error {
		var err error
		fd, err = unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return -1, fmt.Errorf("open netns %s: %w", ns, err)
	}
	return fd, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
