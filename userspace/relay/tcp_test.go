package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"
)

// testDeadline bounds every blocking step of a test.
const testDeadline = 20 * time.Second

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	if err := ln.SetDeadline(time.Now().Add(testDeadline)); err != nil {
		t.Fatal(err)
	}
	type result struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- result{c, err}
	}()
	dialed, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	r := <-ch
	if r.err != nil {
		t.Fatalf("accept: %v", r.err)
	}
	accepted = r.c
	for _, c := range []*net.TCPConn{dialed, accepted} {
		if err := c.SetDeadline(time.Now().Add(testDeadline)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	return dialed, accepted
}

// relayRig is a client application and an upstream server application
// joined by TCP() over two loopback connections:
//
//	app ⇄ relayClient —TCP()— relayUpstream ⇄ server
type relayRig struct {
	app, server                *net.TCPConn
	relayClient, relayUpstream *net.TCPConn
	counts                     Counts
	done                       chan error
}

func startRelay(t testing.TB, ctx context.Context, idle time.Duration, wrap func(client, upstream net.Conn) (net.Conn, net.Conn)) *relayRig {
	t.Helper()
	return startRelayCrediting(t, ctx, idle, wrap, nil)
}

// startRelayCrediting is startRelay with the connection's counts also
// credited to total.
func startRelayCrediting(t testing.TB, ctx context.Context, idle time.Duration, wrap func(client, upstream net.Conn) (net.Conn, net.Conn), total *Counts) *relayRig {
	t.Helper()
	r := &relayRig{done: make(chan error, 1)}
	r.counts.Total = total
	r.app, r.relayClient = tcpPair(t)
	r.relayUpstream, r.server = tcpPair(t)
	var client, upstream net.Conn = r.relayClient, r.relayUpstream
	if wrap != nil {
		client, upstream = wrap(client, upstream)
	}
	go func() { r.done <- TCP(ctx, client, upstream, idle, &r.counts) }()
	return r
}

func (r *relayRig) wait(t testing.TB) error {
	t.Helper()
	select {
	case err := <-r.done:
		return err
	case <-time.After(testDeadline):
		t.Fatal("relay did not return")
		return nil
	}
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// exchange writes out then half-closes c while reading c to EOF, and returns
// the SHA-256 of what it read.
func exchange(c *net.TCPConn, out []byte) ([32]byte, error) {
	return exchangeMessages(c, [][]byte{out}, 0)
}

// exchangeMessages is exchange with out written as separate messages, with
// a pause after each.
func exchangeMessages(c *net.TCPConn, msgs [][]byte, pause time.Duration) ([32]byte, error) {
	var (
		wg       sync.WaitGroup
		writeErr error
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, m := range msgs {
			if _, writeErr = c.Write(m); writeErr != nil {
				return
			}
			time.Sleep(pause)
		}
		writeErr = c.CloseWrite()
	}()
	h := sha256.New()
	_, readErr := io.Copy(h, c)
	wg.Wait()
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, errors.Join(writeErr, readErr)
}

func TestTCPConcurrentBulk(t *testing.T) {
	const (
		conns = 16
		size  = 1 << 20
	)
	var counts Counts
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		rig := startRelayCrediting(t, t.Context(), 0, nil, &counts)
		up, down := randomBytes(t, size), randomBytes(t, size)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var (
				inner                sync.WaitGroup
				gotUp, gotDown       [32]byte
				serverErr, clientErr error
			)
			inner.Add(1)
			go func() {
				defer inner.Done()
				gotUp, serverErr = exchange(rig.server, down)
			}()
			gotDown, clientErr = exchange(rig.app, up)
			inner.Wait()
			relayErr := <-rig.done
			switch {
			case serverErr != nil || clientErr != nil || relayErr != nil:
				errs <- fmt.Errorf("conn %d: server %v, client %v, relay %v", i, serverErr, clientErr, relayErr)
			case gotUp != sha256.Sum256(up):
				errs <- fmt.Errorf("conn %d: client→upstream bytes corrupted", i)
			case gotDown != sha256.Sum256(down):
				errs <- fmt.Errorf("conn %d: upstream→client bytes corrupted", i)
			case rig.counts.Up.Load() != size || rig.counts.Down.Load() != size:
				errs <- fmt.Errorf("conn %d: counted up %d down %d, want %d each", i, rig.counts.Up.Load(), rig.counts.Down.Load(), size)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Every connection credited the shared total as well as its own counts.
	if counts.Up.Load() != conns*size || counts.Down.Load() != conns*size {
		t.Errorf("total counted up %d down %d, want %d each", counts.Up.Load(), counts.Down.Load(), conns*size)
	}
}

func TestTCPHalfClose(t *testing.T) {
	tests := []struct {
		name             string
		request, replyNo int
	}{
		{"small request and reply", 5, 7},
		{"empty request", 0, 1024},
		{"reply larger than a chunk", 100, 3*chunkSize + 17},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rig := startRelay(t, t.Context(), 0, nil)
			request, reply := randomBytes(t, tt.request), randomBytes(t, tt.replyNo)

			serverErr := make(chan error, 1)
			go func() {
				// The server only answers after the client's EOF reached it:
				// that is the half-close the relay must propagate.
				got, err := io.ReadAll(rig.server)
				if err == nil && !bytes.Equal(got, request) {
					err = fmt.Errorf("server read %d bytes, want the %d-byte request", len(got), len(request))
				}
				if err == nil {
					_, err = rig.server.Write(reply)
				}
				serverErr <- errors.Join(err, rig.server.Close())
			}()

			if _, err := rig.app.Write(request); err != nil {
				t.Fatal(err)
			}
			if err := rig.app.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rig.app)
			if err != nil {
				t.Fatalf("client read: %v", err)
			}
			if !bytes.Equal(got, reply) {
				t.Fatalf("client got %d bytes, want the %d-byte reply", len(got), len(reply))
			}
			if err := <-serverErr; err != nil {
				t.Fatalf("server: %v", err)
			}
			if err := rig.wait(t); err != nil {
				t.Fatalf("relay: %v", err)
			}
			if up, down := rig.counts.Up.Load(), rig.counts.Down.Load(); up != uint64(len(request)) || down != uint64(len(reply)) {
				t.Fatalf("counted up %d down %d, want %d and %d", up, down, len(request), len(reply))
			}
		})
	}
}

