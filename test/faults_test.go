package test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/model"

	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

// The faults of issue #12 that the other end-to-end tests did not cover,
// each checked for what docs/RELIABILITY.md's fault matrix lists: the
// affected connection closed cleanly (an error or a close, never a hang,
// never bytes that were not sent), a log line, a counted reason in the
// metrics, and every other connection unharmed and byte-exact.

// metricsIn scrapes the /metrics of a daemon running inside ns (at addr
// there).
func metricsIn(t *testing.T, ns *topo.NS, addr string) func() (model.Vector, error) {
	t.Helper()
	h := e2e.Handle(t, ns)
	client := &http.Client{Timeout: httpTimeout, Transport: &http.Transport{DialContext: h.Dial, DisableKeepAlives: true}}
	return func() (model.Vector, error) {
		resp, err := client.Get("http://" + addr + "/metrics")
		if err != nil {
			return nil, fmt.Errorf("scrape %s in %s: %w", addr, ns.Name, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("scrape %s in %s: status %d, read: %v", addr, ns.Name, resp.StatusCode, err)
		}
		return parseExposition(body)
	}
}

// waitCount waits up to settleTimeout until the series selector sums to
// at least want (a stream's failure is counted when its relay returns,
// just after the client saw it end) and returns the sum.
func waitCount(t *testing.T, scrape func() (model.Vector, error), selector string, want float64) float64 {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for {
		samples, err := scrape()
		v, ok := sumMatching(samples, selector)
		if err == nil && ok && v >= want {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v (present %v, scrape error %v) after %v, want >= %v", selector, v, ok, err, settleTimeout, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// resetAfter serves a target that echoes the first n bytes of a
// connection and then resets it (SO_LINGER 0), as a crashing or
// overloaded backend does in the middle of a stream.
func resetAfter(n int) func(ctx context.Context, c net.Conn) {
	return func(ctx context.Context, c net.Conn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(trafficTimeout))
		buf := make([]byte, n)
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
		_ = c.(*net.TCPConn).SetLinger(0)
	}
}

// TestTargetFaults: a service whose only node refuses (nothing listens),
// one whose node never answers a SYN (its packets vanish inside the
// target namespace), and one whose node resets each stream after echoing
// its first 16 KiB. A client of the first two is closed without a byte,
// at once for the refusal and at the daemon's dial bound (10s) for the
// black hole, and the daemon logs the failed dial with its reason; a
// client of the third gets its 16 KiB intact and then a reset, not a clean
// end that would pass a cut stream off as complete, and the daemon logs
// the stream's end. Each is counted by reason, and a connection held open
// on a fourth service, and new ones there, go on byte-exact.
func TestTargetFaults(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	const prefix = 16 << 10
	c := testutil.NewNS(t, "e2e-tgtf-c")
	tg := testutil.NewNS(t, "e2e-tgtf-t")
	blackholeIn(t, tg)
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	ln, err := e2e.Handle(t, tg).Listen(context.Background(), "tcp", "127.0.0.1:9001")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, resetAfter(prefix))
	yaml := e2e.Config(`services:
- name: steady
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, datapath: userspace}
- name: refusing
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: closed, addr: "127.0.0.1:9009"}]}
  metadata: {netns.out: $T, datapath: userspace}
- name: blackholed
  addr: 127.0.0.1:8002
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: silent, addr: "198.51.100.2:80"}]}
  metadata: {netns.out: $T, datapath: userspace}
- name: resetting
  addr: 127.0.0.1:8003
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: flaky, addr: "127.0.0.1:9001"}]}
  metadata: {netns.out: $T, datapath: userspace}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"T": tg.Name})
	d := e2e.Start(t, "target-faults", yaml, e2e.Options{In: c})
	scrape := metricsIn(t, c, "127.0.0.1:9100")
	held := holdConn(t, c, "127.0.0.1:8000")
	t.Run("faults", func(t *testing.T) {
		for _, tc := range []struct {
			service, addr, reason string
			wait                  time.Duration // how long the close may take
		}{
			{"refusing", "127.0.0.1:8001", "dial_refused", 5 * time.Second},
			{"blackholed", "127.0.0.1:8002", "timeout", 15 * time.Second},
		} {
			t.Run(tc.service, func(t *testing.T) {
				t.Parallel()
				e2e.ExpectClosedNoDataWithin(t, c, tc.addr, tc.wait)
				d.WaitLog(t, settleTimeout, "dial failed", "service="+tc.service, "reason="+tc.reason)
				waitCount(t, scrape, `ebpfwd_errors_total{service="`+tc.service+`",reason="`+tc.reason+`"}`, 1)
			})
		}
		t.Run("resetting", func(t *testing.T) {
			t.Parallel()
			const streams = 3
			for i := range streams {
				resetMidStream(t, c, "127.0.0.1:8003", prefix, i)
			}
			waitCount(t, scrape, `ebpfwd_errors_total{service="resetting",reason="reset"}`, streams)
			d.WaitLog(t, settleTimeout, "connection ended with error", "service=resetting", "node=flaky")
		})
	})
	held.roundTrip(t, "after the faults")
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 1<<20, trafficTimeout); err != nil {
		t.Fatalf("the other service after the faults: %v", err)
	}
	samples, err := scrape()
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := sumMatching(samples, `ebpfwd_errors_total{service="steady"}`); v != 0 {
		t.Errorf("the other service counted %v errors, want 0", v)
	}
}

// resetMidStream sends prefix bytes to a service whose target echoes them
// and then resets: they must come back intact, followed by a reset.
func resetMidStream(t *testing.T, c *topo.NS, addr string, prefix, i int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	conn, err := e2e.DialFrom(ctx, t, c, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(trafficTimeout))
	sent := make([]byte, prefix)
	_, _ = rand.Read(sent)
	if _, err := conn.Write(sent); err != nil {
		t.Fatalf("stream %d: write: %v", i, err)
	}
	got := make([]byte, prefix)
	if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, sent) {
		t.Fatalf("stream %d: the bytes before the reset: equal %v, %v", i, bytes.Equal(got, sent), err)
	}
	// Only reads from here: the kernel reports a reset once, to the first
	// call on the socket, and a read after that sees an EOF.
	rest, err := io.ReadAll(conn)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		t.Fatalf("stream %d: neither reset nor closed within %v of the target's reset", i, trafficTimeout)
	case !errors.Is(err, syscall.ECONNRESET):
		t.Fatalf("stream %d after the target's reset: %d more bytes, err %v; want a reset (a clean end looks complete)", i, len(rest), err)
	case len(rest) > 0:
		t.Fatalf("stream %d: %d bytes after the target's reset", i, len(rest))
	}
}

// scriptedHop plays a broken HTTP CONNECT proxy at addr inside ns: it reads
// one request and answers reply (nil: closes without a word; hang: answers
// nothing until the daemon gives up). Each request's target is sent on the
// returned channel.
func scriptedHop(t *testing.T, ns *topo.NS, addr string, reply []byte, hang bool) <-chan string {
	t.Helper()
	ln, err := e2e.Handle(t, ns).Listen(context.Background(), "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	targets := make(chan string, 16)
	testutil.Serve(t, ln, func(ctx context.Context, c net.Conn) {
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * trafficTimeout))
		r := bufio.NewReader(c)
		req, err := http.ReadRequest(r)
		if err != nil {
			return
		}
		select {
		case targets <- req.Host:
		default:
		}
		if hang {
			// Until the daemon closes (its handshake timeout) or the test ends.
			go func() { <-ctx.Done(); c.Close() }()
			_, _ = io.Copy(io.Discard, r)
			return
		}
		_, _ = c.Write(reply)
	})
	return targets
}

// TestHopFaults: a chain's first hop that refuses (407, 502), answers
// garbage, closes before or in the middle of its answer, or never answers.
// The client is closed without a byte, the daemon logs the failed dial
// with its reason, counts it, and a connection held on a direct service
// beside it, and new ones, go on byte-exact.
func TestHopFaults(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-hopf-c")
	h := testutil.NewNS(t, "e2e-hopf-h")
	tg := testutil.NewNS(t, "e2e-hopf-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	cases := []struct {
		name   string
		reply  string
		hang   bool
		reason string
	}{
		{"407", "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"hop\"\r\nContent-Length: 0\r\n\r\n", false, "hop_407"},
		{"502", "HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", false, "hop_502"},
		{"garbage", "SSH-2.0-OpenSSH_9.6\r\n\r\n", false, "hop_protocol"},
		{"closed-before-answer", "", false, "hop_closed"},
		{"closed-mid-status-line", "HTTP/1.1 200 Conn", false, "hop_closed"},
		{"closed-mid-header", "HTTP/1.1 200 Connection established\r\nVia: 1.1", false, "hop_closed"},
		// The dial's bound (10s) is the handshake's too.
		{"never-answers", "", true, "timeout"},
	}
	var yaml strings.Builder
	yaml.WriteString(e2e.Config(`services:
- name: direct
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, datapath: userspace}
`, map[string]string{"T": tg.Name}))
	targets := make([]<-chan string, len(cases))
	for i, tc := range cases {
		hopAddr := fmt.Sprintf("127.0.0.1:%d", 7000+i)
		targets[i] = scriptedHop(t, h, hopAddr, []byte(tc.reply), tc.hang)
		fmt.Fprintf(&yaml, `- name: via-%[1]s
  addr: 127.0.0.1:%[2]d
  handler: {type: tcp, chain: chain-%[1]s}
  listener: {type: tcp}
  forwarder: {nodes: [{name: target, addr: "192.0.2.10:9000"}]}
`, tc.name, 8100+i)
	}
	yaml.WriteString("chains:\n")
	for i, tc := range cases {
		fmt.Fprintf(&yaml, `- name: chain-%[1]s
  hops:
  - name: hop-%[1]s
    metadata: {netns: %[2]s}
    nodes: [{name: proxy, addr: "127.0.0.1:%[3]d", connector: {type: http}, dialer: {type: tcp}}]
`, tc.name, h.Name, 7000+i)
	}
	yaml.WriteString("metrics:\n  addr: 127.0.0.1:9100\n")
	d := e2e.Start(t, "hop-faults", yaml.String(), e2e.Options{In: c})
	scrape := metricsIn(t, c, "127.0.0.1:9100")
	held := holdConn(t, c, "127.0.0.1:8000")

	t.Run("faults", func(t *testing.T) {
		for i, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				t.Parallel()
				service := "via-" + tc.name
				// Within the daemon's dial bound (10s), which a hop that
				// never answers waits out.
				e2e.ExpectClosedNoDataWithin(t, c, fmt.Sprintf("127.0.0.1:%d", 8100+i), 15*time.Second)
				select {
				case got := <-targets[i]:
					if got != "192.0.2.10:9000" {
						t.Errorf("the hop was asked for %q, want the node 192.0.2.10:9000", got)
					}
				default:
					t.Fatal("the hop got no CONNECT request")
				}
				d.WaitLog(t, settleTimeout, "dial failed", "service="+service, "reason="+tc.reason)
				waitCount(t, scrape, `ebpfwd_errors_total{service="`+service+`",reason="`+tc.reason+`"}`, 1)
			})
		}
	})
	held.roundTrip(t, "after the hop faults")
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 1<<20, trafficTimeout); err != nil {
		t.Fatalf("the direct service after the hop faults: %v", err)
	}
	if !d.Running() {
		t.Fatal("the daemon exited")
	}
}

// TestPortInUseAtStart: a service whose address is taken fails the start:
// `ebpfwd run` exits non-zero naming the address, and leaves nothing half
// set up: no tc program on the gateway's interfaces, no pins under
// /sys/fs/bpf/ebpfwd, no control socket, though a tc service came before
// it in the file.
func TestPortInUseAtStart(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newRestartTopo(t, "e2e-inuse")
	client, gw := tp.client, tp.gw
	// Another program holds the relay service's port (no SO_REUSEPORT).
	taken, err := e2e.Handle(t, gw).Listen(context.Background(), "tcp", "10.34.1.1:8001")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() })
	yaml := e2e.Config(`services:
- name: kernel
  addr: "10.34.1.1:8000"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-0, addr: "10.34.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: clash
  addr: "10.34.1.1:8001"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-0, addr: "10.34.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: userspace}
`, map[string]string{"GW": gw.Name})
	cfg := filepath.Join(t.TempDir(), "inuse.yaml")
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	instance := testutil.UniqueName(t, "e2e-inuse")
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, e2e.Bin, "run", "--instance", instance, cfg).CombinedOutput()
	t.Logf("ebpfwd run:\n%s", out)
	var exit *exec.ExitError
	switch {
	case ctx.Err() != nil:
		t.Fatalf("ebpfwd run still running %v after its port was found taken", trafficTimeout)
	case !errors.As(err, &exit) || exit.ExitCode() <= 0:
		t.Fatalf("ebpfwd run with a port in use: %v, want a non-zero exit", err)
	}
	for _, want := range []string{"clash", "10.34.1.1:8001", "address already in use"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("the error does not name %q", want)
		}
	}
	gwNS := e2e.Handle(t, gw)
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 0 {
			t.Errorf("%d tcx programs left on %s", n, ifname)
		}
	}
	if dirs := pinDirsOf(instance); len(dirs) > 0 {
		t.Errorf("pins left: %v", dirs)
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/bpf/ebpfwd", instance)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory of the instance left (stat: %v)", err)
	}
	if _, err := os.Stat(daemon.ControlSocket(instance)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("control socket left (stat: %v)", err)
	}
	// The port freed, the same file starts and serves both services.
	taken.Close()
	e2e.Start(t, "inuse-after", yaml, e2e.Options{})
	for _, addr := range []string{"10.34.1.1:8000", "10.34.1.1:8001"} {
		if err := e2e.Exchange(t, client, addr, 256<<10, trafficTimeout); err != nil {
			t.Fatalf("%s once the port is free: %v", addr, err)
		}
	}
}

// burstConns is how many connections TestConnectionBurst opens at once.
const burstConns = 5000

// burstDaemon is a daemon a burst goes through, with its service's name
// and its metrics.
type burstDaemon struct {
	d       *e2e.Daemon
	service string
	scrape  func() (model.Vector, error)
	// baseline, taken before the burst.
	threads, fds int
}

// TestConnectionBurst opens 5000 connections at once through a relay
// service, directly and through a chain whose hop is a second ebpfwd (an
// http handler), and once all are open moves 64 KiB each way on every one,
// SHA-256 checked both ways, every read bounded by the test's deadline so
// a stalled stream fails it instead of hanging. None may be refused or
// fail; every daemon's OS threads stay bounded while the streams run (the
// issue saw a hop left with 1856), and its threads and descriptors are
// back near their baseline once the streams closed. It is not parallel:
// with the clients and the echo servers this process holds two
// descriptors per stream, and the machine's hard RLIMIT_NOFILE leaves no
// room for other tests beside it.
func TestConnectionBurst(t *testing.T) {
	testutil.RequireRoot(t)
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Fatalf("raise RLIMIT_NOFILE to its hard limit %d: %v", lim.Max, err)
		}
	}
	// The client's and the echo server's end of each stream, and 1000 for
	// the rest of this process.
	n := min(burstConns, (int(lim.Cur)-1000)/2)
	if n < burstConns {
		t.Logf("RLIMIT_NOFILE %d leaves this process room for %d streams, not %d: running %d", lim.Cur, n, burstConns, n)
	}
	newNS := func(t *testing.T, prefix string) *topo.NS {
		ns := testutil.NewNS(t, prefix)
		// 5000 SYNs at once: beyond the default backlog some would wait
		// for a SYN retransmit (1s, 3s...), which is slow but not a
		// failure; this keeps the test about the daemon.
		if err := ns.Exec("sysctl", "-qw", "net.core.somaxconn=8192", "net.ipv4.tcp_max_syn_backlog=8192"); err != nil {
			t.Fatal(err)
		}
		return ns
	}
	t.Run("relay", func(t *testing.T) {
		c, tg := newNS(t, "e2e-burst-c"), newNS(t, "e2e-burst-t")
		e2e.EchoIn(t, tg, "127.0.0.1:9000")
		d := e2e.Start(t, "burst", e2e.Config(`services:
- name: relay
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, datapath: userspace}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"T": tg.Name}), e2e.Options{In: c})
		burst(t, c, n, &burstDaemon{d: d, service: "relay", scrape: metricsIn(t, c, "127.0.0.1:9100")})
	})
	t.Run("through an http hop", func(t *testing.T) {
		c, hop, tg := newNS(t, "e2e-burst-c"), newNS(t, "e2e-burst-h"), newNS(t, "e2e-burst-t")
		e2e.EchoIn(t, tg, "127.0.0.1:9000")
		hd := e2e.Start(t, "burst-hop", e2e.Config(`services:
- name: hop
  addr: 127.0.0.1:8080
  handler: {type: http}
  listener: {type: tcp}
  metadata: {netns.out: $T}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"T": tg.Name}), e2e.Options{In: hop})
		d := e2e.Start(t, "burst-chain", e2e.Config(`services:
- name: chained
  addr: 127.0.0.1:8000
  handler: {type: tcp, chain: via-hop}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
chains:
- name: via-hop
  hops:
  - name: hop-0
    metadata: {netns: $H}
    nodes: [{name: proxy, addr: "127.0.0.1:8080", connector: {type: http}, dialer: {type: tcp}}]
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"H": hop.Name}), e2e.Options{In: c})
		burst(t, c, n,
			&burstDaemon{d: d, service: "chained", scrape: metricsIn(t, c, "127.0.0.1:9100")},
			&burstDaemon{d: hd, service: "hop", scrape: metricsIn(t, hop, "127.0.0.1:9100")})
	})
}

