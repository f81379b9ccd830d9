package test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// upgradeTopology: a userspace TCP service, a UDP service and the metrics
// endpoint of one daemon in $C, the targets in $T.
const upgradeTopology = `services:
- name: relay
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9000"}]}
  metadata: {netns.out: $T}
- name: dgram
  addr: 127.0.0.1:8053
  handler: {type: udp}
  forwarder: {nodes: [{name: echo, addr: "127.0.0.1:9053"}]}
  metadata: {netns.out: $T}
metrics:
  addr: 127.0.0.1:9100
`

// TestUpgradeRefusesNoneResetsNone: SIGUSR2 starts a new process that
// takes the listening sockets over. Throughout, new connections keep
// arriving and every one is served byte-exact (none refused, none reset);
// a transfer in flight on the old process runs to its end byte-exact;
// afterwards the new process serves TCP, UDP, metrics and `ebpfwd conns`,
// and the old one has exited 0.
func TestUpgradeRefusesNoneResetsNone(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-upg-c")
	tg := testutil.NewNS(t, "e2e-upg-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	e2e.UDPEchoIn(t, tg, "127.0.0.1:9053")
	instance, opts := fixedInstance("upgrade")
	opts.In = c
	// systemd's notification socket (Type=notify): READY=1 from the
	// first process, MAINPID= of the new one after the upgrade.
	notify := listenNotify(t)
	opts.Env = []string{"NOTIFY_SOCKET=" + notify.LocalAddr().String()}
	opts.Args = append(opts.Args, "--drain-timeout", "30s") // the last one counts
	d := e2e.Start(t, "upgrade", e2e.Config(upgradeTopology, map[string]string{"T": tg.Name}), opts)
	d.Instance = instance
	if msg := readNotify(t, notify); msg != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", msg)
	}

	// A transfer that spans the upgrade: paced, so it is still running
	// when the new process takes over; it stays on the old process.
	_, inFlight := pacedExchange(t, c, "127.0.0.1:8000")

	// Steady new connections, each a small verified exchange, until the
	// upgrade is over.
	var (
		stopLoad = make(chan struct{})
		loadWG   sync.WaitGroup
		served   atomic.Int64
		mu       sync.Mutex
		failures []string
	)
	for w := range 4 {
		loadWG.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stopLoad:
					return
				default:
				}
				if err := e2e.Exchange(t, c, "127.0.0.1:8000", 16<<10, 10*time.Second); err != nil {
					mu.Lock()
					failures = append(failures, fmt.Sprintf("worker %d connection %d: %v", w, i, err))
					mu.Unlock()
					return
				}
				served.Add(1)
			}
		})
	}
	time.Sleep(300 * time.Millisecond)
	before := served.Load()
	next := d.Upgrade(t, restartTimeout)
	if msg, want := readNotify(t, notify), fmt.Sprintf("MAINPID=%d\nREADY=1", next.Pid()); msg != want {
		t.Errorf("notification after the upgrade %q, want %q", msg, want)
	}
	// Keep the load on for a while against the new process.
	time.Sleep(500 * time.Millisecond)
	close(stopLoad)
	loadWG.Wait()
	if len(failures) > 0 {
		t.Fatalf("connections failed across the upgrade:\n%s", strings.Join(failures, "\n"))
	}
	if after := served.Load(); before == 0 || after <= before {
		t.Fatalf("connections served: %d before the upgrade, %d in all: the load did not span it", before, after)
	}
	t.Logf("%d connections served across the upgrade, none refused or reset", served.Load())

	if err := <-inFlight; err != nil {
		t.Fatalf("the transfer in flight across the upgrade: %v", err)
	}
	select {
	case <-d.Exited():
	case <-time.After(restartTimeout):
		t.Fatalf("the old process did not exit once its connection ended; output:\n%s", d.Output)
	}
	if code, err := d.Wait(time.Second); err != nil || code != 0 {
		t.Fatalf("old process exited %d (%v), want 0", code, err)
	}

	// The new process serves everything.
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	conn, err := e2e.DialFrom(ctx, t, c, "udp", "127.0.0.1:8053")
	if err != nil {
		t.Fatal(err)
	}
	if err := peer.UDPExchange(ctx, conn, 3, 512); err != nil {
		t.Fatalf("udp after the upgrade: %v", err)
	}
	ch := e2e.Handle(t, c)
	scraper := &http.Client{Timeout: httpTimeout, Transport: &http.Transport{DialContext: ch.Dial, DisableKeepAlives: true}}
	resp, err := scraper.Get("http://127.0.0.1:9100/metrics")
	if err != nil {
		t.Fatalf("metrics after the upgrade: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), `ebpfwd_connections_opened_total{datapath="userspace",service="relay"}`) {
		t.Fatalf("metrics after the upgrade lack the relay service:\n%.2000s", body)
	}
	if out := conns(t, next); !strings.Contains(out, "SERVICE") {
		t.Fatalf("ebpfwd conns after the upgrade:\n%s", out)
	}
	next.WaitLog(t, time.Second, "listening on the socket the previous process handed over", "service=relay")
	next.WaitLog(t, time.Second, "listening on the socket the previous process handed over", "service=dgram")
}

// listenNotify is a stand-in for systemd's notification socket.
func listenNotify(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// readNotify reads the next notification, waiting a few seconds at most.
func readNotify(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 4096)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no notification from the daemon: %v", err)
	}
	return string(buf[:n])
}