func TestTCPResetAbortsBoth(t *testing.T) {
	rig := startRelay(t, t.Context(), 0, nil)
	// Move some bytes first so the reset lands on an established relay.
	if _, err := rig.app.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(rig.server, buf); err != nil {
		t.Fatal(err)
	}
	if err := rig.server.SetLinger(0); err != nil {
		t.Fatal(err)
	}
	if err := rig.server.Close(); err != nil {
		t.Fatal(err)
	}

	err := rig.wait(t)
	if err == nil || errors.Is(err, ErrIdleTimeout) {
		t.Fatalf("relay returned %v, want a reset error", err)
	}
	// The client must see its connection end (reset or EOF), not hang.
	if n, rerr := rig.app.Read(buf); rerr == nil {
		t.Fatalf("client read %d bytes after upstream reset, want the connection closed", n)
	}
}

func TestTCPIdleTimeout(t *testing.T) {
	const idle = 200 * time.Millisecond
	trickle := make([]time.Duration, 20) // a byte every 100ms for 2s
	for i := range trickle {
		trickle[i] = time.Duration(i+1) * 100 * time.Millisecond
	}
	tests := []struct {
		name string
		// writes are offsets from the relay's start at which one side sends
		// a byte; fromServer picks the upstream side instead of the client.
		writes     []time.Duration
		fromServer bool
	}{
		{name: "silent connection times out"},
		{name: "client→upstream trickle keeps it open", writes: trickle},
		{name: "upstream→client trickle keeps it open", writes: trickle, fromServer: true},
		// A byte just before idle elapses must count even though the
		// direction that moved it has not finished its read window yet.
		{name: "late byte resets the idle clock", writes: []time.Duration{idle - 15*time.Millisecond}},
		{name: "late byte upstream resets the idle clock", writes: []time.Duration{idle - 15*time.Millisecond}, fromServer: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			retryIfStalled(t, idle/4, func(t *testing.T) error {
				return idleAttempt(t, idle, tt.writes, tt.fromServer)
			})
		})
	}
}

