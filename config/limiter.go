package config

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/alecthomas/units"
)

// GOST's limiters, with GOST's syntax and meaning (gost.run, concepts/limiter):
//
//   - limiters (bandwidth): lines "SCOPE IN [OUT [BURST]]", rates per second
//     with base-2 units (B, KB, MB, GB, TB; KiB... too). IN is what the
//     service receives from its client (client -> node), OUT what it sends
//     to it (node -> client). SCOPE "$" is the whole service, "$$" each
//     connection, an IP or CIDR each client address it contains.
//   - climiters (concurrent connections) and rlimiters (new connections per
//     second): lines "SCOPE N", where "$" is the whole service, "$$" each
//     client IP without a line of its own, an IP that one client, a CIDR
//     each client address it contains.
//
// A zero or negative rate means unlimited, as in GOST.

// LimiterKind says what a limiter bounds.
type LimiterKind int

const (
	TrafficLimiter LimiterKind = iota // bytes per second: limiters
	ConnLimiter                       // concurrent connections: climiters
	RateLimiter                       // new connections per second: rlimiters
)

// Key is the service key that refers to a limiter of the kind (and the
// singular of its section).
func (k LimiterKind) Key() string {
	return [...]string{"limiter", "climiter", "rlimiter"}[k]
}

// Section names the top-level section a kind is written in.
func (k LimiterKind) Section() string {
	return [...]string{"limiters", "climiters", "rlimiters"}[k]
}

// Describe is what the kind bounds, for messages.
func (k LimiterKind) Describe() string {
	return [...]string{"bandwidth", "concurrent connections", "new connections per second"}[k]
}

// LimitScope is who one limit line applies to.
type LimitScope int

const (
	// ScopeService ("$"): the whole service together.
	ScopeService LimitScope = iota
	// ScopeEach ("$$"): each connection (bandwidth) or each client IP
	// that no IP or CIDR line names (connections, rate).
	ScopeEach
	// ScopePrefix: each client address within Prefix (an IP is a
	// single-address prefix); the longest prefix that contains a client
	// applies.
	ScopePrefix
)

// Limiter is one entry of limiters, climiters or rlimiters.
type Limiter struct {
	Name  string
	Kind  LimiterKind
	Rules []LimitRule
	Pos   Pos
}

// LimitRule is one line of a limiter's limits.
type LimitRule struct {
	Scope  LimitScope
	Prefix netip.Prefix // ScopePrefix only
	// Bandwidth (bytes per second; 0 unlimited) and the bucket's burst
	// (0: the daemon's default).
	In, Out, Burst int64
	// N is the connection count (climiters) or the rate per second
	// (rlimiters).
	N   float64
	Pos Pos
}

// Limits are the limiters a service uses, resolved (nil: none of that kind).
type Limits struct {
	Traffic, Conns, Rate *Limiter
}

// set makes l the service's limiter of kind.
func (ls *Limits) set(kind LimiterKind, l *Limiter) {
	switch kind {
	case TrafficLimiter:
		ls.Traffic = l
	case ConnLimiter:
		ls.Conns = l
	case RateLimiter:
		ls.Rate = l
	}
}

// Any reports whether the service has any limiter.
func (l Limits) Any() bool { return l.Traffic != nil || l.Conns != nil || l.Rate != nil }

// Names lists the limiters in use as "climiter NAME (concurrent connections)".
func (l Limits) Names() []string {
	var out []string
	for _, lim := range []*Limiter{l.Traffic, l.Conns, l.Rate} {
		if lim != nil {
			out = append(out, fmt.Sprintf("%s %s (%s)", lim.Kind.Key(), lim.Name, lim.Kind.Describe()))
		}
	}
	return out
}

var limiterSection = section{
	keys: []string{"name", "limits"},
	// GOST's other data sources: refused, since ebpfwd reads only inline
	// limits and a limit that silently does not load would not exist.
	unsupported: []string{"plugin", "file", "redis", "http", "reload"},
}

// limiters decodes one of the three top-level limiter sections.
func (d *decoder) limiters(f field, kind LimiterKind) map[string]*Limiter {
	byName := map[string]*Limiter{}
	list := decodeUnique(d, f, kind.Key(), func(item field, i int) (*Limiter, string) {
		fs, ok := d.fieldMapping(item, &limiterSection)
		if !ok {
			return nil, ""
		}
		l := &Limiter{Kind: kind, Pos: posOf(item.value)}
		nf, hasName := fs["name"]
		if hasName {
			l.Name, _ = d.name(nf)
		}
		if l.Name == "" {
			d.errorf(item.value, join(item.path, "name"), "is required: services refer to %s by name", kind.Section())
			return nil, ""
		}
		lf, ok := fs["limits"]
		if !ok {
			d.errorf(item.value, join(item.path, "limits"), "is required: the limit lines (e.g. %q)", exampleLimit(kind))
			return l, l.Name
		}
		for _, line := range d.sequence(lf) {
			s, ok := d.str(line)
			if !ok {
				continue
			}
			if r, err := parseLimitLine(s, kind); err != nil {
				d.errorf(line.value, line.path, "%v (e.g. %q)", err, exampleLimit(kind))
			} else if r != nil {
				r.Pos = posOf(line.value)
				l.Rules = append(l.Rules, *r)
			}
		}
		return l, l.Name
	})
	for _, l := range list {
		byName[l.Name] = l
	}
	return byName
}

func exampleLimit(kind LimiterKind) string {
	return [...]string{"$ 100MB 100MB", "$ 1000", "$ 100"}[kind]
}

