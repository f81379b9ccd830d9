// Package peer provides traffic endpoints for tests and benchmarks that
// verify every byte that crosses a forwarder: a TCP echo server that
// appends a SHA-256 of what it received, a client that checks the echo and
// that digest, and a UDP echo pair that checks each datagram.
package peer

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"strings"
	"sync"
	"time"
)

// TrailerSize is the length of the digest ServeEcho appends after the echo.
const TrailerSize = sha256.Size

// chunkSize is the unit the echo server and Exchange read and write in.
const chunkSize = 32 << 10

// halfCloser is implemented by *net.TCPConn and *net.UnixConn.
type halfCloser interface {
	CloseWrite() error
}

// ServeEcho accepts connections on l until l is closed. Each connection gets
// every byte echoed back as it arrives; when the client half-closes, the
// server writes the SHA-256 of everything it received and closes. The
// trailer lets the client tell "the forwarder corrupted my data on the way
// in" from "on the way back".
//
// The returned stop closes l, closes connections still in flight (so stop
// never waits on a client that went away) and waits for every handler.
func ServeEcho(l net.Listener) (stop func()) {
	var (
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
		wg     sync.WaitGroup
	)
	track := func(c net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		if closed {
			return false
		}
		conns[c] = struct{}{}
		return true
	}
	untrack := func(c net.Conn) {
		mu.Lock()
		delete(conns, c)
		mu.Unlock()
	}

	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					slog.Debug("echo accept stopped", "addr", l.Addr(), "err", err)
				}
				return
			}
			if !track(c) {
				c.Close()
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer untrack(c)
				defer c.Close()
				if err := echoWithDigest(c); err != nil {
					slog.Debug("echo connection failed", "remote", c.RemoteAddr(), "err", err)
				}
			}()
		}
	}()

	var once sync.Once
	return func() {
		once.Do(func() {
			l.Close()
			mu.Lock()
			closed = true
			for c := range conns {
				c.Close()
			}
			mu.Unlock()
			wg.Wait()
		})
	}
}

func echoWithDigest(c net.Conn) error {
	h := sha256.New()
	buf := make([]byte, chunkSize)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			h.Write(buf[:n])
			if _, werr := c.Write(buf[:n]); werr != nil {
				return fmt.Errorf("echo write: %w", werr)
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("echo read: %w", err)
		}
	}
	if _, err := c.Write(h.Sum(nil)); err != nil {
		return fmt.Errorf("write digest trailer: %w", err)
	}
	return nil
}

// Exchange sends n bytes of pseudo-random data on c while concurrently
// reading the echo, half-closes after the last byte, reads until EOF and
// verifies that the echo equals what was sent and that the trailer equals
// SHA-256 of what was sent (so the server received it intact). The data
// comes from a ChaCha8 stream with a random seed so the reader can
// regenerate it and name the first differing offset without buffering n
// bytes. Exchange is bounded by ctx and always closes c.
func Exchange(ctx context.Context, c net.Conn, n int) error {
	defer c.Close()
	if n < 0 {
		return fmt.Errorf("exchange: negative length %d", n)
	}
	hc, ok := c.(halfCloser)
	if !ok {
		return fmt.Errorf("exchange with %s: %T cannot half-close", c.RemoteAddr(), c)
	}
	if dl, ok := ctx.Deadline(); ok {
		if err := c.SetDeadline(dl); err != nil {
			return fmt.Errorf("exchange with %s: set deadline: %w", c.RemoteAddr(), err)
		}
	}
	// Cancellation without a deadline still has to unblock Read and Write.
	stopAfter := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stopAfter()

	var seed [32]byte
	if _, err := rand.Read(seed[:]); err != nil {
		return fmt.Errorf("exchange: seed: %w", err)
	}

	type sendResult struct {
		sum [sha256.Size]byte
		err error
	}
	sent := make(chan sendResult, 1)
	go func() {
		// A failed send does not cut the reader short: the peer's close or
		// reset, or ctx's deadline, ends it, and what it received is the
		// finding to report (a truncation shows in its byte count).
		sum, err := sendStream(c, hc, seed, n)
		sent <- sendResult{sum, err}
	}()

	rr := receiveStream(c, seed, n)
	var sr sendResult
	aborted := false
	select {
	case sr = <-sent:
	default:
		// The echo ended before the sender finished, which a correct peer
		// never does (it sends its trailer only after our EOF). A sender
		// blocked on a peer that stopped reading must not hang Exchange.
		_ = c.SetDeadline(time.Now())
		sr, aborted = <-sent, true
	}
	if err := contextDone(ctx); err != nil && (sr.err != nil || rr.err != nil) {
		return fmt.Errorf("exchange of %d bytes with %s: %w (sent: %v, received %d bytes: %v)",
			n, c.RemoteAddr(), err, sr.err, rr.total, rr.err)
	}
	if (sr.err != nil || aborted) && rr.err == nil {
		// The receive completed: it says what went wrong. Only its length
		// and trailer checks apply, the sent digest being incomplete.
		if err := rr.verify(n, sr.sum); err != nil {
			return fmt.Errorf("exchange with %s: sending stopped early (%v): %w", c.RemoteAddr(), sr.err, err)
		}
	}
	if sr.err != nil {
		return fmt.Errorf("exchange of %d bytes with %s: send: %w (received %d bytes)", n, c.RemoteAddr(), sr.err, rr.total)
	}
	if rr.err != nil {
		return fmt.Errorf("exchange of %d bytes with %s: receive after %d bytes: %w", n, c.RemoteAddr(), rr.total, rr.err)
	}
	return rr.verify(n, sr.sum)
}