// idleAttempt runs one relay with the given idle timeout while one side
// writes a byte at each offset in writes, and checks that the relay stays up
// until idle after the last byte and then ends with ErrIdleTimeout.
func idleAttempt(t *testing.T, idle time.Duration, writes []time.Duration, fromServer bool) error {
	rig := startRelay(t, t.Context(), idle, nil)
	start := time.Now()
	writer, reader := rig.app, rig.server
	if fromServer {
		writer, reader = rig.server, rig.app
	}
	go func() {
		for _, at := range writes {
			time.Sleep(time.Until(start.Add(at)))
			if _, err := writer.Write([]byte{'x'}); err != nil {
				return
			}
		}
	}()
	if len(writes) > 0 {
		got := make([]byte, len(writes))
		if _, err := io.ReadFull(reader, got); err != nil {
			return fmt.Errorf("writes stopped arriving after %v: %w", time.Since(start), err)
		}
		// Half the idle time after the last byte the relay must still be up.
		last := start.Add(writes[len(writes)-1])
		time.Sleep(time.Until(last.Add(idle / 2)))
		select {
		case err := <-rig.done:
			return fmt.Errorf("relay ended %v after the last byte, before idle %v: %w", time.Since(last), idle, err)
		default:
		}
		start = last
	}
	// Then the connection goes idle for real.
	err := rig.wait(t)
	if !errors.Is(err, ErrIdleTimeout) {
		return fmt.Errorf("relay returned %v, want ErrIdleTimeout", err)
	}
	if elapsed := time.Since(start); elapsed < idle || elapsed > 4*idle {
		return fmt.Errorf("idle timeout fired %v after the last activity, want about %v", elapsed, idle)
	}
	return nil
}

func TestTCPContextCancelClosesBoth(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	rig := startRelay(t, ctx, 0, nil)
	cancel()
	if err := rig.wait(t); !errors.Is(err, context.Canceled) {
		t.Fatalf("relay returned %v, want context.Canceled", err)
	}
	buf := make([]byte, 1)
	for name, c := range map[string]*net.TCPConn{"client": rig.app, "server": rig.server} {
		if _, err := c.Read(buf); err == nil {
			t.Fatalf("%s connection still open after cancel", name)
		}
	}
}

// tunnelConn is a proxy connection that read past its handshake.
type tunnelConn struct {
	net.Conn
	pending []byte
}

func (c *tunnelConn) Pending() []byte   { return c.pending }
func (c *tunnelConn) NetConn() net.Conn { return c.Conn }
func (c *tunnelConn) Write([]byte) (int, error) {
	return 0, errors.New("relay must write to NetConn, not the tunnel")
}

func TestTCPPendingBytesGoFirst(t *testing.T) {
	tests := []struct {
		name       string
		wrapClient bool
	}{
		{"client tunnel", true},
		{"upstream tunnel", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pending := []byte("read-ahead:")
			rig := startRelay(t, t.Context(), 0, func(client, upstream net.Conn) (net.Conn, net.Conn) {
				if tt.wrapClient {
					return &tunnelConn{Conn: client, pending: pending}, upstream
				}
				return client, &tunnelConn{Conn: upstream, pending: pending}
			})
			// The peer that sends through the tunnel writes after the
			// pending bytes; its receiver must see pending first.
			sender, receiver := rig.app, rig.server
			if !tt.wrapClient {
				sender, receiver = rig.server, rig.app
			}
			if _, err := sender.Write([]byte("live")); err != nil {
				t.Fatal(err)
			}
			if err := sender.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(receiver)
			if err != nil {
				t.Fatal(err)
			}
			if want := "read-ahead:live"; string(got) != want {
				t.Fatalf("receiver got %q, want %q", got, want)
			}
			if err := receiver.Close(); err != nil {
				t.Fatal(err)
			}
			if err := rig.wait(t); err != nil {
				t.Fatalf("relay: %v", err)
			}
		})
	}
}

// TestTCPMixedMessageSizes: a direction reads small messages into a buffer
// and splices bulk transfers, switching between the two as the traffic
// changes; every byte arrives, in order, both ways at once.
func TestTCPMixedMessageSizes(t *testing.T) {
	sizes := []int{1, 64, bufferSize - 1, bufferSize, bufferSize + 1, 3 << 20, 10, 100_000, 1, 5 << 20, 64, 3}
	rig := startRelay(t, t.Context(), 0, nil)
	type result struct {
		sum [32]byte
		err error
	}
	send := func(c *net.TCPConn) ([32]byte, chan result) {
		var all bytes.Buffer
		msgs := make([][]byte, len(sizes))
		for i, n := range sizes {
			msgs[i] = randomBytes(t, n)
			all.Write(msgs[i])
		}
		got := make(chan result, 1)
		go func() {
			// A pause lets the relay see each message on its own.
			sum, err := exchangeMessages(c, msgs, 2*time.Millisecond)
			got <- result{sum, err}
		}()
		return sha256.Sum256(all.Bytes()), got
	}
	upSum, appRead := send(rig.app) // the app sends up and reads what comes down
	downSum, serverRead := send(rig.server)
	app, server := <-appRead, <-serverRead
	if app.err != nil || server.err != nil {
		t.Fatalf("exchange: app %v, server %v", app.err, server.err)
	}
	if app.sum != downSum {
		t.Error("upstream→client bytes differ from what the server sent")
	}
	if server.sum != upSum {
		t.Error("client→upstream bytes differ from what the app sent")
	}
	if err := rig.wait(t); err != nil {
		t.Fatalf("relay: %v", err)
	}
	total := 0
	for _, n := range sizes {
		total += n
	}
	if up, down := rig.counts.Up.Load(), rig.counts.Down.Load(); up != uint64(total) || down != uint64(total) {
		t.Errorf("counted %d up, %d down; want %d each", up, down, total)
	}
}

