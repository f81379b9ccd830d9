package netns

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// dialOne dials an address that needs no resolution. In the daemon's own
// namespace the net package dials. Elsewhere only socket(2) happens inside
// the namespace, on its maker; connect(2) and the wait for it happen here,
// on Go's netpoller, so a pending dial holds no OS thread (see the package
// documentation).
func (n NS) dialOne(ctx context.Context, network, addr string) (net.Conn, error) {
	if n.IsOwn() {
		// The net package's dialer makes fewer syscalls than connect's
		// socket-then-FileConn, which has to duplicate the descriptor;
		// connectFirst spares it the scheduler's hand-off.
		d := net.Dialer{ControlContext: connectFirst} // zero KeepAlive: the net package's default keep-alive
		return d.DialContext(ctx, network, addr)
	}
	t, ok := n.dialTarget(ctx, network, addr)
	if !ok {
		return n.dialInDo(ctx, network, addr)
	}
	return n.connect(ctx, t)
}

// dialInDo runs the whole net.Dialer inside the namespace. It serves only
// what dialTarget leaves to the net package: networks other than TCP and
// UDP, addresses it rejects, and an empty host (the local system). None of
// them waits for a remote peer, so the locked thread is not held for long.
func (n NS) dialInDo(ctx context.Context, network, addr string) (net.Conn, error) {
	var conn net.Conn
	err := n.Do(func() error {
		var d net.Dialer // zero KeepAlive: the net package's default keep-alive
		var err error
		conn, err = d.DialContext(ctx, network, addr)
		return err
	})
	return conn, err
}

// target is a parsed dial address with the socket it needs.
type target struct {
	network        string
	domain, sotype int
	v6only         bool
	sa             unix.Sockaddr
	addr           net.Addr // for errors, as the net package reports them
}

// dialTarget parses a TCP or UDP address with an IP literal host the way the
// net package's dialer does. ok is false for anything else, and for every
// address the net package would reject: those are left to it, so that its
// error texts stay.
func (n NS) dialTarget(ctx context.Context, network, addr string) (t target, ok bool) {
	switch network {
	case "tcp", "tcp4", "tcp6":
		t.sotype = unix.SOCK_STREAM
	case "udp", "udp4", "udp6":
		t.sotype = unix.SOCK_DGRAM
	default:
		return t, false
	}
	t.network = network
	host, portText, err := net.SplitHostPort(addr)
	if err != nil || host == "" {
		return t, false
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return t, false
	}
	// Port names come from /etc/services, which no namespace changes.
	port, err := net.DefaultResolver.LookupPort(ctx, network, portText)
	if err != nil {
		return t, false
	}
	// The net package's family choice: IPv4 (IPv4-mapped included) on an
	// AF_INET socket unless the network says tcp6/udp6, which accept only
	// real IPv6 addresses and get an IPv6-only socket.
	is4 := ip.Unmap().Is4()
	switch network[len(network)-1] {
	case '4':
		if !is4 {
			return t, false
		}
	case '6':
		if is4 {
			return t, false
		}
		t.v6only = true
	}
	if is4 {
		ip = ip.Unmap()
		t.domain = unix.AF_INET
		t.sa = &unix.SockaddrInet4{Port: port, Addr: ip.As4()}
	} else {
		t.domain = unix.AF_INET6
		t.sa = &unix.SockaddrInet6{Port: port, Addr: ip.As16(), ZoneId: n.zoneIndex(ip.Zone())}
	}
	ap := netip.AddrPortFrom(ip, uint16(port))
	if t.sotype == unix.SOCK_STREAM {
		t.addr = net.TCPAddrFromAddrPort(ap)
	} else {
		t.addr = net.UDPAddrFromAddrPort(ap)
	}
	return t, true
}

// zoneIndex turns an IPv6 zone into an interface index. A zone that is not
// a number names an interface of the namespace, so it is looked up inside
// it; like the net package, an unknown zone is 0.
func (n NS) zoneIndex(zone string) uint32 {
	if zone == "" {
		return 0
	}
	if i, err := strconv.ParseUint(zone, 10, 32); err == nil {
		return uint32(i)
	}
	var index int
	n.Do(func() error {
		ifi, err := net.InterfaceByName(zone)
		if err == nil {
			index = ifi.Index
		}
		return err
	})
	return uint32(index)
}

// connect creates the socket inside n and connects it from here.
func (n NS) connect(ctx context.Context, t target) (net.Conn, error) {
	// The net package gives up before creating anything when ctx is done
	// already; under overload that also spares the maker.
	if err := ctx.Err(); err != nil {
		return nil, t.opError(mapCtxErr(err))
	}
	fd, err := n.socket(t.domain, t.sotype, 0)
	if err != nil {
		var nsErr *nsError
		if errors.As(err, &nsErr) {
			return nil, err // about the namespace, not the dial
		}
		return nil, t.opError(err)
	}
	conn, err := connectFD(ctx, fd, t)
	if err != nil {
		return nil, t.opError(err)
	}
	return conn, nil
}

func (t target) opError(err error) error {
	return &net.OpError{Op: "dial", Net: t.network, Addr: t.addr, Err: err}
}