// burst runs TestConnectionBurst's n streams from c to 127.0.0.1:8000 and
// checks the daemons they cross.
func burst(t *testing.T, c *topo.NS, n int, daemons ...*burstDaemon) {
	const size = 64 << 10
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", size, trafficTimeout); err != nil {
		t.Fatal(err)
	}
	for _, bd := range daemons {
		bd.threads, bd.fds = daemonThreads(t, bd.d), len(bd.d.SettledFDs(t))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	h := e2e.Handle(t, c)
	conns := make([]net.Conn, n)
	dialErrs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { conns[i], dialErrs[i] = h.Dial(ctx, "tcp", "127.0.0.1:8000") })
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, conn := range conns {
			if conn != nil {
				conn.Close()
			}
		}
	})
	if err := errors.Join(dialErrs...); err != nil {
		t.Fatalf("dialing %d connections at once: %v", n, firstLines(err.Error(), 5))
	}
	// Every connection is open: now they all move their bytes at once.
	peaks := make([]atomic.Int64, len(daemons))
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for ctx.Err() == nil {
			for i, bd := range daemons {
				if th, ok := threadsOf(bd.d.Pid()); ok && int64(th) > peaks[i].Load() {
					peaks[i].Store(int64(th))
				}
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	exchangeErrs := make([]error, n)
	for i := range n {
		wg.Go(func() { exchangeErrs[i] = peer.Exchange(ctx, conns[i], size) })
	}
	wg.Wait()
	cancel()
	<-watchDone
	var failed []error
	for i, err := range exchangeErrs {
		if err != nil {
			failed = append(failed, fmt.Errorf("stream %d: %w", i, err))
		}
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d streams failed or stalled:\n%v", len(failed), n, firstLines(errors.Join(failed...).Error(), 10))
	}
	for i, bd := range daemons {
		peak := int(peaks[i].Load())
		t.Logf("%d streams byte-exact; daemon %s's threads: %d before, %d at most during", n, bd.d.Name, bd.threads, peak)
		// Go keeps an OS thread per goroutine blocked in a system call: a
		// relay that blocked in splice(2) or a dial that blocked in a
		// namespace switch would show here as thousands.
		if peak > bd.threads+64 {
			t.Errorf("daemon %s: %d OS threads while %d streams ran (baseline %d): blocking system calls hold threads", bd.d.Name, peak, n, bd.threads)
		}
		checkBurstDaemon(t, bd, n)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 1<<20, trafficTimeout); err != nil {
		t.Fatalf("after the burst: %v", err)
	}
}

// checkBurstDaemon checks one daemon after a burst of n streams: all
// counted, none failed, and its threads and descriptors back.
func checkBurstDaemon(t *testing.T, bd *burstDaemon, n int) {
	t.Helper()
	samples, err := bd.scrape()
	if err != nil {
		t.Fatal(err)
	}
	if v := value(t, samples, `ebpfwd_connections_opened_total{service="`+bd.service+`"}`); v != float64(n+1) {
		t.Errorf("daemon %s: connections_opened_total = %v, want %d", bd.d.Name, v, n+1)
	}
	if v, _ := sumMatching(samples, `ebpfwd_errors_total{service="`+bd.service+`"}`); v != 0 {
		t.Errorf("daemon %s: errors_total of the service = %v, want 0", bd.d.Name, v)
	}
	// Go's runtime keeps the splice pipes it made in a pool that only its
	// garbage collector empties: those are bounded by the daemon's pipe
	// allowance (which its fd budget reserves), not by the streams, and
	// are counted apart. Every other descriptor must be back.
	pipeLimit := value(t, samples, `ebpfwd_splice_pipes{state="limit"}`)
	var threads, others, pipes int
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		threads, others, pipes = daemonThreads(t, bd.d), 0, 0
		for _, fd := range bd.d.OpenFDs(t) {
			if strings.HasPrefix(fd, "pipe:") {
				pipes++
			} else {
				others++
			}
		}
		if threads <= bd.threads+16 && others <= bd.fds+16 {
			break
		}
	}
	t.Logf("daemon %s after the burst: %d threads (baseline %d), %d descriptors besides %d pooled splice pipe ends (baseline %d in all)",
		bd.d.Name, threads, bd.threads, others, pipes, bd.fds)
	if threads > bd.threads+16 || others > bd.fds+16 {
		t.Fatalf("daemon %s after the burst: %d threads (baseline %d), %d descriptors besides pipes (baseline %d in all: %v now)",
			bd.d.Name, threads, bd.threads, others, bd.fds, e2e.FDKinds(bd.d.OpenFDs(t)))
	}
	if float64(pipes) > 2*pipeLimit {
		t.Errorf("daemon %s: %d pipe ends left, beyond the splice pipe allowance of %v pipes", bd.d.Name, pipes, pipeLimit)
	}
	waitActive(t, bd.scrape, bd.service, 0)
}

