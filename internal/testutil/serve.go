package testutil

import (
	"context"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Serve runs handle on every connection ln accepts, each in its own
// goroutine, until the test ends. Then it closes ln, cancels the handlers'
// context and waits up to Timeout for them to return. handle owns c: it
// must close it, and return soon after ctx is done.
func Serve(tb testing.TB, ln net.Listener, handle func(ctx context.Context, c net.Conn)) {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return // ln closed: the test is over
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				handle(ctx, c)
			}()
		}
	}()
	tb.Cleanup(func() {
		cancel()
		ln.Close()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(Timeout):
			tb.Errorf("server on %s: connections still open %v after the test ended", ln.Addr(), Timeout)
		}
	})
}

// ServeLoopback listens on an ephemeral 127.0.0.1 port, Serves handle on
// it and returns the address.
func ServeLoopback(tb testing.TB, handle func(ctx context.Context, c net.Conn)) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen on loopback: %v", err)
	}
	Serve(tb, ln, handle)
	return ln.Addr().String()
}

// Echo is a handler for Serve that sends back every byte it receives and
// half-closes when the client does, so the client can read the echo to
// EOF. It gives up when ctx is done or after Timeout, whichever is first.
func Echo(ctx context.Context, c net.Conn) {
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(Timeout))
	_, _ = io.Copy(c, c)
	if hc, ok := c.(interface{ CloseWrite() error }); ok {
		_ = hc.CloseWrite()
	}
}

// FreeLoopbackAddr returns a 127.0.0.1 address nothing listens on right
// now: for a server the test starts later, or for a dial that must be
// refused.
func FreeLoopbackAddr(tb testing.TB) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("find a free loopback port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
