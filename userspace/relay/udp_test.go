package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// udpEcho is an upstream UDP server that echoes every datagram.
func udpEcho(t *testing.T) *net.UDPAddr {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen echo: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if _, err := c.WriteToUDPAddrPort(buf[:n], from); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		c.Close()
		<-done
	})
	return c.LocalAddr().(*net.UDPAddr)
}

// udpRig runs UDP.Serve on a loopback listener in front of an echo server
// and tracks the sessions and upstream sockets it opens.
type udpRig struct {
	relay    *UDP
	addr     *net.UDPAddr
	active   atomic.Int64 // sessions open per OnSession
	dials    atomic.Int64
	closed   atomic.Int64 // upstream sockets closed
	errs     atomic.Int64
	cancel   context.CancelFunc
	served   chan error
	listener *net.UDPConn
}

// trackedConn counts Close calls on upstream sockets.
type trackedConn struct {
	*net.UDPConn
	once   sync.Once
	closed *atomic.Int64
}

func (c *trackedConn) Close() error {
	c.once.Do(func() { c.closed.Add(1) })
	return c.UDPConn.Close()
}

func startUDP(t *testing.T, ttl time.Duration, maxSessions int, dial func(context.Context, net.Addr) (net.Conn, error)) *udpRig {
	t.Helper()
	return startUDPWith(t, ttl, maxSessions, dial, nil)
}

// startUDPWith is startUDP with configure applied to the relay before it
// serves.
func startUDPWith(t *testing.T, ttl time.Duration, maxSessions int, dial func(context.Context, net.Addr) (net.Conn, error), configure func(*UDP)) *udpRig {
	t.Helper()
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	r := &udpRig{addr: ln.LocalAddr().(*net.UDPAddr), served: make(chan error, 1), listener: ln}
	if dial == nil {
		echo := udpEcho(t)
		dial = func(ctx context.Context, _ net.Addr) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "udp", echo.String())
			if err != nil {
				return nil, err
			}
			return &trackedConn{UDPConn: c.(*net.UDPConn), closed: &r.closed}, nil
		}
	}
	r.relay = &UDP{
		Conn: ln,
		Dial: func(ctx context.Context, client net.Addr) (net.Conn, string, error) {
			r.dials.Add(1)
			c, err := dial(ctx, client)
			return c, "echo", err
		},
		TTL:         ttl,
		Counts:      new(Counts),
		MaxSessions: maxSessions,
		OnSession: func(opened bool) {
			if opened {
				r.active.Add(1)
			} else {
				r.active.Add(-1)
			}
		},
		OnError: func(error) { r.errs.Add(1) },
		Logger:  slog.New(slog.DiscardHandler),
	}
	if configure != nil {
		configure(r.relay)
	}
	ctx, cancel := context.WithCancel(t.Context())
	r.cancel = cancel
	go func() { r.served <- r.relay.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.served:
		case <-time.After(testDeadline):
			t.Error("Serve did not return")
		}
	})
	return r
}