// firstLines keeps the first n lines of s, saying how many it left out.
func firstLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) <= n {
		return s
	}
	return strings.Join(lines[:n], "\n") + fmt.Sprintf("\n... and %d more", len(lines)-n)
}

// TestSlowloris: clients of an http handler that trickle their request
// header a byte at a time, never finishing it, are answered 408 at the
// header timeout (an absolute bound, not one each byte renews), logged and
// counted as http_header_timeout, while a client beside them tunnels 1 MiB
// each way byte-exact through the same handler.
func TestSlowloris(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	const slowClients = 20
	c := testutil.NewNS(t, "e2e-slow-c")
	tg := testutil.NewNS(t, "e2e-slow-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	d := e2e.Start(t, "slowloris", e2e.Config(`services:
- name: proxy
  addr: 127.0.0.1:8080
  handler:
    type: http
    metadata: {headerTimeout: 1s}
  listener: {type: tcp}
  metadata: {netns.out: $T}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"T": tg.Name}), e2e.Options{In: c})
	scrape := metricsIn(t, c, "127.0.0.1:9100")
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()

	slowErrs := make([]error, slowClients)
	var wg sync.WaitGroup
	for i := range slowClients {
		wg.Go(func() { slowErrs[i] = slowlorisClient(ctx, t, c, "127.0.0.1:8080") })
	}
	// Beside them, a client that sends its request at once is served.
	conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8080")
	if err != nil {
		t.Fatal(err)
	}
	tunnel, err := httpconnect.Handshake(ctx, conn, "127.0.0.1:9000", nil)
	if err != nil {
		conn.Close()
		t.Fatalf("CONNECT beside the slowloris clients: %v", err)
	}
	if err := peer.Exchange(ctx, tunnel, 1<<20); err != nil {
		t.Fatalf("the tunnel beside the slowloris clients: %v", err)
	}
	wg.Wait()
	for i, err := range slowErrs {
		if err != nil {
			t.Errorf("slowloris client %d: %v", i, err)
		}
	}
	waitCount(t, scrape, `ebpfwd_errors_total{service="proxy",reason="http_header_timeout"}`, slowClients)
	d.WaitLog(t, settleTimeout, "http proxy request failed", "service=proxy", "status=408")
}

