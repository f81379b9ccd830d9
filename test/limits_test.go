package test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// limitsTopology: GOST's limiters on three services of one daemon that
// runs in $C; the targets echo in $T.
//   - conns: a climiter of 10 (GOST's YAML form);
//   - rate: 5 new connections a second (the command-line form, in
//     metadata, as `-L ...?rlimiter=5` writes it);
//   - shaped: 10 MB/s each way for the whole service.
//
// Each asks for auto, which would be tc but for its limiter.
const limitsTopology = `services:
- name: conns
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  climiter: ten
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T}
- name: rate
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, rlimiter: 5}
- name: shaped
  addr: 127.0.0.1:8002
  handler: {type: tcp}
  limiter: ten-mb
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T}
- name: sessions
  addr: 127.0.0.1:8053
  handler: {type: udp}
  listener: {type: udp, metadata: {ttl: 30s, keepAlive: true}}
  climiter: two
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9053"}]}
  metadata: {netns.out: $T}
- name: proxied
  addr: 127.0.0.1:8003
  handler: {type: tcp}
  climiter: one-each
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, proxyProtocol: 1}
limiters:
- name: ten-mb
  limits: ['$ 10MB 10MB']
climiters:
- name: ten
  limits: ['$ 10']
- name: two
  limits: ['$ 2']
- name: one-each
  limits: ['$$ 1']
metrics:
  addr: 127.0.0.1:9100
`

