package proxyproto

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"
)

// Conn is an accepted connection whose PROXY header has been read: its
// RemoteAddr and LocalAddr are the header's (the socket's own for a Local
// header), and the bytes read past the header come first. It implements the
// relay's Tunnel (Pending, NetConn), so a splice(2) relay sends Pending and
// then moves bytes from the raw socket.
type Conn struct {
	net.Conn
	Header  Header
	pending []byte
	remote  net.Addr
	local   net.Addr
}

// Read returns the bytes read past the header first, then reads the socket.
func (c *Conn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// RemoteAddr is the real client: the header's source.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// LocalAddr is the address the client connected to: the header's
// destination.
func (c *Conn) LocalAddr() net.Addr { return c.local }

// Pending returns the bytes read past the header that Read has not yet
// returned.
func (c *Conn) Pending() []byte { return c.pending }

// NetConn returns the socket underneath.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// CloseWrite half-closes the socket when it can.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// Source returns the real client address of the header, or the
// connection's own peer for a Local header.
func (c *Conn) Source() netip.AddrPort { return addrPort(c.remote) }

// Read reads the PROXY header (version 1 or 2) at the start of conn,
// waiting at most timeout for it, and returns the connection with the
// header's addresses. Errors wrap ErrNoHeader (the peer sent something
// else, or closed without sending anything), ErrMalformed (including a
// header cut short by the peer closing), or ErrTimeout. On error conn is
// left open: the caller closes it.
func Read(conn net.Conn, timeout time.Duration) (*Conn, error) {
	if err := conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, fmt.Errorf("read PROXY header: arm deadline: %w", err)
	}
	// One buffer for the longest header; the bytes read past it are kept.
	buf := make([]byte, MaxHeader)
	have := 0
	for {
		n, rerr := conn.Read(buf[have:])
		have += n
		h, hlen, perr := Parse(buf[:have])
		switch {
		case perr == nil:
			if err := conn.SetReadDeadline(time.Time{}); err != nil {
				return nil, fmt.Errorf("read PROXY header: clear deadline: %w", err)
			}
			c := &Conn{Conn: conn, Header: h, remote: conn.RemoteAddr(), local: conn.LocalAddr()}
			if have > hlen {
				c.pending = buf[hlen:have:have]
			}
			if !h.Local {
				c.remote = net.TCPAddrFromAddrPort(h.Source)
				c.local = net.TCPAddrFromAddrPort(h.Destination)
			}
			return c, nil
		case !errors.Is(perr, errIncomplete):
			return nil, perr
		}
		if rerr == nil {
			if have == len(buf) {
				// Parse bounds every header below MaxHeader; kept so
				// the loop cannot spin on a full buffer.
				return nil, fmt.Errorf("%w: longer than %d bytes", ErrMalformed, MaxHeader)
			}
			continue
		}
		switch {
		case errors.Is(rerr, os.ErrDeadlineExceeded):
			return nil, fmt.Errorf("%w (%s, %d bytes received)", ErrTimeout, timeout, have)
		case errors.Is(rerr, io.EOF) && have == 0:
			return nil, fmt.Errorf("%w: the client closed without sending one", ErrNoHeader)
		case errors.Is(rerr, io.EOF):
			return nil, fmt.Errorf("%w: the client closed after %d bytes of it", ErrMalformed, have)
		}
		return nil, fmt.Errorf("read PROXY header: %w", rerr)
	}
}

// Write sends a PROXY header of the given version for a connection from src
// to dst on conn, before any other byte.
func Write(conn net.Conn, version int, src, dst netip.AddrPort) error {
	b, err := Append(nil, version, src, dst)
	if err != nil {
		return err
	}
	if _, err := conn.Write(b); err != nil {
		return fmt.Errorf("send PROXY v%d header to %s: %w", version, conn.RemoteAddr(), err)
	}
	return nil
}

func addrPort(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