// slowlorisClient sends the start of a CONNECT and then one header byte
// every 100ms, and expects a 408 within 10s (the handler's header timeout
// is 1s); it keeps trickling until the answer comes.
func slowlorisClient(ctx context.Context, t *testing.T, ns *topo.NS, addr string) error {
	conn, err := e2e.DialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, "CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"); err != nil {
		return err
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := conn.Write([]byte("X")); err != nil {
				return
			}
		}
	}()
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return fmt.Errorf("no answer to a header trickled a byte at a time: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout {
		return fmt.Errorf("status %d, want 408", resp.StatusCode)
	}
	return nil
}

// TestListenNamespaceDeleted deletes the listen namespace of one service
// under the running daemon, while a process still lives in it (as a
// container's processes outlive the bind mount a runtime removes). The
// namespace lives on, and so does the service's listener in it: the
// connection held through it goes on, and its processes' new connections
// are served, byte-exact. A reload cannot open the namespace by its name
// any more: it is refused naming the namespace, logged and counted
// (ebpfwd_config_last_reload_successful 0), and the running configuration,
// the other service included, keeps serving.
func TestListenNamespaceDeleted(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	doomed := testutil.NewNS(t, "e2e-ldel-l")
	kept := testutil.NewNS(t, "e2e-ldel-k")
	tg := testutil.NewNS(t, "e2e-ldel-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	inside, err := netns.Parse(processIn(t, doomed))
	if err != nil {
		t.Fatal(err)
	}
	d := e2e.Start(t, "listen-deleted", e2e.Config(`services:
- name: svc-doomed
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns: $DOOMED, netns.out: $T, datapath: userspace}
- name: svc-kept
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T, datapath: userspace}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"DOOMED": doomed.Name, "T": tg.Name}), e2e.Options{In: kept})
	scrape := metricsIn(t, kept, "127.0.0.1:9100")
	exchangeInside := func(when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		conn, err := inside.Dial(ctx, "tcp", "127.0.0.1:8000")
		if err == nil {
			err = peer.Exchange(ctx, conn, 1<<20)
		}
		if err != nil {
			t.Fatalf("a process in the listen namespace %s: %v", when, err)
		}
	}
	held := holdConn(t, doomed, "127.0.0.1:8000")
	exchangeInside("before its deletion")

	if err := doomed.Delete(); err != nil {
		t.Fatal(err)
	}
	held.roundTrip(t, "after the listen namespace was deleted")
	exchangeInside("after its deletion")
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, settleTimeout, "reload refused", doomed.Name)
	deadline := time.Now().Add(settleTimeout)
	for {
		samples, err := scrape()
		v, ok := sumMatching(samples, "ebpfwd_config_last_reload_successful")
		if err == nil && ok && v == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ebpfwd_config_last_reload_successful = %v (scrape error %v) after a refused reload, want 0", v, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	held.roundTrip(t, "after the refused reload")
	exchangeInside("after the refused reload")
	if err := e2e.Exchange(t, kept, "127.0.0.1:8001", 1<<20, trafficTimeout); err != nil {
		t.Fatalf("the other service: %v", err)
	}
	if !d.Running() {
		t.Fatal("the daemon exited")
	}
}
