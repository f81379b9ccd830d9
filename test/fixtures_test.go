package test

import (
	"context"
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

// handle opens ns for socket operations from the test process.
func handle(t *testing.T, ns *topo.NS) netns.NS {
	t.Helper()
	h, err := netns.Parse(ns.Path())
	if err != nil {
		t.Fatalf("netns.Parse(%s): %v", ns.Path(), err)
	}
	return h
}

// acceptLog wraps a listener and records the remote address of every
// connection that sends it data, so a test can tell which hop the target
// saw. Connections that send nothing (the tc datapath's node probes) are
// not traffic and are not recorded.
type acceptLog struct {
	net.Listener
	mu      sync.Mutex
	remotes []string
}

func (l *acceptLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &loggedConn{Conn: c, log: l}, nil
}

// loggedConn records its remote address with its first byte.
type loggedConn struct {
	net.Conn
	log  *acceptLog
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

// count is how many connections sent data.
func (l *acceptLog) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.remotes)
}

// sources returns the distinct IPs connections came from.
func (l *acceptLog) sources() []string {
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

// echoIn starts a TCP echo-with-digest server at addr inside ns.
func echoIn(t *testing.T, ns *topo.NS, addr string) *acceptLog {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := handle(t, ns).Listen(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("echo listen %s in %s: %v", addr, ns.Name, err)
	}
	al := &acceptLog{Listener: l}
	t.Cleanup(peer.ServeEcho(al))
	return al
}

// udpEchoIn starts a UDP echo server at addr inside ns.
func udpEchoIn(t *testing.T, ns *topo.NS, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pc, err := handle(t, ns).ListenPacket(ctx, "udp", addr)
	if err != nil {
		t.Fatalf("udp echo listen %s in %s: %v", addr, ns.Name, err)
	}
	t.Cleanup(peer.ServeUDPEcho(pc))
}

// dialFrom dials addr from inside ns.
func dialFrom(ctx context.Context, t *testing.T, ns *topo.NS, network, addr string) (net.Conn, error) {
	t.Helper()
	return handle(t, ns).Dial(ctx, network, addr)
}

// exchange dials addr from ns and runs peer.Exchange of n bytes over it.
func exchange(t *testing.T, ns *topo.NS, addr string, n int, timeout time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := dialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		return err
	}
	return peer.Exchange(ctx, c, n)
}

// config fills a YAML template: every key of vars (written $NAME in the
// template) is replaced by its value.
func config(template string, vars map[string]string) string {
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
