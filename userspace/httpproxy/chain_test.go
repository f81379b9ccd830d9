package httpproxy_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/httpproxy"
)

const (
	chainTimeout = 20 * time.Second
	payloadSize  = 1 << 20
)

// exchangeResult is what the final server saw and sent.
type exchangeResult struct {
	received [sha256.Size]byte
	sent     [sha256.Size]byte
	err      error
}

// startExchangeServer accepts one connection, hashes everything it reads
// until the client's half-close while sending payloadSize random bytes of
// its own, then half-closes.
func startExchangeServer(t *testing.T) (string, <-chan exchangeResult) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	out := make(chan exchangeResult, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			out <- exchangeResult{err: err}
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(chainTimeout))
		payload := make([]byte, payloadSize)
		_, _ = rand.Read(payload)
		var res exchangeResult
		res.sent = sha256.Sum256(payload)
		writeErr := make(chan error, 1)
		go func() {
			_, err := c.Write(payload)
			if err == nil {
				err = c.(*net.TCPConn).CloseWrite()
			}
			writeErr <- err
		}()
		h := sha256.New()
		if _, err := io.Copy(h, c); err != nil {
			res.err = err
		}
		copy(res.received[:], h.Sum(nil))
		if err := <-writeErr; err != nil && res.err == nil {
			res.err = err
		}
		out <- res
	}()
	return ln.Addr().String(), out
}

// TestChainedHandshake reaches the final server through proxy A and then
// proxy B, the way ebpfwd chains hop 2+ through hop 1: CONNECT to A asking
// for B, then CONNECT again over that tunnel asking for the final server.
// 1 MiB goes each way and must arrive byte-exact, with half-close passed
// along both hops.
func TestChainedHandshake(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	authB := &httpconnect.Auth{Username: "hop2", Password: "pw2"}
	proxyA := testutil.ServeLoopback(t, (&httpproxy.Server{Relay: httpproxy.CopyRelay, Logger: quiet}).ServeConn)
	proxyB := testutil.ServeLoopback(t, (&httpproxy.Server{Relay: httpproxy.CopyRelay, Logger: quiet, Auth: authB}).ServeConn)
	final, results := startExchangeServer(t)

	ctx, cancel := context.WithTimeout(context.Background(), chainTimeout)
	defer cancel()
	conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", proxyA)
	if err != nil {
		t.Fatalf("dial proxy A: %v", err)
	}
	defer conn.Close()
	hop1, err := httpconnect.Handshake(ctx, conn, proxyB, nil)
	if err != nil {
		t.Fatalf("hop 1 (A -> B): %v", err)
	}
	tunnel, err := httpconnect.Handshake(ctx, hop1, final, authB)
	if err != nil {
		t.Fatalf("hop 2 (B -> final): %v", err)
	}
	_ = tunnel.SetDeadline(time.Now().Add(chainTimeout))

	payload := make([]byte, payloadSize)
	_, _ = rand.Read(payload)
	writeErr := make(chan error, 1)
	go func() {
		_, err := tunnel.Write(payload)
		if err == nil {
			err = tunnel.(interface{ CloseWrite() error }).CloseWrite()
		}
		writeErr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, tunnel)
	if err != nil {
		t.Fatalf("read through chain: %v", err)
	}
	if err := <-writeErr; err != nil {
		t.Fatalf("write through chain: %v", err)
	}

	var got exchangeResult
	select {
	case got = <-results:
	case <-time.After(chainTimeout):
		t.Fatal("final server did not finish")
	}
	if got.err != nil {
		t.Fatalf("final server: %v", got.err)
	}
	if got.received != sha256.Sum256(payload) {
		t.Fatal("client -> server bytes differ after two hops")
	}
	if n != payloadSize || [sha256.Size]byte(h.Sum(nil)) != got.sent {
		t.Fatalf("server -> client: got %d bytes with a different hash, want %d exact", n, payloadSize)
	}
}