func (r *udpRig) client(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.DialUDP("udp", nil, r.addr)
	if err != nil {
		t.Fatalf("dial relay: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetDeadline(time.Now().Add(testDeadline)); err != nil {
		t.Fatal(err)
	}
	return c
}

// roundTrip sends p through the relay and expects it echoed back intact.
func roundTrip(c *net.UDPConn, p []byte) error {
	_, err := roundTripCounting(c, p)
	return err
}

// roundTripAttempts bounds the sends of one datagram: UDP may drop a
// datagram (a full socket buffer on a loaded machine), which is not the
// relay's fault, so a missing echo is retried; a wrong echo never passes.
const roundTripAttempts = 3

// roundTripCounting sends p until its echo comes back (at most
// roundTripAttempts times) and reports how many times it was sent.
func roundTripCounting(c *net.UDPConn, p []byte) (int, error) {
	buf := make([]byte, maxDatagram)
	var lastErr error
	for attempt := 1; attempt <= roundTripAttempts; attempt++ {
		if _, err := c.Write(p); err != nil {
			return attempt, fmt.Errorf("send %d bytes: %w", len(p), err)
		}
		// A missing echo fails after seconds, not the whole test deadline.
		if err := c.SetReadDeadline(time.Now().Add(2 * time.Second)); err != nil {
			return attempt, err
		}
		for {
			n, err := c.Read(buf)
			if err != nil {
				lastErr = fmt.Errorf("receive echo of %d bytes (attempt %d): %w", len(p), attempt, err)
				break
			}
			if bytes.Equal(buf[:n], p) {
				return attempt, nil
			}
			// A late echo of an earlier datagram: keep reading. A
			// corrupted echo of this one ends as a timeout.
		}
	}
	return roundTripAttempts, lastErr
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestUDPSessionsEchoAndExpire(t *testing.T) {
	const (
		clients   = 3
		datagrams = 100
		// Long enough that no session expires before the checks below,
		// even on a loaded machine: a client that finished first idles
		// until the last one has (seen to take more than 1 s under -race);
		// expiry is timed precisely elsewhere.
		ttl = 5 * time.Second
	)
	r := startUDP(t, ttl, 0, nil)
	var (
		wg            sync.WaitGroup
		sent, written atomic.Uint64 // distinct bytes, and every byte sent
	)
	errs := make(chan error, clients)
	for ci := range clients {
		c := r.client(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range datagrams {
				// Distinct sizes per client and datagram, up to ~59 KB, and
				// content tagged with the client so a reply from another
				// client's session cannot pass.
				p := bytes.Repeat([]byte{byte('a' + ci), byte(i)}, (1+i*599+ci)/2+1)
				attempts, err := roundTripCounting(c, p)
				written.Add(uint64(attempts * len(p)))
				if err != nil {
					errs <- fmt.Errorf("client %d datagram %d: %w", ci, i, err)
					return
				}
				sent.Add(uint64(len(p)))
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if got := r.active.Load(); got != clients {
		t.Fatalf("%d sessions open, want %d (one per client)", got, clients)
	}
	if got := r.dials.Load(); got != clients {
		t.Fatalf("%d upstream dials, want %d", got, clients)
	}
	// Exact unless a datagram had to be resent: then up to every byte
	// written. A datagram is counted up once its write upstream returned,
	// which may be after its echo came back down: the last counts settle
	// a moment after the clients have their replies.
	settled := func() bool {
		up, down := r.relay.Counts.Up.Load(), r.relay.Counts.Down.Load()
		return up >= sent.Load() && down >= sent.Load()
	}
	for deadline := time.Now().Add(testDeadline); !settled() && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if up, down := r.relay.Counts.Up.Load(), r.relay.Counts.Down.Load(); up < sent.Load() || up > written.Load() || down < sent.Load() || down > written.Load() {
		t.Fatalf("counted up %d down %d, want %d each (at most %d with resends)", up, down, sent.Load(), written.Load())
	}
	// Sessions lists one live session per client, each with its upstream,
	// its node and its own counts, which add up to the service's.
	if got := r.relay.Sessions(); len(got) != clients {
		t.Fatalf("Sessions() = %+v, want %d", got, clients)
	} else {
		var up, down uint64
		for _, s := range got {
			if !s.Client.IsValid() || s.Upstream == "" || s.Node != "echo" || s.Started.IsZero() || s.Idle < 0 || s.Idle > ttl {
				t.Fatalf("bad session %+v", s)
			}
			if s.DatagramsUp < datagrams || s.DatagramsDown < datagrams || s.DatagramsUp > roundTripAttempts*datagrams {
				t.Errorf("session %s: %d datagrams up, %d down, want %d each (more with resends)", s.Client, s.DatagramsUp, s.DatagramsDown, datagrams)
			}
			up, down = up+s.BytesUp, down+s.BytesDown
		}
		if up != r.relay.Counts.Up.Load() || down != r.relay.Counts.Down.Load() {
			t.Errorf("sessions count %d up, %d down; the service %d and %d", up, down, r.relay.Counts.Up.Load(), r.relay.Counts.Down.Load())
		}
	}

	waitFor(t, "sessions to expire", 10*ttl, func() bool { return r.active.Load() == 0 })
	if got := r.relay.Sessions(); len(got) != 0 {
		t.Fatalf("Sessions() after expiry = %+v", got)
	}
	if got := r.closed.Load(); got != clients {
		t.Fatalf("%d upstream sockets closed after expiry, want %d", got, clients)
	}

	// A client coming back after expiry gets a fresh session.
	if err := roundTrip(r.client(t), []byte("again")); err != nil {
		t.Fatal(err)
	}
	if got := r.dials.Load(); got != clients+1 {
		t.Fatalf("%d upstream dials, want %d", got, clients+1)
	}
}

func TestUDPSessionKeptAliveByTraffic(t *testing.T) {
	const ttl = 300 * time.Millisecond
	retryIfStalled(t, ttl/3, func(t *testing.T) error {
		r := startUDP(t, ttl, 0, nil)
		c := r.client(t)
		for i := range 10 { // 10 × ttl/3 spans several TTLs
			if err := roundTrip(c, []byte{byte(i)}); err != nil {
				return err
			}
			time.Sleep(ttl / 3)
		}
		if got := r.dials.Load(); got != 1 {
			return fmt.Errorf("%d upstream dials, want 1: the session expired despite traffic", got)
		}
		// Silent for longer than TTL, the session expires on time.
		start := time.Now()
		waitFor(t, "the session to expire", testDeadline, func() bool { return r.active.Load() == 0 })
		if elapsed := time.Since(start); elapsed > 3*ttl {
			return fmt.Errorf("session expired %v after the last datagram, want about %v", elapsed, ttl)
		}
		return nil
	})
}

// TestUDPAdmitRefuses: a new client that Admit refuses opens no session
// and no upstream socket, its datagrams are dropped, the admitted client
// is still served, and every admitted session is released once, with the
// client it was admitted for.
func TestUDPAdmitRefuses(t *testing.T) {
	var admitted, refused, slots, released atomic.Int64
	slots.Store(1)
	const ttl, extra = 200 * time.Millisecond, 5
	r := startUDPWith(t, ttl, 0, nil, func(u *UDP) {
		u.Admit = func(client netip.AddrPort) (func(), bool) {
			if !client.Addr().IsLoopback() {
				t.Errorf("Admit asked for %v, not the loopback client", client)
			}
			if slots.Add(-1) < 0 {
				slots.Add(1)
				refused.Add(1)
				return nil, false
			}
			admitted.Add(1)
			return func() {
				released.Add(1)
				slots.Add(1) // what the daemon's Limit.Release does
			}, true
		}
	})
	first, second := secondClientDropped(t, r, extra)
	if refused.Load() != extra || r.dials.Load() != 1 || r.active.Load() != 1 {
		t.Fatalf("refused %d dials %d active %d, want %d, 1, 1", refused.Load(), r.dials.Load(), r.active.Load(), extra)
	}
	if err := roundTrip(first, []byte("still served")); err != nil {
		t.Fatal(err)
	}
	// Once the first session expires its slot is free again: the second
	// client gets a session.
	waitFor(t, "the first session to expire", testDeadline, func() bool { return r.active.Load() == 0 })
	if err := roundTrip(second, []byte("now admitted")); err != nil {
		t.Fatal(err)
	}
	if admitted.Load() != 2 {
		t.Fatalf("admitted %d sessions, want 2", admitted.Load())
	}
	waitFor(t, "the second session to expire", testDeadline, func() bool { return r.active.Load() == 0 })
	if released.Load() != 2 {
		t.Fatalf("released %d sessions, want 2", released.Load())
	}
}

// secondClientDropped opens a session for a first client, then sends extra
// datagrams from a second one, which the relay (at its limit) must drop.
func secondClientDropped(t *testing.T, r *udpRig, extra int) (first, second *net.UDPConn) {
	t.Helper()
	first, second = r.client(t), r.client(t)
	if err := roundTrip(first, []byte("first")); err != nil {
		t.Fatal(err)
	}
	for range extra {
		if _, err := second.Write([]byte("second")); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "datagrams beyond the session limit to be dropped", testDeadline, func() bool { return r.relay.Dropped() == uint64(extra) })
	return first, second
}

func TestUDPMaxSessionsDrops(t *testing.T) {
	r := startUDP(t, time.Minute, 1, nil)
	first, second := secondClientDropped(t, r, 5)
	if err := second.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	if n, err := second.Read(make([]byte, 64)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client beyond MaxSessions got %d bytes, err %v; want no reply", n, err)
	}
	if err := roundTrip(first, []byte("still served")); err != nil {
		t.Fatal(err)
	}
	if got := r.active.Load(); got != 1 {
		t.Fatalf("%d sessions open, want 1", got)
	}
}

func TestUDPDialFailure(t *testing.T) {
	r := startUDP(t, time.Minute, 0, func(context.Context, net.Addr) (net.Conn, error) {
		return nil, errors.New("no route to node")
	})
	c := r.client(t)
	if _, err := c.Write([]byte("lost")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the failed dial to be reported", testDeadline, func() bool {
		return r.errs.Load() == 1 && r.active.Load() == 0 && r.relay.Dropped() == 1
	})
	// The next datagram tries again with a fresh session.
	if _, err := c.Write([]byte("lost again")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the second dial to fail", testDeadline, func() bool {
		return r.errs.Load() == 2 && r.active.Load() == 0 && r.relay.Dropped() == 2
	})
	if got := r.dials.Load(); got != 2 {
		t.Fatalf("%d dials for 2 datagrams, want 2", got)
	}
}

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count fds: %v", err)
	}
	return len(entries)
}

func TestUDPServeStopsWithoutLeaks(t *testing.T) {
	tests := []struct {
		name string
		stop func(r *udpRig)
	}{
		{"ctx cancelled", func(r *udpRig) { r.cancel() }},
		{"listener closed", func(r *udpRig) { r.listener.Close() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			echo := udpEcho(t)
			goroutinesBefore, fdsBefore := runtime.NumGoroutine(), openFDs(t)

			// Everything below is created and torn down inside this
			// function so the counts can be compared afterwards.
			func() {
				r := startUDP(t, time.Minute, 0, func(ctx context.Context, _ net.Addr) (net.Conn, error) {
					var d net.Dialer
					return d.DialContext(ctx, "udp", echo.String())
				})
				clients := make([]*net.UDPConn, 4)
				for i := range clients {
					clients[i] = r.client(t)
					if err := roundTrip(clients[i], []byte{byte(i)}); err != nil {
						t.Fatal(err)
					}
				}
				if got := r.active.Load(); got != int64(len(clients)) {
					t.Fatalf("%d sessions open, want %d", got, len(clients))
				}
				tt.stop(r)
				select {
				case err := <-r.served:
					if err != nil {
						t.Fatalf("Serve returned %v, want nil", err)
					}
				case <-time.After(testDeadline):
					t.Fatal("Serve did not return")
				}
				r.served <- nil // for the rig's cleanup
				if got := r.active.Load(); got != 0 {
					t.Fatalf("%d sessions still open after Serve returned", got)
				}
				r.listener.Close()
				for _, c := range clients {
					c.Close()
				}
			}()

			waitFor(t, "goroutines to exit", testDeadline, func() bool { return runtime.NumGoroutine() <= goroutinesBefore })
			if fds := openFDs(t); fds > fdsBefore {
				t.Fatalf("%d fds open after Serve returned, %d before", fds, fdsBefore)
			}
		})
	}
}

func TestUDPRequiresConnAndDial(t *testing.T) {
	if err := (&UDP{}).Serve(t.Context()); err == nil {
		t.Fatal("Serve without Conn and Dial succeeded")
	}
}

// udpDoubleEcho is an upstream that answers every datagram twice.
func udpDoubleEcho(t *testing.T) *net.UDPAddr {
	t.Helper()
	c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen echo: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			for range 2 {
				if _, err := c.WriteToUDPAddrPort(buf[:n], from); err != nil {
					return
				}
			}
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return c.LocalAddr().(*net.UDPAddr)
}

// TestUDPOneReply: without keepAlive (GOST's default) a session ends with
// the first reply it passes on: a second reply to the same datagram does
// not reach the client, and the client's next datagram opens a new session
// with a new upstream socket.
func TestUDPOneReply(t *testing.T) {
	echo := udpDoubleEcho(t)
	var closed atomic.Int64
	dial := func(ctx context.Context, _ net.Addr) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "udp", echo.String())
		if err != nil {
			return nil, err
		}
		return &trackedConn{UDPConn: c.(*net.UDPConn), closed: &closed}, nil
	}
	r := startUDPWith(t, time.Minute, 0, dial, func(u *UDP) { u.OneReply = true })
	c := r.client(t)
	p := []byte("one question, one answer")
	if err := roundTrip(c, p); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the answered session to end", testDeadline, func() bool { return r.active.Load() == 0 && closed.Load() == 1 })
	if down := r.relay.Counts.Down.Load(); down != uint64(len(p)) {
		t.Fatalf("%d bytes passed to the client, want %d: one reply per session", down, len(p))
	}
	if err := roundTrip(c, []byte("again")); err != nil {
		t.Fatal(err)
	}
	if got := r.dials.Load(); got != 2 {
		t.Fatalf("%d upstream dials, want 2: a new session per answered datagram", got)
	}
}

