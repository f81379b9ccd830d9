package testutil

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// ProxyReply scripts what a ScriptedProxy does once it has read the
// client's request. The zero value answers nothing and holds the
// connection open until the client closes it.
type ProxyReply struct {
	// Chunks are written in order, each with its own Write, so a test can
	// split a response anywhere: a refusal ("HTTP/1.1 407 ..."), garbage,
	// or "200" followed by the target's first bytes.
	Chunks [][]byte
	// Close closes the connection after the chunks; otherwise the proxy
	// keeps reading (and discarding) until the client closes.
	Close bool
	// Hang writes nothing at all and holds the connection open, for
	// timeouts.
	Hang bool
}

// StartScriptedProxy plays an HTTP CONNECT proxy on an ephemeral
// 127.0.0.1 port for exactly one connection: it reads one request, sends it
// on requests (nil if it did not parse) and then does what reply says. It
// never dials anything. The test's cleanup waits up to Timeout for it.
func StartScriptedProxy(tb testing.TB, reply ProxyReply) (addr string, requests <-chan *http.Request) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen on loopback: %v", err)
	}
	reqs := make(chan *http.Request, 1)
	done := make(chan struct{})
	tb.Cleanup(func() {
		ln.Close()
		select {
		case <-done:
		case <-time.After(Timeout):
			tb.Errorf("scripted proxy on %s did not finish %v after the test ended", ln.Addr(), Timeout)
		}
	})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(Timeout))
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			reqs <- nil
			return
		}
		reqs <- req
		if reply.Hang {
			_, _ = io.Copy(io.Discard, c)
			return
		}
		for _, chunk := range reply.Chunks {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		if !reply.Close {
			// Keep the tunnel open until the client closes.
			_, _ = io.Copy(io.Discard, c)
		}
	}()
	return ln.Addr().String(), reqs
}
