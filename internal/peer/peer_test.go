package peer

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

func listenLoopback(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	return l
}

func startEcho(t *testing.T) string {
	t.Helper()
	l := listenLoopback(t)
	stop := ServeEcho(l)
	t.Cleanup(stop)
	return l.Addr().String()
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	return c
}

func TestExchange(t *testing.T) {
	addr := startEcho(t)
	for _, n := range []int{0, 1, TrailerSize, chunkSize - 1, chunkSize + 1, 1 << 20} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := Exchange(ctx, dial(t, addr), n)
		cancel()
		if err != nil {
			t.Errorf("Exchange(%d): %v", n, err)
		}
	}
}

func TestExchangeConcurrent(t *testing.T) {
	addr := startEcho(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() { errs <- Exchange(ctx, dial(t, addr), 256<<10) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// transform rewrites a chunk of one direction of a middlebox stream; off is
// the stream offset of b[0]. Returning stop=true ends that direction after
// the returned bytes are written.
type transform func(off int64, b []byte) (out []byte, stop bool)

// middlebox forwards between clients and target, applying up to the
// client->server stream and down to the server->client stream. It
// propagates half-close so that an unmodified middlebox is transparent.
func middlebox(t *testing.T, target string, up, down transform) string {
	t.Helper()
	l := listenLoopback(t)
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s, err := net.DialTimeout("tcp", target, 5*time.Second)
			if err != nil {
				c.Close()
				return
			}
			var pair sync.WaitGroup
			pair.Go(func() { pipe(s, c, up) })
			pair.Go(func() { pipe(c, s, down) })
			wg.Go(func() {
				pair.Wait()
				c.Close()
				s.Close()
			})
		}
	})
	return l.Addr().String()
}

func pipe(dst, src net.Conn, tf transform) {
	buf := make([]byte, 4096)
	var off int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			out, stop := buf[:n], false
			if tf != nil {
				out, stop = tf(off, buf[:n])
			}
			off += int64(n)
			if _, werr := dst.Write(out); werr != nil || stop {
				break
			}
		}
		if err != nil {
			break
		}
	}
	_ = dst.(*net.TCPConn).CloseWrite()
}

// flipAt flips the bits of the byte at stream offset at.
func flipAt(at int64) transform {
	return func(off int64, b []byte) ([]byte, bool) {
		if at >= off && at < off+int64(len(b)) {
			b[at-off] ^= 0xff
		}
		return b, false
	}
}

// truncateAt ends the stream after at bytes.
func truncateAt(at int64) transform {
	return func(off int64, b []byte) ([]byte, bool) {
		if off+int64(len(b)) >= at {
			return b[:at-off], true
		}
		return b, false
	}
}

// duplicateAt sends the chunk containing offset at twice.
func duplicateAt(at int64) transform {
	return func(off int64, b []byte) ([]byte, bool) {
		if at >= off && at < off+int64(len(b)) {
			return append(append([]byte{}, b...), b...), false
		}
		return b, false
	}
}

func TestExchangeDetectsTampering(t *testing.T) {
	const n = 100000
	tests := []struct {
		name     string
		up, down transform
		want     []string // substrings the error must contain
		notWant  []string
	}{
		{
			name: "byte flipped on the way to the server",
			up:   flipAt(12345),
			want: []string{"offset 12345", "corrupted on the way to the server", "echo SHA-256"},
		},
		{
			name:    "byte flipped on the way back",
			down:    flipAt(54321),
			want:    []string{"offset 54321", "echo SHA-256"},
			notWant: []string{"on the way to the server", "received"},
		},
		{
			name:    "trailer corrupted",
			down:    flipAt(n + 3),
			want:    []string{"server-side SHA-256"},
			notWant: []string{"echo SHA-256", "offset"},
		},
		{
			name: "echo truncated",
			down: truncateAt(70000),
			want: []string{"received 70000 bytes, want 100032", "trailer is 0 bytes"},
		},
		{
			name: "request truncated",
			up:   truncateAt(n / 2),
			want: []string{"received 50032 bytes"},
		},
		{
			name: "chunk duplicated on the way back",
			down: duplicateAt(8192),
			want: []string{"received", "offset"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			addr := middlebox(t, startEcho(t), tc.up, tc.down)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := Exchange(ctx, dial(t, addr), n)
			if err == nil {
				t.Fatal("Exchange succeeded through a tampering middlebox")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			for _, w := range tc.notWant {
				if strings.Contains(err.Error(), w) {
					t.Errorf("error %q unexpectedly contains %q", err, w)
				}
			}
		})
	}
}

func TestExchangeTransparentMiddlebox(t *testing.T) {
	addr := middlebox(t, startEcho(t), nil, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Exchange(ctx, dial(t, addr), 300000); err != nil {
		t.Fatalf("Exchange through a transparent middlebox: %v", err)
	}
}

// TestExchangeBoundedByContext: a server that accepts but never answers
// must not hang the client past its context.
func TestExchangeBoundedByContext(t *testing.T) {
	l := listenLoopback(t)
	defer l.Close()
	held := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			held <- c
		}
	}()
	t.Cleanup(func() {
		select {
		case c := <-held:
			c.Close()
		default:
		}
	})
	for _, withDeadline := range []bool{true, false} {
		var ctx context.Context
		var cancel context.CancelFunc
		if withDeadline {
			ctx, cancel = context.WithTimeout(context.Background(), 300*time.Millisecond)
		} else {
			ctx, cancel = context.WithCancel(context.Background())
			time.AfterFunc(300*time.Millisecond, cancel)
		}
		start := time.Now()
		// Small enough to fit in socket buffers: the block is on reading.
		err := Exchange(ctx, dial(t, l.Addr().String()), 1000)
		cancel()
		if err == nil {
			t.Fatal("Exchange with a silent server succeeded")
		}
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
			t.Errorf("error %v does not wrap the context error", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("Exchange took %v after its context ended", d)
		}
	}
}

