package netns

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Listen creates a stream listener inside the namespace, like
// net.ListenConfig.Listen. A host name in addr is resolved inside the
// namespace and the listener binds its first IPv4 address, or its first
// address when it has no IPv4 one, as the net package does.
func (n NS) Listen(ctx context.Context, network, addr string) (net.Listener, error) {
	bindAddr, err := n.bindAddr(ctx, network, addr)
	if err != nil {
		return nil, &opError{op: "listen", network: network, addr: addr, ns: n, err: err}
	}
	var ln net.Listener
	err = n.Do(func() error {
		lc := streamListenConfig
		var err error
		ln, err = lc.Listen(ctx, network, bindAddr)
		return err
	})
	if err != nil {
		return nil, &opError{op: "listen", network: network, addr: bindAddr, ns: n, err: err}
	}
	return ln, nil
}

// The keep-alive the net package gives every accepted TCP connection (Go's
// defaults: probes after 15 s idle, every 15 s, 9 of them), set once on the
// listening socket instead: the kernel copies a listener's keep-alive
// settings into every connection it accepts, which spares four
// setsockopt(2) calls per connection.
const (
	keepAliveIdle     = 15 // seconds
	keepAliveInterval = 15 // seconds
	keepAliveCount    = 9
)

var streamListenConfig = net.ListenConfig{
	KeepAlive: -1, // the net package leaves accepted sockets as the kernel made them
	Control: func(network, _ string, c syscall.RawConn) error {
		if !strings.HasPrefix(network, "tcp") {
			return nil
		}
		var err error
		cerr := c.Control(func(fd uintptr) {
			for _, o := range []struct{ level, opt, value int }{
				{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
				{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
				{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
				{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
			} {
				if err = unix.SetsockoptInt(int(fd), o.level, o.opt, o.value); err != nil {
					err = os.NewSyscallError("setsockopt", err)
					return
				}
			}
		})
		return cmp.Or(cerr, err)
	},
}

// ListenPacket creates a packet socket inside the namespace, like
// net.ListenConfig.ListenPacket; addr is handled as in Listen.
func (n NS) ListenPacket(ctx context.Context, network, addr string) (net.PacketConn, error) {
	bindAddr, err := n.bindAddr(ctx, network, addr)
	if err != nil {
		return nil, &opError{op: "listen", network: network, addr: addr, ns: n, err: err}
	}
	var pc net.PacketConn
	err = n.Do(func() error {
		var lc net.ListenConfig
		var err error
		pc, err = lc.ListenPacket(ctx, network, bindAddr)
		return err
	})
	if err != nil {
		return nil, &opError{op: "listen", network: network, addr: bindAddr, ns: n, err: err}
	}
	return pc, nil
}

// Dial connects to addr from inside the namespace. A host name is resolved
// inside the namespace (see Resolve) and its addresses are tried one at a
// time, in the order the resolver returned them, each with a fair share of
// the time left until ctx's deadline. The first connection that succeeds is
// returned; when all fail, the error names every address tried.
func (n NS) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || !isInternet(network) || host == "" || isIPLiteral(host) {
		// Nothing to resolve: the net package reports malformed
		// addresses itself.
		conn, err := n.dialOne(ctx, network, addr)
		if err != nil {
			return nil, &opError{op: "dial", network: network, addr: addr, ns: n, err: err}
		}
		return conn, nil
	}
	addrs, err := n.Resolve(ctx, host)
	if err != nil {
		return nil, &opError{op: "dial", network: network, addr: addr, ns: n, err: err}
	}
	addrs = filterFamily(network, addrs)
	if len(addrs) == 0 {
		return nil, &opError{op: "dial", network: network, addr: addr, ns: n,
			err: fmt.Errorf("no address of %s suits network %s", host, network)}
	}
	var failed attemptsError
	for i, ip := range addrs {
		target := net.JoinHostPort(ip.String(), port)
		conn, err := n.dialShare(ctx, network, target, len(addrs)-i)
		if err == nil {
			return conn, nil
		}
		failed = append(failed, attempt{addr: target, err: err})
		if ctx.Err() != nil || errors.Is(err, ErrGone) {
			break // the remaining addresses cannot fare better
		}
	}
	return nil, &opError{op: "dial", network: network, addr: addr, ns: n, err: failed}
}

// dialShare dials one of several candidate addresses, giving it its share of
// the time left.
func (n NS) dialShare(ctx context.Context, network, addr string, remaining int) (net.Conn, error) {
	if deadline, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, partialDeadline(time.Now(), deadline, remaining))
		defer cancel()
	}
	return n.dialOne(ctx, network, addr)
}

// bindAddr resolves the host part of a listen address inside the namespace.
func (n NS) bindAddr(ctx context.Context, network, addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || !isInternet(network) || host == "" || isIPLiteral(host) {
		return addr, nil
	}
	addrs, err := n.Resolve(ctx, host)
	if err != nil {
		return "", err
	}
	addrs = filterFamily(network, addrs)
	if len(addrs) == 0 {
		return "", fmt.Errorf("no address of %s suits network %s", host, network)
	}
	pick := addrs[0]
	for _, a := range addrs {
		if a.Is4() {
			pick = a
			break
		}
	}
	return net.JoinHostPort(pick.String(), port), nil
}

// partialDeadline returns the deadline for one of remaining dial attempts
// that must all finish by deadline: an equal share of the time left, but at
// least a couple of seconds (or all of it, if less is left) so that one
// attempt is not starved by a long address list. The net package splits its
// dial deadlines the same way.
func partialDeadline(now, deadline time.Time, remaining int) time.Time {
	const saneMinimum = 2 * time.Second
	left := deadline.Sub(now)
	if left <= 0 || remaining <= 1 {
		return deadline
	}
	share := left / time.Duration(remaining)
	if share < saneMinimum {
		share = min(saneMinimum, left)
	}
	return now.Add(share)
}

// isInternet reports whether network takes "host:port" addresses.
func isInternet(network string) bool {
	switch network {
	case "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		return true
	}
	return false
}

func isIPLiteral(host string) bool {
	_, err := netip.ParseAddr(host)
	return err == nil
}

// filterFamily keeps the addresses network can use: IPv4 for tcp4/udp4,
// IPv6 for tcp6/udp6, everything otherwise.
func filterFamily(network string, addrs []netip.Addr) []netip.Addr {
	var keep func(netip.Addr) bool
	switch network[len(network)-1] {
	case '4':
		keep = func(a netip.Addr) bool { return a.Unmap().Is4() }
	case '6':
		keep = func(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }
	default:
		return addrs
	}
	var out []netip.Addr
	for _, a := range addrs {
		if keep(a) {
			out = append(out, a)
		}
	}
	return out
}

// opError reports an operation done in a namespace:
// "dial tcp 10.0.1.11:8000 in netns ns2: connect: connection refused".
type opError struct {
	op      string // dial, listen, lookup
	network string // may be empty
	addr    string
	ns      NS
	err     error
}

func (e *opError) Error() string {
	return e.what() + " in netns " + e.ns.String() + ": " + causeText(e.err)
}

func (e *opError) Unwrap() error { return e.err }

// what is the operation without its namespace: "dial tcp 10.0.1.11:8000".
func (e *opError) what() string {
	parts := []string{e.op}
	if e.network != "" {
		parts = append(parts, e.network)
	}
	if e.addr != "" {
		parts = append(parts, e.addr)
	}
	return strings.Join(parts, " ")
}

// attempt is one address Dial tried.
type attempt struct {
	addr string
	err  error
}

// attemptsError lists every address a Dial tried and why each failed.
type attemptsError []attempt

func (e attemptsError) Error() string {
	parts := make([]string, len(e))
	for i, a := range e {
		parts[i] = a.addr + ": " + causeText(a.err)
	}
	return strings.Join(parts, "; ")
}

func (e attemptsError) Unwrap() []error {
	errs := make([]error, len(e))
	for i, a := range e {
		errs[i] = a.err
	}
	return errs
}

// causeText renders err without repeating what the enclosing opError
// already says (operation, address, namespace).
func causeText(err error) string {
	switch e := err.(type) {
	case *opError:
		return e.what() + ": " + causeText(e.err)
	case *nsError:
		return e.err.Error()
	case *net.OpError:
		if e.Err != nil {
			return e.Err.Error()
		}
	case *net.DNSError:
		// The server a DNSError names is the one Go picked from
		// /etc/resolv.conf, not necessarily the one asked.
		return e.Err
	}
	return err.Error()
}