func sendStream(c net.Conn, hc halfCloser, seed [32]byte, n int) ([sha256.Size]byte, error) {
	gen := mrand.NewChaCha8(seed)
	h := sha256.New()
	buf := make([]byte, chunkSize)
	for left := n; left > 0; {
		b := buf[:min(left, len(buf))]
		_, _ = gen.Read(b)
		h.Write(b)
		if _, err := c.Write(b); err != nil {
			return [sha256.Size]byte{}, fmt.Errorf("write at offset %d: %w", n-left, err)
		}
		left -= len(b)
	}
	if err := hc.CloseWrite(); err != nil {
		return [sha256.Size]byte{}, fmt.Errorf("half-close after %d bytes: %w", n, err)
	}
	return [sha256.Size]byte(h.Sum(nil)), nil
}

// received is what the reading side of Exchange observed.
type received struct {
	total     int64             // bytes read before EOF or error
	echoSum   [sha256.Size]byte // SHA-256 of the first n bytes read
	firstDiff int64             // offset of the first echo byte that differs, -1 if none
	trailer   []byte            // bytes after the first n (normally the digest)
	err       error
}

// trailerKeep bounds how much of an overlong stream is kept for the report.
const trailerKeep = 4 * TrailerSize

func receiveStream(c net.Conn, seed [32]byte, n int) received {
	want := mrand.NewChaCha8(seed)
	h := sha256.New()
	r := received{firstDiff: -1}
	buf := make([]byte, chunkSize)
	expect := make([]byte, chunkSize)
	for {
		k, err := c.Read(buf)
		got := buf[:k]
		// The first n bytes are the echo; anything after is the trailer.
		if echoLeft := int64(n) - r.total; echoLeft > 0 {
			e := got[:min(int64(len(got)), echoLeft)]
			h.Write(e)
			if r.firstDiff < 0 {
				x := expect[:len(e)]
				_, _ = want.Read(x)
				if i := firstMismatch(e, x); i >= 0 {
					r.firstDiff = r.total + int64(i)
				}
			}
			got = got[len(e):]
		}
		if room := trailerKeep - len(r.trailer); room > 0 {
			r.trailer = append(r.trailer, got[:min(len(got), room)]...)
		}
		r.total += int64(k)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			r.err = err
			break
		}
	}
	r.echoSum = [sha256.Size]byte(h.Sum(nil))
	return r
}

func firstMismatch(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// verify compares what was received with what was sent and reports every
// difference at once, because "lengths differ" alone does not say whether
// the forwarder lost, duplicated or corrupted data.
func (r received) verify(n int, sentSum [sha256.Size]byte) error {
	var problems []string
	if want := int64(n) + TrailerSize; r.total != want {
		problems = append(problems, fmt.Sprintf("received %d bytes, want %d (%d echo + %d-byte SHA-256 trailer)",
			r.total, want, n, TrailerSize))
	}
	if r.total >= int64(n) && r.echoSum != sentSum {
		problems = append(problems, fmt.Sprintf("echo SHA-256 %x != sent SHA-256 %x", r.echoSum, sentSum))
	}
	if r.firstDiff >= 0 {
		problems = append(problems, fmt.Sprintf("echo differs from sent data first at offset %d", r.firstDiff))
	}
	switch {
	case len(r.trailer) < TrailerSize:
		problems = append(problems, fmt.Sprintf("trailer is %d bytes, want %d", len(r.trailer), TrailerSize))
	case !bytes.Equal(r.trailer[:TrailerSize], sentSum[:]):
		problems = append(problems, fmt.Sprintf("server-side SHA-256 %x != sent SHA-256 %x (data corrupted on the way to the server)",
			r.trailer[:TrailerSize], sentSum))
	}
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("exchange of %d bytes: %s", n, strings.Join(problems, "; "))
}

// contextDone is ctx.Err(), except that it already reports
// DeadlineExceeded once the deadline has passed: a socket deadline set to
// the context's deadline can fire a moment before the context's own timer.
func contextDone(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
		return context.DeadlineExceeded
	}
	return nil
}
