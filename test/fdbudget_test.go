package test

import (
	"context"
	"errors"
	"fmt"
	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/prometheus/common/model"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/netns"
)

// fdBudgetTopology: three services of one daemon that runs, with its
// metrics endpoint, inside $C; the targets live in $T.
//   - udp-flood is flooded from thousands of source ports (a session, so
//     a socket, each);
//   - storm gets a TCP connection storm whose connections stay open;
//   - other must keep answering meanwhile, and so must /metrics.
const fdBudgetTopology = `services:
- name: udp-flood
  addr: 127.0.0.1:8053
  handler: {type: udp}
  # Sessions expire soon after the flood, so the test sees the daemon's
  # descriptors go back to where they were.
  listener: {type: udp, metadata: {ttl: 1s, keepAlive: true}}
  forwarder:
    nodes:
    - {name: udp-target, addr: "127.0.0.1:9053"}
  metadata: {netns.out: $T}
- name: storm
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: storm-target, addr: "127.0.0.1:9001"}
  metadata: {netns.out: $T}
- name: other
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: other-target, addr: "127.0.0.1:9000"}
  metadata: {netns.out: $T}
metrics:
  addr: "127.0.0.1:9100"
  path: /metrics
`

// TestFDBudget runs the daemon with RLIMIT_NOFILE at 512 and floods one
// UDP service from more source ports than it has descriptors, while a
// connection storm holds more connections open on a TCP service than its
// share allows. The third service and /metrics must answer throughout,
// the refusals must be counted with reason fd_budget (and nothing must
// run out of descriptors: no local_resources, no accept error), and once
// the flood's sessions expired and the storm's connections closed the
// daemon's descriptors must be back at their baseline.
func TestFDBudget(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Skipf("util-linux prlimit is needed to start the daemon with a low fd limit: %v", err)
	}
	t.Parallel()
	const (
		fdLimit    = 512
		floodPorts = 3000 // far more sessions than 512 descriptors hold
		stormConns = 300  // more streams than 512 descriptors hold, two each
		checks     = 10   // rounds of "other and /metrics still answer"
	)
	c := testutil.NewNS(t, "e2e-fdb-c")
	tg := testutil.NewNS(t, "e2e-fdb-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	e2e.EchoIn(t, tg, "127.0.0.1:9001")
	e2e.UDPEchoIn(t, tg, "127.0.0.1:9053")
	d := e2e.Start(t, "fdbudget", e2e.Config(fdBudgetTopology, map[string]string{"T": tg.Name}),
		e2e.Options{In: c, FDLimit: fdLimit})
	d.WaitLog(t, 10*time.Second, "open file limit", "soft="+strconv.Itoa(fdLimit))
	stormG := budgetShare(t, d, "storm", "guaranteed_streams")
	stormMax := budgetShare(t, d, "storm", "max_streams")
	udpG := budgetShare(t, d, "udp-flood", "guaranteed_sessions")
	udpMax := budgetShare(t, d, "udp-flood", "max_sessions")
	otherG := budgetShare(t, d, "other", "guaranteed_streams")
	shared := budgetFigure(t, d, "shared")
	pool := budgetFigure(t, d, "pool")
	t.Logf("fd budget at a limit of %d: pool %d, shared %d; guaranteed: storm %d streams, other %d streams, udp-flood %d sessions",
		fdLimit, pool, shared, stormG, otherG, udpG)
	if stormG < 1 || stormMax >= stormConns || otherG < 1 || udpG < 1 || udpMax >= floodPorts || shared < 1 {
		t.Fatalf("shares do not fit the test: storm %d..%d (storm of %d), other %d, udp-flood %d..%d (flood of %d ports), shared %d",
			stormG, stormMax, stormConns, otherG, udpG, udpMax, floodPorts, shared)
	}
	// Two descriptors a stream, one a session: the guarantees and the
	// shared part are the pool, all within the limit.
	if got := 2*(stormG+otherG) + udpG + shared; got != pool || pool >= fdLimit {
		t.Fatalf("guarantees and shared part hold %d descriptors, want the pool %d, below the limit %d", got, pool, fdLimit)
	}

	ch := e2e.Handle(t, c)
	scraper := &http.Client{Timeout: httpTimeout, Transport: &http.Transport{DialContext: ch.Dial, DisableKeepAlives: true}}
	scrape := func() (model.Vector, error) {
		resp, err := scraper.Get("http://127.0.0.1:9100/metrics")
		if err != nil {
			return nil, fmt.Errorf("scrape: %w", err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("scrape: status %d, read: %v", resp.StatusCode, err)
		}
		return parseExposition(body)
	}
	udpSession := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		conn, err := e2e.DialFrom(ctx, t, c, "udp", "127.0.0.1:8053")
		if err != nil {
			return err
		}
		defer conn.Close()
		return peer.UDPExchange(ctx, conn, 3, 512)
	}

	// Warm up every path, so that what opens lazily (namespace handles,
	// the poller, the splice pipes) is in the baseline.
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 1024, trafficTimeout); err != nil {
		t.Fatalf("warm-up through other: %v", err)
	}
	if err := udpSession(); err != nil {
		t.Fatalf("warm-up through udp-flood: %v", err)
	}
	if _, err := scrape(); err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	waitActive(t, scrape, "udp-flood", 0)
	before := d.SettledFDs(t)

	// The flood: every socket sends a datagram per round until stopped.
	dst := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8053}
	socks, closeSocks, err := openAll(t, ch, floodPorts, func() (*net.UDPConn, bool, error) {
		s, err := net.DialUDP("udp", nil, dst)
		return s, err == nil, err
	})
	if err != nil {
		t.Fatalf("open %d flood sockets in %s: %v", floodPorts, c.Name, err)
	}
	floodCtx, stopFlood := context.WithCancel(context.Background())
	flooding := make(chan struct{})
	go func() {
		defer close(flooding)
		const maxRounds = 300 // 30s at most, whatever happens
		for round := 0; round < maxRounds && floodCtx.Err() == nil; round++ {
			for _, s := range socks {
				_, _ = s.Write([]byte("flood")) // a full buffer drops it: a flood anyway
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	defer func() { stopFlood(); <-flooding }()

	// The storm: connections opened at once and held. The daemon resets
	// one it refuses as soon as it accepted it, which on loopback may
	// come before connect returns: such a connection counts as reset.
	resetAtDial := 0
	storm, closeStorm, err := openAll(t, ch, stormConns, func() (net.Conn, bool, error) {
		conn, err := net.DialTimeout("tcp", "127.0.0.1:8001", 5*time.Second)
		if errors.Is(err, syscall.ECONNRESET) {
			resetAtDial++
			return nil, false, nil
		}
		return conn, err == nil, err
	})
	if err != nil {
		t.Fatalf("storm: open %d connections: %v", stormConns, err)
	}

	// Throughout: the other service and /metrics answer.
	for i := range checks {
		if err := e2e.Exchange(t, c, "127.0.0.1:8000", 4096, 5*time.Second); err != nil {
			t.Fatalf("check %d: other stopped answering during the flood and the storm: %v", i, err)
		}
		if _, err := scrape(); err != nil {
			t.Fatalf("check %d: /metrics stopped answering during the flood and the storm: %v", i, err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The storm got at least its guarantee and at most what the flood left
	// of the shared part: those connections wait for bytes (their reads
	// time out); the rest were reset at once.
	admitted, reset := stormOutcomes(t, storm, 1500*time.Millisecond)
	reset += resetAtDial
	if admitted < stormG || admitted > stormMax || admitted+reset != stormConns {
		t.Errorf("storm: %d connections admitted and %d reset, want between %d and %d admitted, the rest of %d reset",
			admitted, reset, stormG, stormMax, stormConns)
	}

	samples, err := scrape()
	if err != nil {
		t.Fatal(err)
	}
	stormRefused := value(t, samples, `ebpfwd_errors_total{service="storm",reason="fd_budget"}`)
	udpRefused := value(t, samples, `ebpfwd_errors_total{service="udp-flood",reason="fd_budget"}`)
	udpDropped := value(t, samples, `ebpfwd_dropped_datagrams_total{service="udp-flood"}`)
	sessions := int(value(t, samples, `ebpfwd_flow_table_entries{service="udp-flood",table="udp_sessions"}`))
	t.Logf("storm %d admitted; udp-flood %d sessions; refused: storm %v connections, udp-flood %v datagrams (%v dropped)",
		admitted, sessions, stormRefused, udpRefused, udpDropped)
	if stormRefused != float64(reset) {
		t.Errorf("storm fd_budget errors = %v, want the %d reset", stormRefused, reset)
	}
	// The refusal is counted as Admit says no, the drop just after it:
	// a scrape between the two sees a few more refusals than drops.
	const inFlight = 64
	if udpRefused < float64(floodPorts-udpMax) || udpRefused > udpDropped+inFlight {
		t.Errorf("udp-flood fd_budget errors = %v, want at least %d (a datagram of every port beyond the most it can hold) and about the %v dropped",
			udpRefused, floodPorts-udpMax, udpDropped)
	}
	// What the two borrowed beyond their guarantees fits the shared part:
	// neither took another's guarantee, and nothing ran past the pool.
	if borrowed := 2*max(admitted-stormG, 0) + max(sessions-udpG, 0); borrowed > shared || sessions < udpG {
		t.Errorf("storm %d streams (guaranteed %d) and udp-flood %d sessions (guaranteed %d) borrow %d descriptors, more than the %d shared, or the flood got less than its guarantee",
			admitted, stormG, sessions, udpG, borrowed, shared)
	}
	if v := value(t, samples, `ebpfwd_fd_budget_descriptors{part="shared"}`); v != float64(shared) {
		t.Errorf("fd_budget_descriptors{part=shared} = %v, want %d", v, shared)
	}
	if v := value(t, samples, `ebpfwd_fd_budget_descriptors{part="borrowed"}`); v < 1 || v > float64(shared) {
		t.Errorf("fd_budget_descriptors{part=borrowed} = %v during the flood, want between 1 and the %d shared", v, shared)
	}
	for _, sel := range []string{
		`ebpfwd_errors_total{service="other",reason="fd_budget"}`,
		// Nothing ran out of descriptors: no socket, accept or dial
		// failed with EMFILE.
		`ebpfwd_errors_total{reason="local_resources"}`,
		`ebpfwd_errors_total{reason="accept"}`,
	} {
		if v := value(t, samples, sel); v != 0 {
			t.Errorf("%s = %v, want 0", sel, v)
		}
	}
	if v := value(t, samples, `ebpfwd_connections_active{service="storm"}`); v != float64(admitted) {
		t.Errorf("storm active connections = %v, want the %d admitted", v, admitted)
	}
	if v := value(t, samples, `ebpfwd_flow_table_capacity{service="udp-flood",table="udp_sessions"}`); v != float64(udpMax) {
		t.Errorf("udp-flood session table capacity = %v, want its guarantee and the shared part, %d", v, udpMax)
	}

	// Afterwards: sessions expire, connections close, and the daemon is
	// back where it started, serving new clients of both services again.
	stopFlood()
	<-flooding
	closeSocks()
	closeStorm()
	waitActive(t, scrape, "udp-flood", 0)
	waitActive(t, scrape, "storm", 0)
	if err := udpSession(); err != nil {
		t.Errorf("udp-flood after the flood: %v", err)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8001", 1024, trafficTimeout); err != nil {
		t.Errorf("storm after the storm: %v", err)
	}
	waitActive(t, scrape, "udp-flood", 0)
	after := d.SettledFDs(t)
	t.Logf("daemon fds: %d before %v, %d after %v", len(before), e2e.FDKinds(before), len(after), e2e.FDKinds(after))
	if len(after) > len(before)+10 {
		t.Errorf("daemon fds grew from %d to %d over the flood and the storm (allowed: +10)", len(before), len(after))
	}
	if out := d.Output.String(); strings.Contains(out, "too many open files") {
		t.Errorf("the daemon ran out of descriptors:\n%s", out)
	}
}

// openAll calls open n times on one thread inside ns, so that the sockets
// it makes live there, and keeps those it says to keep. They are closed by
// the returned func, or in t.Cleanup at the latest.
func openAll[T io.Closer](t *testing.T, ns netns.NS, n int, open func() (T, bool, error)) ([]T, func(), error) {
	t.Helper()
	var opened []T
	err := ns.Do(func() error {
		for range n {
			v, keep, err := open()
			if err != nil {
				return err
			}
			if keep {
				opened = append(opened, v)
			}
		}
		return nil
	})
	closeAll := sync.OnceFunc(func() {
		for _, v := range opened {
			v.Close()
		}
	})
	t.Cleanup(closeAll)
	return opened, closeAll, err
}

// budgetShare reads a service's share ("guaranteed_streams",
// "max_sessions"...) from the daemon's "fd budget share" log line.
func budgetShare(t *testing.T, d *e2e.Daemon, service, key string) int {
	t.Helper()
	return logFigure(t, d, key, "fd budget share", "service="+service+" ")
}

// budgetFigure reads a figure of the whole budget ("pool", "shared") from
// the daemon's "fd budget" log line.
func budgetFigure(t *testing.T, d *e2e.Daemon, key string) int {
	t.Helper()
	return logFigure(t, d, key, `fd budget"`, "shared=")
}

// logFigure reads key=N from the daemon's first log line holding parts.
func logFigure(t *testing.T, d *e2e.Daemon, key string, parts ...string) int {
	t.Helper()
	line := d.WaitLog(t, 10*time.Second, parts...)
	m := regexp.MustCompile(`\b` + regexp.QuoteMeta(key) + `=(\d+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no %s in %q", key, line)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

// waitActive waits up to settleTimeout for a service's active connections
// (or sessions) to read want.
func waitActive(t *testing.T, scrape func() (model.Vector, error), service string, want float64) {
	t.Helper()
	sel := `ebpfwd_connections_active{service="` + service + `"}`
	deadline := time.Now().Add(settleTimeout)
	for {
		samples, err := scrape()
		var v float64
		var ok bool
		if err == nil {
			v, ok = sumMatching(samples, sel)
		}
		if err == nil && ok && v == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v (scrape error %v) after %v, want %v", sel, v, err, settleTimeout, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stormOutcomes reads from every storm connection until one deadline: an
// admitted connection has nothing to read and times out, a refused one
// was reset (or closed) by the daemon.
func stormOutcomes(t *testing.T, conns []net.Conn, wait time.Duration) (admitted, reset int) {
	t.Helper()
	deadline := time.Now().Add(wait)
	var (
		mu    sync.Mutex
		wg    sync.WaitGroup
		other []error
	)
	for _, conn := range conns {
		wg.Go(func() {
			_ = conn.SetReadDeadline(deadline)
			_, err := conn.Read(make([]byte, 1))
			mu.Lock()
			defer mu.Unlock()
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				admitted++
			case err != nil:
				reset++ // ECONNRESET, or EOF
			default:
				other = append(other, errors.New("read a byte nobody sent"))
			}
		})
	}
	wg.Wait()
	if len(other) > 0 {
		t.Errorf("storm connections: %v", errors.Join(other...))
	}
	return admitted, reset
}