// parseLimitLine parses one limit line; nil (no error) for a line that
// limits nothing (a zero or negative rate, which GOST reads as unlimited).
func parseLimitLine(s string, kind LimiterKind) (*LimitRule, error) {
	parts := strings.Fields(s)
	want := "SCOPE N"
	if kind == TrafficLimiter {
		want = "SCOPE IN [OUT [BURST]]"
	}
	if len(parts) < 2 || (kind != TrafficLimiter && len(parts) > 2) || len(parts) > 4 {
		return nil, fmt.Errorf("limit line %q must read %s", s, want)
	}
	r := &LimitRule{}
	switch parts[0] {
	case "$":
		r.Scope = ScopeService
	case "$$":
		r.Scope = ScopeEach
	default:
		p, err := parseScopePrefix(parts[0])
		if err != nil {
			return nil, fmt.Errorf("scope %q is not $, $$, an IP address or a CIDR", parts[0])
		}
		r.Scope, r.Prefix = ScopePrefix, p
	}
	if kind == TrafficLimiter {
		vals := make([]int64, 3)
		for i, p := range parts[1:] {
			v, err := units.ParseBase2Bytes(p)
			if err != nil {
				return nil, fmt.Errorf("%q is not a byte rate (a number with B, KB, MB, GB or TB)", p)
			}
			vals[i] = max(int64(v), 0)
		}
		r.In, r.Out, r.Burst = vals[0], vals[1], vals[2]
		if r.In == 0 && r.Out == 0 {
			return nil, nil
		}
		return r, nil
	}
	n, err := strconv.ParseFloat(parts[1], 64)
	if err != nil || math.IsNaN(n) || math.IsInf(n, 0) {
		return nil, fmt.Errorf("%q is not a number", parts[1])
	}
	if kind == ConnLimiter && n != math.Trunc(n) {
		return nil, fmt.Errorf("%q is not a whole number of connections", parts[1])
	}
	if n <= 0 {
		return nil, nil
	}
	r.N = n
	return r, nil
}

func parseScopePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		return p.Masked(), err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// serviceLimiter resolves a service's reference (limiter, climiter,
// rlimiter) to a limiter of kind.
func (d *decoder) serviceLimiter(f field, kind LimiterKind, byName map[string]*Limiter) *Limiter {
	name, ok := d.str(f)
	if !ok || name == "" {
		return nil
	}
	if l, ok := byName[name]; ok {
		return l
	}
	d.errorf(f.pos(), f.path, "no %s entry named %q%s", kind.Section(), name, suggestion(name, slices.Sorted(maps.Keys(byName))))
	return nil
}

// GOST's command line writes limits as service options (-L
// "...?climiter=10&limiter.in=1MB"), which GOST turns into a limiter of
// the service; ebpfwd reads the same keys in service metadata, so the
// command line's YAML (-O yaml) and a hand-written file mean the same.
var limiterMetadataKeys = []string{"limiter.in", "limiter.out", "limiter.conn.in", "limiter.conn.out", "climiter", "rlimiter"}

// metadataLimits builds the limiters a service's metadata asks for and
// sets them on svc, unless a named limiter of the same kind is set too.
func (d *decoder) metadataLimits(svc *Service, known fields) {
	var traffic []string
	var at *field // where the bandwidth limit was asked for
	for _, p := range []struct{ scope, in, out string }{
		{"$", "limiter.in", "limiter.out"}, {"$$", "limiter.conn.in", "limiter.conn.out"},
	} {
		in, inAt := d.metadataString(known, p.in)
		out, outAt := d.metadataString(known, p.out)
		if in == "" && out == "" {
			continue
		}
		traffic = append(traffic, strings.TrimSpace(p.scope+" "+orZero(in)+" "+out))
		at = cmp.Or(at, inAt, outAt)
	}
	if len(traffic) > 0 {
		svc.Limits.Traffic = d.metadataLimiter(svc, at, TrafficLimiter, traffic, svc.Limits.Traffic)
	}
	if n, f := d.metadataString(known, "climiter"); n != "" {
		svc.Limits.Conns = d.metadataLimiter(svc, f, ConnLimiter, []string{"$ " + n}, svc.Limits.Conns)
	}
	if n, f := d.metadataString(known, "rlimiter"); n != "" {
		svc.Limits.Rate = d.metadataLimiter(svc, f, RateLimiter, []string{"$ " + n}, svc.Limits.Rate)
	}
}

// metadataString is known[key] as a string, and the field ("", nil when
// absent).
func (d *decoder) metadataString(known fields, key string) (string, *field) {
	f, ok := known[key]
	if !ok {
		return "", nil
	}
	s, _ := d.str(f)
	return s, &f
}

// orZero writes an unset rate as 0 (unlimited) so the line keeps its shape.
func orZero(s string) string {
	if s == "" {
		return "0"
	}
	return s
}

// metadataLimiter makes the limiter of one metadata form, reported at f.
func (d *decoder) metadataLimiter(svc *Service, f *field, kind LimiterKind, lines []string, named *Limiter) *Limiter {
	if named != nil {
		d.errorf(f.pos(), f.path, "conflicts with the service's %s %q; set the limit once", kind.Key(), named.Name)
		return named
	}
	l := &Limiter{Name: svc.Name + "-" + kind.Key(), Kind: kind, Pos: posOf(f.value)}
	for _, s := range lines {
		r, err := parseLimitLine(s, kind)
		if err != nil {
			d.errorf(f.pos(), f.path, "%v", err)
			return nil
		}
		if r != nil {
			r.Pos = posOf(f.value)
			l.Rules = append(l.Rules, *r)
		}
	}
	if len(l.Rules) == 0 {
		return nil
	}
	return l
}