// connectFD connects the non-blocking socket fd, which it owns, and turns it
// into a *net.TCPConn or *net.UDPConn. It follows the net package's dialer:
// the same default socket options, connect(2) once, then wait for
// writability and read the outcome from SO_ERROR.
func connectFD(ctx context.Context, fd int, t target) (net.Conn, error) {
	if t.domain == unix.AF_INET6 {
		// Like the net package, ignore a kernel that refuses the option.
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, boolInt(t.v6only))
	}
	if t.sotype == unix.SOCK_DGRAM {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BROADCAST, 1); err != nil {
			unix.Close(fd)
			return nil, os.NewSyscallError("setsockopt", err)
		}
	}
	pending := false
	switch err := rawConnect(fd, t.sa); err {
	case nil, unix.EISCONN:
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
		pending = true
	default:
		unix.Close(fd)
		return nil, os.NewSyscallError("connect", err)
	}
	// Registering the fd with the netpoller only after connect(2) keeps
	// the poller from reporting the unconnected socket's hang-up state.
	f := os.NewFile(uintptr(fd), "")
	// FileConn dups the fd; the original goes with f.
	defer f.Close()
	if pending {
		if err := waitConnected(ctx, f); err != nil {
			return nil, err
		}
	} else if err := ctx.Err(); err != nil {
		return nil, mapCtxErr(err)
	}
	// The socket is connected, so FileConn learns both addresses from the
	// kernel, and for TCP it sets what a dialer sets: no Nagle delay and
	// the default keep-alive.
	return net.FileConn(f)
}

// connectFirst is a net.Dialer's control hook that starts a TCP socket's
// connect(2) itself, with rawConnect, just before the dialer's own connect:
// that one then finds the connection established (EISCONN) or in progress
// (EALREADY), both of which the net package handles as its own, and waits
// on the netpoller as usual. An immediate failure is the dial's error, as
// the net package would report it. Addresses with an IPv6 zone are left to
// the dialer.
func connectFirst(_ context.Context, network, address string, c syscall.RawConn) error {
	if network != "tcp4" && network != "tcp6" {
		return nil
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil || ap.Addr().Zone() != "" {
		return nil
	}
	var sa unix.Sockaddr
	if network == "tcp4" {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().Unmap().As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	}
	var connErr error
	if err := c.Control(func(fd uintptr) {
		switch err := rawConnect(int(fd), sa); err {
		case nil, unix.EINPROGRESS, unix.EALREADY, unix.EINTR, unix.EISCONN:
		default:
			connErr = os.NewSyscallError("connect", err)
		}
	}); err != nil {
		return err
	}
	return connErr
}

// rawConnect is connect(2) without telling the Go scheduler, which for a
// call longer than 20 µs hands the goroutine's P to another thread: on a
// non-blocking socket connect does not wait for the peer, but it runs the
// network stack inline (over a veth the peer's whole handshake), which
// often takes longer than that.
func rawConnect(fd int, sa unix.Sockaddr) error {
	var (
		ptr  unsafe.Pointer
		size uintptr
	)
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		rsa := &unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: sa.Addr}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&rsa.Port))[:], uint16(sa.Port))
		ptr, size = unsafe.Pointer(rsa), unix.SizeofSockaddrInet4
	case *unix.SockaddrInet6:
		rsa := &unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: sa.Addr, Scope_id: sa.ZoneId}
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&rsa.Port))[:], uint16(sa.Port))
		ptr, size = unsafe.Pointer(rsa), unix.SizeofSockaddrInet6
	default:
		return unix.Connect(fd, sa)
	}
	for {
		_, _, e := syscall.RawSyscall(syscall.SYS_CONNECT, uintptr(fd), uintptr(ptr), size)
		if e != unix.EINTR {
			if e == 0 {
				return nil
			}
			return e
		}
	}
}

// aLongTimeAgo is a deadline in the past: setting it makes a pending wait on
// the netpoller return at once.
var aLongTimeAgo = time.Unix(1, 0)

// waitConnected waits on the netpoller until the connect(2) pending on f
// finishes or ctx ends. ctx's deadline becomes f's write deadline, and a
// cancellation moves that deadline into the past.
func waitConnected(ctx context.Context, f *os.File) (err error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	if ctx.Done() != nil {
		if deadline, ok := ctx.Deadline(); ok {
			f.SetWriteDeadline(deadline)
		}
		stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(aLongTimeAgo) })
		defer func() {
			if !stop() && err == nil {
				// ctx ended just as connect finished; the net
				// package reports the context's end then too.
				err = mapCtxErr(ctx.Err())
			}
		}()
	}
	var connErr error
	werr := rc.Write(func(fd uintptr) bool {
		nerr, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			connErr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch err := unix.Errno(nerr); err {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case unix.EISCONN:
			return true
		case 0:
			// The poller can wake spuriously; only a peer name proves
			// the connection is there.
			_, err := unix.Getpeername(int(fd))
			return err == nil
		default:
			connErr = os.NewSyscallError("connect", err)
			return true
		}
	})
	if werr != nil {
		if errors.Is(werr, os.ErrDeadlineExceeded) {
			// Every write deadline on f comes from ctx: when ctx has
			// not noticed yet, its deadline is what passed.
			if err := ctx.Err(); err != nil {
				return mapCtxErr(err)
			}
			return timeoutError{}
		}
		return werr
	}
	return connErr
}

// mapCtxErr reports a context's end the way the net package's dialer does:
// "i/o timeout" and "operation was canceled", each errors.Is the context
// error.
func mapCtxErr(err error) error {
	switch err {
	case context.DeadlineExceeded:
		return timeoutError{}
	case context.Canceled:
		return canceledError{}
	}
	return err
}

type timeoutError struct{}

func (timeoutError) Error() string        { return "i/o timeout" }
func (timeoutError) Timeout() bool        { return true }
func (timeoutError) Temporary() bool      { return true }
func (timeoutError) Is(target error) bool { return target == context.DeadlineExceeded }

type canceledError struct{}

func (canceledError) Error() string        { return "operation was canceled" }
func (canceledError) Is(target error) bool { return target == context.Canceled }

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
