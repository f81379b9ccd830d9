package tc

import (
	"fmt"
	"math/bits"
	"strconv"
	"strings"
)

// portSet is a set of TCP/UDP ports, as the kernel's port-list sysctls
// (ip_local_reserved_ports) hold them. Reservations are merged and undone
// as sets, so that what the operator reserved, before or while ebpfwd
// runs, is never taken away with ebpfwd's own ports.
type portSet [65536 / 64]uint64

// parsePortList reads the sysctl's format: comma-separated ports and
// inclusive ranges ("1024-32767,40000"); "" is the empty set.
func parsePortList(s string) (portSet, error) {
	var set portSet
	s = strings.TrimSpace(s)
	if s == "" {
		return set, nil
	}
	for _, item := range strings.Split(s, ",") {
		loS, hiS, isRange := strings.Cut(strings.TrimSpace(item), "-")
		lo, err := strconv.ParseUint(loS, 10, 16)
		if err != nil {
			return set, fmt.Errorf("port list %q: %q is not a port", s, loS)
		}
		hi := lo
		if isRange {
			if hi, err = strconv.ParseUint(hiS, 10, 16); err != nil {
				return set, fmt.Errorf("port list %q: %q is not a port", s, hiS)
			}
		}
		if lo > hi {
			return set, fmt.Errorf("port list %q: range %s runs backwards", s, item)
		}
		set.addRange(uint16(lo), uint16(hi))
	}
	return set, nil
}

// portRangeSet is the set of ports lo-hi, inclusive.
func portRangeSet(lo, hi uint16) portSet {
	var set portSet
	set.addRange(lo, hi)
	return set
}

func (s *portSet) addRange(lo, hi uint16) {
	for p := uint32(lo); p <= uint32(hi); p++ {
		s[p/64] |= 1 << (p % 64)
	}
}

func (s *portSet) has(p uint16) bool { return s[p/64]&(1<<(p%64)) != 0 }

func (s portSet) union(o portSet) portSet {
	for i := range s {
		s[i] |= o[i]
	}
	return s
}

func (s portSet) minus(o portSet) portSet {
	for i := range s {
		s[i] &^= o[i]
	}
	return s
}

func (s portSet) intersect(o portSet) portSet {
	for i := range s {
		s[i] &= o[i]
	}
	return s
}

func (s portSet) len() int {
	n := 0
	for _, w := range s {
		n += bits.OnesCount64(w)
	}
	return n
}

// String writes the set as the kernel does: ascending, ranges joined by
// commas, a lone port without a dash.
func (s portSet) String() string {
	var parts []string
	for p := 0; p < 65536; p++ {
		if !s.has(uint16(p)) {
			continue
		}
		lo := p
		for p+1 < 65536 && s.has(uint16(p+1)) {
			p++
		}
		if lo == p {
			parts = append(parts, strconv.Itoa(lo))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", lo, p))
		}
	}
	return strings.Join(parts, ",")
}
