package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
)

// Handle opens ns for socket operations from the test process.
func Handle(t testing.TB, ns *topo.NS) netns.NS {
	t.Helper()
	h, err := netns.Parse(ns.Path())
	if err != nil {
		t.Fatalf("netns.Parse(%s): %v", ns.Path(), err)
	}
	return h
}

// AcceptLog wraps a listener and records the remote address of every
// connection that sends it data, so a test can tell which hop the target
// saw. Connections that send nothing (the tc datapath's node probes) are
// not traffic and are not recorded, but Accepted counts them.
type AcceptLog struct {
	net.Listener
	mu       sync.Mutex
	remotes  []string
	accepted int
}

// Accept wraps the next connection so that its first byte logs it.
func (l *AcceptLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.accepted++
	l.mu.Unlock()
	return &loggedConn{Conn: c, log: l}, nil
}

// Accepted is how many connections the listener accepted, data or not.
func (l *AcceptLog) Accepted() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.accepted
}

// loggedConn records its remote address with its first byte.
type loggedConn struct {
	net.Conn
	log  *AcceptLog
	once sync.Once
}

func (c *loggedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.once.Do(func() {
			c.log.mu.Lock()
			c.log.remotes = append(c.log.remotes, c.RemoteAddr().String())
			c.log.mu.Unlock()
		})
	}
	return n, err
}

// CloseWrite keeps the echo server's half-close working through the wrapper.
func (c *loggedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Count is how many connections sent data.
func (l *AcceptLog) Count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.remotes)
}

// Remotes returns the remote address of every connection that sent data,
// in the order they sent it.
func (l *AcceptLog) Remotes() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.remotes...)
}

// Sources returns the distinct IPs connections came from.
func (l *AcceptLog) Sources() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for _, r := range l.remotes {
		host, _, _ := net.SplitHostPort(r)
		if !seen[host] {
			seen[host] = true
			out = append(out, host)
		}
	}
	return out
}

// EchoIn starts a TCP echo-with-digest server at addr inside ns.
func EchoIn(t testing.TB, ns *topo.NS, addr string) *AcceptLog {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := Handle(t, ns).Listen(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("echo listen %s in %s: %v", addr, ns.Name, err)
	}
	al := &AcceptLog{Listener: l}
	t.Cleanup(peer.ServeEcho(al))
	return al
}

// UDPEchoIn starts a UDP echo server at addr inside ns.
func UDPEchoIn(t testing.TB, ns *topo.NS, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pc, err := Handle(t, ns).ListenPacket(ctx, "udp", addr)
	if err != nil {
		t.Fatalf("udp echo listen %s in %s: %v", addr, ns.Name, err)
	}
	t.Cleanup(peer.ServeUDPEcho(pc))
}

// DialFrom dials addr from inside ns.
func DialFrom(ctx context.Context, t testing.TB, ns *topo.NS, network, addr string) (net.Conn, error) {
	t.Helper()
	return Handle(t, ns).Dial(ctx, network, addr)
}

// Exchange dials addr from ns and runs peer.Exchange of n bytes over it.
func Exchange(t testing.TB, ns *topo.NS, addr string, n int, timeout time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := DialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		return err
	}
	return peer.Exchange(ctx, c, n)
}

// Config fills a YAML template: every key of vars (written $NAME in the
// template) is replaced by its value.
func Config(template string, vars map[string]string) string {
	// Longest names first, so that $NS1 is never read as $NS followed by 1.
	keys := make([]string, 0, len(vars))
	for k := range vars {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return len(keys[i]) > len(keys[j]) })
	pairs := make([]string, 0, 2*len(vars))
	for _, k := range keys {
		pairs = append(pairs, "$"+k, vars[k])
	}
	return strings.NewReplacer(pairs...).Replace(template)
}

// ExpectClosedNoData sends a little data on a fresh connection to addr
// and expects the far end to close it without sending a single byte
// within 5s.
func ExpectClosedNoData(t testing.TB, ns *topo.NS, addr string) {
	t.Helper()
	ExpectClosedNoDataWithin(t, ns, addr, 5*time.Second)
}

// ExpectClosedNoDataWithin is ExpectClosedNoData for a close that may take
// up to wait (one that waits out a timeout of the daemon's).
func ExpectClosedNoDataWithin(t testing.TB, ns *topo.NS, addr string, wait time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := DialFrom(ctx, t, ns, "tcp", addr)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		// A SYN nobody answers is a black hole, not a closed door.
		t.Fatalf("dial %s: %v: neither accepted nor refused", addr, err)
	case err != nil:
		// Refusing outright also gives the client no data.
		t.Logf("dial %s: %v (refused, which also counts as closed)", addr, err)
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(wait))
	// The write may fail if the daemon already closed; that is fine.
	_, _ = c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	got, err := io.ReadAll(c)
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("connection to %s neither answered nor closed within %v (got %d bytes)", addr, wait, len(got))
	case len(got) > 0:
		t.Fatalf("connection to %s returned %d bytes (%q), want none", addr, len(got), got)
	}
}