// TestUDPReadSize: a client datagram longer than ReadSize is cut to it
// (GOST's readBufferSize); shorter ones pass whole.
func TestUDPReadSize(t *testing.T) {
	r := startUDPWith(t, time.Minute, 0, nil, func(u *UDP) { u.ReadSize = 100 })
	c := r.client(t)
	if err := roundTrip(c, bytes.Repeat([]byte("s"), 100)); err != nil {
		t.Fatal(err)
	}
	long := make([]byte, 300)
	for i := range long {
		long[i] = byte(i)
	}
	if _, err := c.Write(long); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, maxDatagram)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:n], long[:100]) {
		t.Fatalf("echo of a 300-byte datagram: %d bytes, want its first 100", n)
	}
}

// After StopReading (an upgrade), a session already open still gets its
// replies to the client through the listening socket, the datagrams that
// come next are left on the socket for whoever shares it, and Serve
// returns once the session expired.
func TestUDPStopReadingKeepsSessions(t *testing.T) {
	// An upstream that answers late: the reply is still on its way when
	// the relay stops reading.
	slow, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	go func() {
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := slow.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			time.Sleep(200 * time.Millisecond)
			if _, err := slow.WriteToUDPAddrPort(buf[:n], from); err != nil {
				return
			}
		}
	}()
	const ttl = 500 * time.Millisecond
	r := startUDP(t, ttl, 0, func(ctx context.Context, _ net.Addr) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "udp", slow.LocalAddr().String())
	})
	// The socket as the next process would hold it: its own descriptor,
	// its own deadlines.
	f, err := r.listener.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	next, err := net.FilePacketConn(f)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()

	c := r.client(t)
	if _, err := c.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the session to open", testDeadline, func() bool { return r.active.Load() == 1 })
	r.relay.StopReading()

	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "before" {
		t.Fatalf("reply after StopReading: %q, %v; want %q", buf[:n], err, "before")
	}
	if _, err := c.Write([]byte("after")); err != nil {
		t.Fatal(err)
	}
	next.SetReadDeadline(time.Now().Add(testDeadline))
	n, _, err = next.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "after" {
		t.Fatalf("the sharing socket read %q, %v; want the datagram sent after StopReading", buf[:n], err)
	}
	select {
	case err := <-r.served:
		r.served <- err // for the rig's cleanup
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(ttl + testDeadline):
		t.Fatal("Serve did not return after its session expired")
	}
	if got := r.dials.Load(); got != 1 {
		t.Errorf("%d upstream sockets opened, want 1 (nothing read after StopReading)", got)
	}
}
