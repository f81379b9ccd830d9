package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ebpfwd/ebpfwd/netns"
)

// addrRole says what an address is used for, which decides what its host
// part may be.
type addrRole int

const (
	// listenAddr is bound: the host must be empty (all addresses) or an IP
	// literal, because a name could resolve differently inside the
	// namespace the service listens in.
	listenAddr addrRole = iota
	// dialAddr is connected to: the host may also be a hostname, and empty
	// means the local host.
	dialAddr
)

// addr decodes a host:port value. Bare numbers are rejected with a hint,
// because `addr: 8080` is a common slip for `addr: ":8080"`.
func (d *decoder) addr(f field, role addrRole) (string, netip.AddrPort, bool) {
	n := f.value
	if n.Kind == yaml.ScalarNode && (n.ShortTag() == "!!int" || n.ShortTag() == "!!float") {
		d.errorf(f.pos(), f.path, "must be host:port (for example \":%s\"), not a number", n.Value)
		return "", netip.AddrPort{}, false
	}
	s, ok := d.str(f)
	if !ok {
		return "", netip.AddrPort{}, false
	}
	if err := checkAddr(s, role); err != nil {
		d.errorf(f.pos(), f.path, "%v", err)
		return "", netip.AddrPort{}, false
	}
	// An IP-literal host gives the address as a value too; a name or an
	// empty host does not (the zero AddrPort).
	ip, _ := netip.ParseAddrPort(s)
	return s, ip, true
}

// checkAddr validates a host:port address for role.
func checkAddr(addr string, role addrRole) error {
	if addr == "" {
		return errors.New("must not be empty (host:port)")
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		var addrErr *net.AddrError
		if errors.As(err, &addrErr) {
			msg := fmt.Sprintf("%s %q", addrErr.Err, addrErr.Addr)
			if addrErr.Err == "too many colons in address" {
				msg += " (IPv6 addresses need brackets, e.g. \"[::1]:8000\")"
			}
			return errors.New(msg)
		}
		return fmt.Errorf("invalid address %q: %w", addr, err)
	}
	if err := checkPort(port); err != nil {
		return fmt.Errorf("%w in address %q", err, addr)
	}
	if host == "" {
		return nil
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return nil
	}
	if role == listenAddr {
		return fmt.Errorf("listen host %q in address %q must be empty or an IP address", host, addr)
	}
	if err := checkHostname(host); err != nil {
		return fmt.Errorf("%w in address %q", err, addr)
	}
	return nil
}

func checkPort(port string) error {
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return fmt.Errorf("port %q must be a number from 1 to 65535", port)
	}
	return nil
}

// checkHostname accepts DNS names (RFC 1123 labels, plus '_' which resolvers
// accept in practice).
func checkHostname(host string) error {
	name := strings.TrimSuffix(host, ".")
	if name == "" || len(name) > 253 {
		return fmt.Errorf("invalid host name %q", host)
	}
	allNumeric := true
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("invalid host name %q", host)
		}
		for _, c := range label {
			switch {
			case c >= '0' && c <= '9':
			case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c == '-', c == '_':
				allNumeric = false
			default:
				return fmt.Errorf("invalid host name %q", host)
			}
		}
	}
	// "10.0.0.256" is neither an IP nor a name anyone means.
	if allNumeric {
		return fmt.Errorf("invalid IP address %q", host)
	}
	return nil
}

// netns decodes a network namespace reference: a name as `ip netns` shows it
// (a file under /run/netns) or an absolute path such as /proc/1/ns/net,
// checked by the one parser of namespace specs (netns.Parse). Names must be
// YAML strings: `netns: 1` is rejected rather than guessed.
func (d *decoder) netns(f field) (netns.NS, bool) {
	n := f.value
	if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!str" || n.Value == "" {
		d.errorf(f.pos(), f.path, "must be a non-empty string naming a network namespace, not %s (quote names that look like numbers)", describe(n))
		return netns.NS{}, false
	}
	ns, err := netns.Parse(n.Value)
	if err != nil {
		d.errorf(f.pos(), f.path, "%v", err)
		return netns.NS{}, false
	}
	return ns, true
}

