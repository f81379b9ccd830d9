package test

import (
	"context"
	"errors"
	"fmt"
	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

// crashResetWait bounds each wait of TestDaemonDeathResetsStreams.
const crashResetWait = 15 * time.Second

// slowSink accepts one connection in ns at addr and reads it slowly, so
// the relay's socket towards it has bytes queued when the daemon dies.
type slowSink struct {
	received atomic.Int64
	// ended receives how the stream ended: the first read error.
	ended chan error
}

func startSlowSink(t *testing.T, ns *topo.NS, addr string) *slowSink {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	l, err := e2e.Handle(t, ns).Listen(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns.Name, err)
	}
	t.Cleanup(func() { l.Close() })
	s := &slowSink{ended: make(chan error, 1)}
	go func() {
		if dl, ok := l.(interface{ SetDeadline(time.Time) error }); ok {
			_ = dl.SetDeadline(time.Now().Add(crashResetWait))
		}
		c, err := l.Accept()
		if err != nil {
			s.ended <- fmt.Errorf("accept: %w", err)
			return
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(3 * crashResetWait))
		buf := make([]byte, 4<<10)
		for {
			n, err := c.Read(buf)
			s.received.Add(int64(n))
			if err != nil {
				s.ended <- err
				return
			}
			time.Sleep(2 * time.Millisecond) // about 2 MB/s
		}
	}()
	return s
}

// upload writes to c until a write fails (bounded by a deadline and a
// total far beyond what the sink reads before the crash), and reports
// that failure.
func upload(c net.Conn) <-chan error {
	done := make(chan error, 1)
	go func() {
		const limit = 1 << 30
		_ = c.SetWriteDeadline(time.Now().Add(3 * crashResetWait))
		chunk := make([]byte, 32<<10)
		for sent := 0; sent < limit; sent += len(chunk) {
			if _, err := c.Write(chunk); err != nil {
				done <- err
				return
			}
		}
		done <- fmt.Errorf("wrote %d bytes without an error", limit)
	}()
	return done
}

// TestDaemonDeathResetsStreams kills the daemon (SIGKILL) in the middle of
// uploads it relays, through a tcp service and through an http proxy's
// CONNECT tunnel: the servers must see a reset, never a clean EOF after a
// truncated upload, and the clients an error, not a clean close.
func TestDaemonDeathResetsStreams(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-crst-c")
	s := testutil.NewNS(t, "e2e-crst-s")
	tcpSink := startSlowSink(t, s, "127.0.0.1:9000")
	proxySink := startSlowSink(t, s, "127.0.0.1:9001")
	yaml := e2e.Config(`services:
- name: fwd
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $S, datapath: userspace}
- name: proxy
  addr: 127.0.0.1:8001
  handler: {type: http}
  listener: {type: tcp}
  metadata: {netns: $C, netns.out: $S}
`, map[string]string{"C": c.Name, "S": s.Name})
	d := e2e.Start(t, "crash-reset", yaml, e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), crashResetWait)
	defer cancel()
	tcpConn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpConn.Close()
	proxyConn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8001")
	if err != nil {
		t.Fatal(err)
	}
	defer proxyConn.Close()
	tunnel, err := httpconnect.Handshake(ctx, proxyConn, "127.0.0.1:9001", nil)
	if err != nil {
		t.Fatalf("CONNECT through the proxy: %v", err)
	}

	streams := []struct {
		name     string
		sink     *slowSink
		uploaded <-chan error
	}{
		{"tcp service", tcpSink, upload(tcpConn)},
		{"http CONNECT tunnel", proxySink, upload(tunnel)},
	}
	// Mid-upload: every server has some of it and reads on slowly.
	const midway = 256 << 10
	deadline := time.Now().Add(crashResetWait)
	for _, st := range streams {
		for st.sink.received.Load() < midway {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the server received only %d bytes within %v", st.name, st.sink.received.Load(), crashResetWait)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	d.Crash(t)

	for _, st := range streams {
		select {
		case err := <-st.sink.ended:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Errorf("%s: the server's read ended with %v after %d bytes, want a connection reset (a clean EOF makes the cut upload look complete)",
					st.name, err, st.sink.received.Load())
			}
		case <-time.After(crashResetWait):
			t.Errorf("%s: the server's stream did not end within %v of the crash", st.name, crashResetWait)
		}
		select {
		case err := <-st.uploaded:
			if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
				t.Errorf("%s: the client's upload ended with %v, want a connection reset", st.name, err)
			}
		case <-time.After(crashResetWait):
			t.Errorf("%s: the client's upload did not fail within %v of the crash", st.name, crashResetWait)
		}
	}
}