func TestSplices(t *testing.T) {
	a, b := tcpPair(t)
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	tests := []struct {
		name     string
		src, dst net.Conn
		want     bool
	}{
		{"tcp to tcp", a, b, true},
		{"pipe to tcp", p1, b, false},
		{"tcp to pipe", a, p2, false},
		{"tunnel wrapper to tcp", &tunnelConn{Conn: a}, b, false},
	}
	for _, tt := range tests {
		if got := splices(tt.src, tt.dst); got != tt.want {
			t.Errorf("%s: splices = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// BenchmarkTCPRelay measures one relayed loopback connection moving 1 MiB
// chunks client→upstream.
func BenchmarkTCPRelay(b *testing.B) {
	rig := startRelay(b, b.Context(), 0, nil)
	for _, c := range []*net.TCPConn{rig.app, rig.server} {
		if err := c.SetDeadline(time.Time{}); err != nil {
			b.Fatal(err)
		}
	}
	chunk := randomBytes(b, 1<<20)
	drained := make(chan int64, 1)
	go func() {
		n, _ := io.Copy(io.Discard, rig.server)
		drained <- n
	}()
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		if _, err := rig.app.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	if err := rig.app.CloseWrite(); err != nil {
		b.Fatal(err)
	}
	if n := <-drained; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("upstream received %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
	}
	b.StopTimer()
	rig.server.Close()
	if err := rig.wait(b); err != nil {
		b.Fatalf("relay: %v", err)
	}
}

// TestTCPCountsStayLive: bytes of a connection that moves less than a
// chunk are counted within about liveCountWindow, not only at its end.
func TestTCPCountsStayLive(t *testing.T) {
	rig := startRelay(t, t.Context(), 0, nil)
	if _, err := rig.app.Write([]byte("0123456789")); err != nil {
		t.Fatal(err)
	}
	rig.server.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(rig.server, make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * liveCountWindow)
	for rig.counts.Up.Load() != 10 {
		if time.Now().After(deadline) {
			t.Fatalf("counted %d bytes up after %v, want 10 while the connection is open", rig.counts.Up.Load(), 3*liveCountWindow)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rig.app.Close()
	rig.server.Close()
	rig.wait(t)
}

// TestIdleRelayHoldsNoPipes: once a connection goes quiet its relay holds
// only the sockets, not a splice pipe per direction (four more fds), which
// would cap a daemon at a third of the connections its fd limit allows.
func TestIdleRelayHoldsNoPipes(t *testing.T) {
	countFDs := func() int {
		// Pipes returned to Go's splice pool close when it is collected.
		runtime.GC()
		runtime.GC()
		entries, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	const relays = 20
	before := countFDs()
	for range relays {
		rig := startRelay(t, t.Context(), 0, nil)
		// More than a read buffer each way, so both directions splice.
		burst := make([]byte, 4*bufferSize)
		for _, p := range [][2]*net.TCPConn{{rig.app, rig.server}, {rig.server, rig.app}} {
			if _, err := p[0].Write(burst); err != nil {
				t.Fatal(err)
			}
			p[1].SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(p[1], make([]byte, len(burst))); err != nil {
				t.Fatal(err)
			}
		}
		t.Cleanup(func() { rig.app.Close(); rig.server.Close(); rig.wait(t) })
	}
	// A splice call in progress returns at its read deadline; the pipe it
	// borrowed goes back to Go's pool, whose pipes a finalizer closes some
	// time after a GC. So poll, bounded: pipes a relay still holds never go.
	const socketsPerRelay = 4 // app, server and the relay's two ends, all in this process
	limit := relays*socketsPerRelay + 4
	deadline := time.Now().Add(liveCountWindow + 5*time.Second)
	for {
		got := countFDs() - before
		if got <= limit {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d idle relays hold %d fds, want at most %d (sockets only)", relays, got, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