// duration decodes a duration the way GOST's metadata helpers do: a Go
// duration string ("10s", "1m30s"), or an integer number of seconds written
// as a number or a string. Negative durations are rejected.
func (d *decoder) duration(f field) (time.Duration, bool) {
	n := f.value
	bad := func() (time.Duration, bool) {
		d.errorf(f.pos(), f.path, "invalid duration %s (use a duration such as \"10s\" or \"1m30s\", or a whole number of seconds)", quoteValue(n))
		return 0, false
	}
	if n.Kind != yaml.ScalarNode {
		return bad()
	}
	var dur time.Duration
	switch n.ShortTag() {
	case "!!int":
		var secs int64
		if err := n.Decode(&secs); err != nil {
			return bad()
		}
		v, ok := secondsToDuration(secs)
		if !ok {
			return bad()
		}
		dur = v
	case "!!str":
		if v, err := time.ParseDuration(n.Value); err == nil {
			dur = v
		} else if secs, err := strconv.ParseInt(n.Value, 10, 64); err == nil {
			v, ok := secondsToDuration(secs)
			if !ok {
				return bad()
			}
			dur = v
		} else {
			return bad()
		}
	default:
		return bad()
	}
	if dur < 0 {
		d.errorf(f.pos(), f.path, "duration %s must not be negative", quoteValue(n))
		return 0, false
	}
	return dur, true
}

func secondsToDuration(secs int64) (time.Duration, bool) {
	if secs > math.MaxInt64/int64(time.Second) || secs < math.MinInt64/int64(time.Second) {
		return 0, false
	}
	return time.Duration(secs) * time.Second, true
}

// integer decodes a whole number. Digit strings are accepted too, as GOST's
// loader converts them.
func (d *decoder) integer(f field) (int, bool) {
	n := f.value
	if n.Kind == yaml.ScalarNode {
		var v int
		switch n.ShortTag() {
		case "!!int":
			if err := n.Decode(&v); err == nil {
				return v, true
			}
		case "!!str":
			if parsed, err := strconv.Atoi(n.Value); err == nil {
				return parsed, true
			}
		}
	}
	d.errorf(f.pos(), f.path, "must be a whole number, not %s", quoteValue(n))
	return 0, false
}

// quoteValue shows a scalar's text for messages, or its kind otherwise.
func quoteValue(n *yaml.Node) string {
	if n.Kind == yaml.ScalarNode && !isNull(n) {
		return strconv.Quote(n.Value)
	}
	return describe(n)
}

// boolean decodes a flag the way GOST's metadata helper reads one: a YAML
// boolean, a string strconv.ParseBool accepts ("true", "1", "false"...), or
// the number 0 or 1.
func (d *decoder) boolean(f field) (bool, bool) {
	n := f.value
	if n.Kind == yaml.ScalarNode {
		switch n.ShortTag() {
		case "!!bool":
			var v bool
			if err := n.Decode(&v); err == nil {
				return v, true
			}
		case "!!int", "!!str":
			if v, err := strconv.ParseBool(n.Value); err == nil {
				return v, true
			}
		}
	}
	d.errorf(f.pos(), f.path, "must be true or false, not %s", quoteValue(n))
	return false, false
}

// proxyVersion decodes a PROXY protocol version: 1 or 2, or 0 for none.
func (d *decoder) proxyVersion(f field) (int, bool) {
	v, ok := d.integer(f)
	if !ok {
		return 0, false
	}
	if v < 0 || v > 2 {
		d.errorf(f.pos(), f.path, "PROXY protocol version %d: must be 1 or 2 (0 for none)", v)
		return 0, false
	}
	return v, true
}

// maxUDPPayload is the largest UDP payload (65535 less the 8-byte header).
const maxUDPPayload = 65535 - 8

// bufferSize decodes a datagram buffer size in bytes: 0 means whole
// datagrams; more than the largest UDP payload cuts nothing and is the
// same as 0.
func (d *decoder) bufferSize(f field) (int, bool) {
	v, ok := d.integer(f)
	if !ok {
		return 0, false
	}
	if v < 0 {
		d.errorf(f.pos(), f.path, "buffer size %d must not be negative", v)
		return 0, false
	}
	if v >= maxUDPPayload {
		v = 0
	}
	return v, true
}

// firstOf returns the field of the first key of keys that was given, for a
// GOST key with a second spelling; giving both is an error at the second.
func (d *decoder) firstOf(known fields, keys ...string) (field, bool) {
	var got field
	found := false
	for _, k := range keys {
		f, ok := known[k]
		if !ok {
			continue
		}
		if found {
			d.errorf(f.key, f.path, "%s is another spelling of %s, given at line %d: give one", k, keys[0], got.key.Line)
			continue
		}
		got, found = f, true
	}
	return got, found
}