func TestExchangeNeedsHalfClose(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := Exchange(ctx, a, 10); err == nil || !strings.Contains(err.Error(), "half-close") {
		t.Fatalf("Exchange over net.Pipe: %v, want half-close error", err)
	}
}

// TestServeEchoStopClosesInFlight: stop must not wait for a client that
// never half-closes.
func TestServeEchoStopClosesInFlight(t *testing.T) {
	l := listenLoopback(t)
	stop := ServeEcho(l)
	c := dial(t, l.Addr().String())
	defer c.Close()
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 5)); err != nil {
		t.Fatalf("echo before stop: %v", err)
	}
	done := make(chan struct{})
	go func() { stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("stop did not return with a connection in flight")
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after stop")
	}
	if _, err := net.DialTimeout("tcp", l.Addr().String(), time.Second); err == nil {
		t.Error("listener still accepting after stop")
	}
	stop() // idempotent
}

// udpMiddlebox relays datagrams between one client and target, letting
// onReply decide what the client gets for each reply (nil drops it).
func udpMiddlebox(t *testing.T, target string, onReply func(i int, b []byte) [][]byte) string {
	t.Helper()
	front, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	back, err := net.Dial("udp", target)
	if err != nil {
		t.Fatal(err)
	}
	var client net.Addr
	var mu sync.Mutex
	var wg sync.WaitGroup
	t.Cleanup(func() { front.Close(); back.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := front.ReadFrom(buf)
			if err != nil {
				return
			}
			mu.Lock()
			client = from
			mu.Unlock()
			_, _ = back.Write(buf[:n])
		}
	})
	wg.Go(func() {
		buf := make([]byte, maxDatagram)
		for i := 0; ; i++ {
			n, err := back.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			to := client
			mu.Unlock()
			for _, out := range onReply(i, append([]byte{}, buf[:n]...)) {
				_, _ = front.WriteTo(out, to)
			}
		}
	})
	return front.LocalAddr().String()
}

func startUDPEcho(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ServeUDPEcho(pc))
	return pc.LocalAddr().String()
}

func dialUDP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestUDPExchange(t *testing.T) {
	tests := []struct {
		name    string
		onReply func(i int, b []byte) [][]byte // nil: talk to the echo directly
		wantErr string
	}{
		{name: "direct"},
		{
			name:    "transparent",
			onReply: func(_ int, b []byte) [][]byte { return [][]byte{b} },
		},
		{
			name: "duplicated replies are skipped",
			onReply: func(_ int, b []byte) [][]byte {
				return [][]byte{b, b}
			},
		},
		{
			name: "lost replies are retried",
			onReply: func(i int, b []byte) [][]byte {
				if i%10 == 3 {
					return nil
				}
				return [][]byte{b}
			},
		},
		{
			name: "corrupted reply",
			onReply: func(i int, b []byte) [][]byte {
				if i == 5 {
					b[len(b)-1] ^= 1
				}
				return [][]byte{b}
			},
			wantErr: "datagram 6/50",
		},
		{
			name: "truncated reply",
			onReply: func(i int, b []byte) [][]byte {
				if i == 7 && len(b) > 1 {
					b = b[:len(b)-1]
				}
				return [][]byte{b}
			},
			wantErr: "does not match",
		},
		{
			name:    "black hole",
			onReply: func(int, []byte) [][]byte { return nil },
			wantErr: "no reply after 4 attempts",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr := startUDPEcho(t)
			if tc.onReply != nil {
				addr = udpMiddlebox(t, addr, tc.onReply)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := UDPExchange(ctx, dialUDP(t, addr), 50, 1400)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("UDPExchange: %v", err)
			case tc.wantErr != "" && err == nil:
				t.Fatalf("UDPExchange succeeded, want error containing %q", tc.wantErr)
			case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("UDPExchange error %q, want it to contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestUDPExchangeBoundedByContext(t *testing.T) {
	addr := udpMiddlebox(t, startUDPEcho(t), func(int, []byte) [][]byte { return nil })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := UDPExchange(ctx, dialUDP(t, addr), 10, 100)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("UDPExchange = %v, want context deadline error", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("UDPExchange took %v with a 200ms context", d)
	}
}

func TestUDPExchangeInvalidArgs(t *testing.T) {
	for _, tc := range []struct{ count, size int }{{-1, 10}, {1, 0}, {1, maxDatagram + 1}} {
		if err := UDPExchange(context.Background(), dialUDP(t, "127.0.0.1:9"), tc.count, tc.size); err == nil {
			t.Errorf("UDPExchange(count=%d, size=%d) succeeded", tc.count, tc.size)
		}
	}
}

func TestDatagramSizesCoverRange(t *testing.T) {
	var salt [32]byte
	seen := make(map[int]bool)
	for seq := range uint32(200) {
		n := len(datagram(salt, seq, 50))
		if n < 1 || n > 50 {
			t.Fatalf("datagram %d has %d bytes, want 1..50", seq, n)
		}
		seen[n] = true
	}
	if n := len(datagram(salt, 0, 50)); n != 50 {
		t.Errorf("the first datagram has %d bytes, want the full size 50", n)
	}
	if len(seen) != 50 {
		t.Errorf("200 datagrams covered %d of 50 sizes", len(seen))
	}
}
