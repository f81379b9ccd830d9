package test

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// TestNetnsDeletedWhileRunning deletes the netns.out namespace of one
// service under the running daemon. The namespace itself lives on (the
// target's socket holds it), but its name is gone, so the daemon must stop
// dialing through it: new connections are closed, the daemon says which
// namespace failed and counts the failures (netns_gone), and its other
// service keeps working.
func TestNetnsDeletedWhileRunning(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-del-c")
	doomed := testutil.NewNS(t, "e2e-del-d")
	kept := testutil.NewNS(t, "e2e-del-k")
	e2e.EchoIn(t, doomed, "127.0.0.1:9000")
	e2e.EchoIn(t, kept, "127.0.0.1:9000")
	yaml := e2e.Config(`services:
- name: svc-doomed
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $DOOMED}
- name: svc-kept
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $KEPT}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"C": c.Name, "DOOMED": doomed.Name, "KEPT": kept.Name})
	// In C, where its services listen, so that its metrics are there too.
	d := e2e.Start(t, "netns-deleted", yaml, e2e.Options{In: c})
	for _, addr := range []string{"127.0.0.1:8000", "127.0.0.1:8001"} {
		if err := e2e.Exchange(t, c, addr, 64<<10, 10*time.Second); err != nil {
			t.Fatalf("before deletion, %s: %v", addr, err)
		}
	}

	if err := doomed.Delete(); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		e2e.ExpectClosedNoData(t, c, "127.0.0.1:8000")
	}
	if !d.Running() {
		t.Fatal("the daemon exited when a namespace was deleted")
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8001", 256<<10, 10*time.Second); err != nil {
		t.Fatalf("the other service after deletion: %v", err)
	}
	d.WaitLog(t, 5*time.Second, doomed.Name)
	waitCount(t, metricsIn(t, c, "127.0.0.1:9100"), `ebpfwd_errors_total{service="svc-doomed",reason="netns_gone"}`, 3)
}

// TestCheckBadConfig: `ebpfwd check` must report every problem at once,
// each with its position, and fail.
func TestCheckBadConfig(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	missing := testutil.UniqueName(t, "e2e-missing")
	if topo.Exists(missing) {
		t.Fatalf("namespace %s exists", missing)
	}
	existing := testutil.NewNS(t, "e2e-check")
	// What run would refuse and the file alone cannot tell: a listen
	// address another process holds, a log output that is a directory.
	e2e.EchoIn(t, existing, "127.0.0.1:8100")
	logDir := t.TempDir()

	tests := []struct {
		name     string
		yaml     string
		wantCode bool // want exit status 0
		want     []*regexp.Regexp
	}{
		{
			name: "bad addr and missing namespace",
			// Line 3 is the bad addr: "  addr: ..." (key at column 3,
			// value at column 9).
			yaml: `services:
- name: bad-addr
  addr: "10.0.0.1:99999"
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
- name: missing-ns
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: ` + missing + `}
`,
			want: []*regexp.Regexp{
				regexp.MustCompile(`(?m)^CONFIG:3:(3|9): services\[0\]\.addr: .+`),
				regexp.MustCompile(`(?m)^.*` + regexp.QuoteMeta(missing) + `.*$`),
			},
		},
		{
			name: "missing namespace only",
			yaml: `services:
- name: missing-ns
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: ` + missing + `}
`,
			want: []*regexp.Regexp{regexp.MustCompile(`(?m)^.*` + regexp.QuoteMeta(missing) + `.*$`)},
		},
		{
			name: "listen address in use, log output a directory",
			yaml: `log: {output: ` + logDir + `}
services:
- name: taken
  addr: 127.0.0.1:8100
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: ` + existing.Name + `}
`,
			want: []*regexp.Regexp{
				regexp.MustCompile(`(?m)^CONFIG:3:3: services\[0\]\.addr: cannot listen there \(is this instance running already\?\): .*address already in use`),
				regexp.MustCompile(`(?m)^CONFIG: log\.output: .* is a directory`),
			},
		},
		{
			name: "valid",
			yaml: `services:
- name: ok
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: ` + existing.Name + `}
`,
			wantCode: true,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(cfg, []byte(tc.yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, e2e.Bin, "check", cfg)
			var stderr syncbuf.Buffer
			cmd.Stderr = &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("ebpfwd check did not finish within 10s; stderr:\n%s", stderr.String())
			}
			if ok := err == nil; ok != tc.wantCode {
				t.Fatalf("ebpfwd check: %v, want success=%v; stderr:\n%s", err, tc.wantCode, stderr.String())
			}
			out := strings.ReplaceAll(stderr.String(), cfg, "CONFIG")
			for _, re := range tc.want {
				if !re.MatchString(out) {
					t.Errorf("stderr has no line matching %s; stderr:\n%s", re, out)
				}
			}
		})
	}
}

// pacedConn slows the client's writes so a transfer stays in flight long
// enough to be interrupted, and counts echoed bytes so the test knows the
// transfer is under way.
type pacedConn struct {
	*net.TCPConn
	pause time.Duration
	read  atomic.Int64
}

func (c *pacedConn) Write(p []byte) (int, error) {
	time.Sleep(c.pause)
	return c.TCPConn.Write(p)
}

func (c *pacedConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	c.read.Add(int64(n))
	return n, err
}

// TestGracefulShutdown: on SIGTERM the daemon stops accepting at once,
// lets the transfer in flight finish byte-exact, then exits 0.
func TestGracefulShutdown(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	f := newCrossNS(t, "e2e-drain", e2e.Options{Args: []string{"--drain-timeout", "30s"}})

	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, f.client, "tcp", "127.0.0.1:8000")
	if err != nil {
		t.Fatal(err)
	}
	// 8 MiB in 32 KiB writes, 12ms apart: about 3s in flight.
	pc := &pacedConn{TCPConn: c.(*net.TCPConn), pause: 12 * time.Millisecond}
	done := make(chan error, 1)
	go func() { done <- peer.Exchange(ctx, pc, 8<<20) }()

	for pc.read.Load() == 0 {
		select {
		case err := <-done:
			t.Fatalf("transfer ended before it got going: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		if ctx.Err() != nil {
			t.Fatal("no echo within the test's deadline")
		}
	}
	if err := f.d.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	// The listener closes promptly; a dial that slips in before is closed
	// by us and retried.
	refusedBy := time.Now().Add(2 * time.Second)
	for {
		dctx, dcancel := context.WithTimeout(ctx, time.Second)
		nc, err := e2e.DialFrom(dctx, t, f.client, "tcp", "127.0.0.1:8000")
		dcancel()
		if err != nil {
			break
		}
		nc.Close()
		if time.Now().After(refusedBy) {
			t.Fatal("the daemon still accepts connections 2s after SIGTERM")
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("the transfer finished (%v) before the listener closed: the test proved nothing; make it longer", err)
	default:
	}

	if err := <-done; err != nil {
		t.Fatalf("in-flight transfer across shutdown: %v", err)
	}
	code, err := f.d.Wait(e2e.StopTimeout)
	if err != nil {
		t.Fatalf("daemon: %v", err)
	}
	if code != 0 {
		t.Fatalf("daemon exited with status %d after SIGTERM and drain, want 0", code)
	}
}
