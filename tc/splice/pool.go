package splice

import (
	"errors"
	"fmt"
	"math/big"
	"net/netip"
)

// Default address pools of splice links.
//
// IPv4: 169.254.200.0/24, IPv4 link-local space (RFC 3927) that no DHCP
// server hands out and no router forwards, carved into /30s: 64 links per
// namespace.
//
// IPv6: fd65:6270:6677::/64, a unique local prefix (RFC 4193; the global ID
// spells "ebpfw"), carved into /126s. Link-local fe80::/64 addresses would
// need a zone (the interface) to be routed back to, which a node's reply
// leaving a namespace that forwards it does not carry; a ULA is routed like
// any other address and never leaves the site.
var (
	DefaultPool4 = netip.MustParsePrefix("169.254.200.0/24")
	DefaultPool6 = netip.MustParsePrefix("fd65:6270:6677::/64")
)

// subnetBits are the sizes of one link's subnet: four addresses, of which
// the first usable two (.1, .2 / ::1, ::2) are the ends.
const (
	subnetBits4 = 30
	subnetBits6 = 126
	// maxSlots bounds the search for a free subnet; no namespace has
	// anywhere near this many splice links.
	maxSlots = 1 << 16
)

// Pool is where splice link addresses come from. Slot i of the pool is the
// i-th /30 of V4 together with the i-th /126 of V6.
type Pool struct {
	V4, V6 netip.Prefix
}

// Check reports whether p can be used (unset prefixes take the defaults),
// so that a bad pool is refused at start, naming the prefix.
func (p Pool) Check() error {
	_, err := p.withDefaults()
	return err
}

// withDefaults fills unset prefixes and checks the rest.
func (p Pool) withDefaults() (Pool, error) {
	if !p.V4.IsValid() {
		p.V4 = DefaultPool4
	}
	if !p.V6.IsValid() {
		p.V6 = DefaultPool6
	}
	p.V4, p.V6 = p.V4.Masked(), p.V6.Masked()
	if !p.V4.Addr().Is4() || p.V4.Bits() > subnetBits4 {
		return p, fmt.Errorf("splice pool %s: want an IPv4 prefix of /%d or larger", p.V4, subnetBits4)
	}
	if !p.V6.Addr().Is6() || p.V6.Addr().Is4In6() || p.V6.Bits() > subnetBits6 {
		return p, fmt.Errorf("splice pool %s: want an IPv6 prefix of /%d or larger", p.V6, subnetBits6)
	}
	return p, nil
}

// slots is how many links the pool holds: the smaller of its two halves.
func (p Pool) slots() int {
	n := maxSlots
	for _, free := range []int{subnetBits4 - p.V4.Bits(), subnetBits6 - p.V6.Bits()} {
		if free < 16 && 1<<free < n {
			n = 1 << free
		}
	}
	return n
}

// slot returns the subnets of slot i.
func (p Pool) slot(i int) (v4, v6 netip.Prefix) {
	off := uint64(i) << 2 // four addresses per subnet
	return netip.PrefixFrom(addOffset(p.V4.Addr(), off), subnetBits4),
		netip.PrefixFrom(addOffset(p.V6.Addr(), off), subnetBits6)
}

// Ends are the addresses of a link's two ends in one slot.
type Ends struct {
	Listen4, Out4 netip.Prefix
	Listen6, Out6 netip.Prefix
}

func (p Pool) ends(i int) Ends {
	v4, v6 := p.slot(i)
	return Ends{
		Listen4: netip.PrefixFrom(addOffset(v4.Addr(), 1), subnetBits4),
		Out4:    netip.PrefixFrom(addOffset(v4.Addr(), 2), subnetBits4),
		Listen6: netip.PrefixFrom(addOffset(v6.Addr(), 1), subnetBits6),
		Out6:    netip.PrefixFrom(addOffset(v6.Addr(), 2), subnetBits6),
	}
}

var errPoolExhausted = errors.New("no free subnet left in the splice address pool")

// free returns the first slot whose subnets overlap none of inUse (the
// prefixes of every address in both namespaces). Overlap, not just
// containment: an address such as 169.254.1.1/16 makes every /30 inside it
// ambiguous to route.
func (p Pool) free(inUse []netip.Prefix) (int, error) {
	for i := range p.slots() {
		v4, v6 := p.slot(i)
		taken := false
		for _, u := range inUse {
			if u.Overlaps(v4) || u.Overlaps(v6) {
				taken = true
				break
			}
		}
		if !taken {
			return i, nil
		}
	}
	return 0, fmt.Errorf("%w (%s, %s)", errPoolExhausted, p.V4, p.V6)
}

// addOffset returns a + n, for offsets that stay inside a's prefix.
func addOffset(a netip.Addr, n uint64) netip.Addr {
	sum := new(big.Int).SetBytes(a.AsSlice())
	sum.Add(sum, new(big.Int).SetUint64(n))
	b := sum.FillBytes(make([]byte, len(a.AsSlice())))
	out, _ := netip.AddrFromSlice(b)
	return out
}