func TestLimiters(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-lim-c")
	tg := testutil.NewNS(t, "e2e-lim-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	e2e.UDPEchoIn(t, tg, "127.0.0.1:9053")
	d := e2e.Start(t, "limits", e2e.Config(limitsTopology, map[string]string{"T": tg.Name}), e2e.Options{In: c})
	ch := e2e.Handle(t, c)
	scraper := &http.Client{Timeout: httpTimeout, Transport: &http.Transport{DialContext: ch.Dial, DisableKeepAlives: true}}
	errorsOf := func(service, reason string) float64 {
		t.Helper()
		resp, err := scraper.Get("http://127.0.0.1:9100/metrics")
		if err != nil {
			t.Fatalf("scrape: %v", err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("scrape: %v", err)
		}
		samples, err := parseExposition(body)
		if err != nil {
			t.Fatal(err)
		}
		return value(t, samples, `ebpfwd_errors_total{service="`+service+`",reason="`+reason+`"}`)
	}

	t.Run("climiter admits 10 and resets the 11th", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		// Each held connection proves it was admitted with one echo.
		for i := range 10 {
			conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
			if err != nil {
				t.Fatal(err)
			}
			held = append(held, conn)
			if err := echoOnce(conn, "held"); err != nil {
				t.Fatalf("connection %d of 10: %v", i+1, err)
			}
		}
		extra, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
		if err == nil { // else reset at accept before connect returned
			err = echoOnce(extra, "one too many")
			extra.Close()
		}
		if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the 11th connection: %v, want a reset", err)
		}
		if v := errorsOf("conns", "conn_limit"); v != 1 {
			t.Errorf("conn_limit errors = %v, want 1", v)
		}
		// One of the ten leaves: a new one gets its place, byte-exact.
		held[0].Close()
		held = held[1:]
		deadline := time.Now().Add(settleTimeout)
		for {
			err := e2e.Exchange(t, c, "127.0.0.1:8000", 256<<10, trafficTimeout)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no place freed after a connection closed: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("rlimiter admits a burst of 5 a second", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		const tries = 20
		admitted := 0
		for range tries {
			conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8001")
			if errors.Is(err, syscall.ECONNRESET) {
				// Reset at accept before connect returned: refused.
				continue
			}
			if err != nil {
				t.Fatal(err)
			}
			if echoOnce(conn, "rate") == nil {
				admitted++
			}
			conn.Close()
		}
		// The bucket holds 5 and refills 5 a second: 5 plus what the
		// time the dials took let in.
		refused := errorsOf("rate", "rate_limit")
		t.Logf("%d of %d admitted, %v refused", admitted, tries, refused)
		if admitted < 5 || admitted >= tries || float64(tries-admitted) != refused {
			t.Errorf("%d admitted and %v refused of %d, want at least 5 admitted and the rest counted as rate_limit", admitted, refused, tries)
		}
	})

	t.Run("10 MB/s each way holds within 10% over 5s", func(t *testing.T) {
		const limit = 10 << 20 // GOST's MB is base 2
		const size = 5 * limit
		start := time.Now()
		if err := e2e.Exchange(t, c, "127.0.0.1:8002", size, 60*time.Second); err != nil {
			t.Fatal(err)
		}
		elapsed := time.Since(start)
		// Both directions at once: each moves size bytes at the limit.
		rate := float64(size) / elapsed.Seconds()
		t.Logf("%d MiB each way in %v: %.2f MiB/s", size>>20, elapsed, rate/(1<<20))
		if rate > 1.1*limit || rate < 0.9*limit {
			t.Errorf("moved %.2f MiB/s each way under a 10 MiB/s limit, want within 10%%", rate/(1<<20))
		}
	})

	t.Run("climiter bounds udp sessions", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		// Two sessions (two source ports) are served and stay (ttl 30s);
		// a third client's datagrams are dropped and counted.
		for i := range 2 {
			conn, err := e2e.DialFrom(ctx, t, c, "udp", "127.0.0.1:8053")
			if err != nil {
				t.Fatal(err)
			}
			if err := peer.UDPExchange(ctx, conn, 3, 256); err != nil {
				t.Fatalf("session %d of 2: %v", i+1, err)
			}
		}
		third, err := e2e.DialFrom(ctx, t, c, "udp", "127.0.0.1:8053")
		if err != nil {
			t.Fatal(err)
		}
		short, stop := context.WithTimeout(ctx, 2*time.Second)
		defer stop()
		if err := peer.UDPExchange(short, third, 1, 64); err == nil {
			t.Fatal("a third udp session was served beyond a climiter of 2")
		}
		if v := errorsOf("sessions", "conn_limit"); v < 1 {
			t.Errorf("conn_limit errors = %v, want the third client's datagrams counted", v)
		}
	})

	t.Run("climiter counts the client a PROXY header names", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		open := func(src string) (net.Conn, error) {
			conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8003")
			if err != nil {
				return nil, err
			}
			if _, err := conn.Write([]byte("PROXY TCP4 " + src + " 127.0.0.1 40000 8003\r\n")); err != nil {
				conn.Close()
				return nil, err
			}
			return conn, echoOnce(conn, "proxied")
		}
		// One connection each for two real clients behind one proxy...
		a, err := open("192.0.2.1")
		if err != nil {
			t.Fatalf("first client: %v", err)
		}
		defer a.Close()
		b, err := open("192.0.2.2")
		if err != nil {
			t.Fatalf("second client, same proxy address: %v", err)
		}
		defer b.Close()
		// ...and the first client's second one is refused.
		if again, err := open("192.0.2.1"); err == nil {
			again.Close()
			t.Fatal("a second connection of 192.0.2.1 was admitted under '$$ 1'")
		}
		if v := errorsOf("proxied", "conn_limit"); v != 1 {
			t.Errorf("conn_limit errors = %v, want 1", v)
		}
	})

	// auto passed tc over, saying why.
	for _, svc := range []string{"conns", "rate", "shaped", "sessions"} {
		line := d.WaitLog(t, 5*time.Second, "service started", "service="+svc+" ")
		if !strings.Contains(line, "userspace") || !strings.Contains(line, "does not enforce GOST limiters") {
			t.Errorf("service %s: %s", svc, line)
		}
	}
}

// echoOnce writes msg and reads it back within a few seconds.
func echoOnce(conn net.Conn, msg string) error {
	_ = conn.SetDeadline(time.Now().Add(3 * time.Second))
	defer conn.SetDeadline(time.Time{})
	if _, err := conn.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return errors.New("echo corrupted")
	}
	return nil
}

func value(t *testing.T, samples model.Vector, selector string) float64 {
	t.Helper()
	v, ok := sumMatching(samples, selector)
	if !ok {
		t.Fatalf("no series %s", selector)
	}
	return v
}
