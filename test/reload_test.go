package test

import (
	"bytes"
	"context"
	"fmt"
	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// reloadConfig is the reload test's configuration: svc-a forwards to $A,
// svc-b to the first target, and extra services follow.
const reloadConfig = `services:
- name: svc-a
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $A}
- name: svc-b
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $T1}
`

// heldConn is a connection a test keeps open across a reload, checking
// that it still carries bytes both ways.
type heldConn struct{ c net.Conn }

func holdConn(t *testing.T, ns *topo.NS, addr string) *heldConn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	h := &heldConn{c: c}
	h.roundTrip(t, "when opened")
	return h
}

func (h *heldConn) roundTrip(t *testing.T, when string) {
	t.Helper()
	_ = h.c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("still here " + when)
	if _, err := h.c.Write(msg); err != nil {
		t.Fatalf("held connection %s: write: %v", when, err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(h.c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("held connection %s: read %q, %v; want %q", when, got, err, msg)
	}
}

// TestReloadInPlace: SIGHUP (as in GOST) and `ebpfwd reload` apply a new
// configuration without a restart. A changed service keeps its listener
// and refuses no connection while it switches to its new nodes; its old
// connections go on; an unchanged service is untouched; a removed one
// stops; an added one starts. A configuration that does not load is
// refused and the previous one keeps running.
func TestReloadInPlace(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-rl-c")
	t1 := testutil.NewNS(t, "e2e-rl-t1")
	t2 := testutil.NewNS(t, "e2e-rl-t2")
	e2e.EchoIn(t, t1, "127.0.0.1:9000")
	second := e2e.EchoIn(t, t2, "127.0.0.1:9000")
	vars := map[string]string{"C": c.Name, "T1": t1.Name, "A": t1.Name}
	gone := `- name: svc-gone
  addr: 127.0.0.1:8002
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $T1}
`
	d := e2e.Start(t, "reload", e2e.Config(reloadConfig+gone, vars), e2e.Options{Args: []string{"--drain-timeout", "30s"}})
	for _, addr := range []string{"127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"} {
		if err := e2e.Exchange(t, c, addr, 64<<10, 10*time.Second); err != nil {
			t.Fatalf("before the reload, %s: %v", addr, err)
		}
	}
	heldA := holdConn(t, c, "127.0.0.1:8000")
	heldB := holdConn(t, c, "127.0.0.1:8001")

	// New connections to the changed service, back to back, across the
	// whole reload: none may fail.
	steady := connectSteadily(t, c, "127.0.0.1:8000")
	vars["A"] = t2.Name
	added := `- name: svc-new
  addr: 127.0.0.1:8003
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $T1}
`
	if err := os.WriteFile(d.Config, []byte(e2e.Config(reloadConfig+added, vars)), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // some connections before the switch
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, 10*time.Second, "configuration reloaded", "changed: svc-a", "unchanged: svc-b", "added: svc-new", "removed: svc-gone")
	time.Sleep(300 * time.Millisecond) // and some after it
	steady.check(t, "to the changed service")
	if !d.Running() {
		t.Fatal("SIGHUP ended the daemon")
	}

	before := second.Count()
	for range 3 {
		if err := e2e.Exchange(t, c, "127.0.0.1:8000", 64<<10, 10*time.Second); err != nil {
			t.Fatalf("changed service after the reload: %v", err)
		}
	}
	if got := second.Count() - before; got != 3 {
		t.Fatalf("the new node got %d of 3 connections to the changed service", got)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8003", 64<<10, 10*time.Second); err != nil {
		t.Fatalf("added service: %v", err)
	}
	e2e.ExpectClosedNoData(t, c, "127.0.0.1:8002")
	// Connections of the changed service's old form, and of the
	// untouched service, go on.
	heldA.roundTrip(t, "after the reload")
	heldB.roundTrip(t, "after the reload")

	// A configuration that does not load is refused, by SIGHUP and by
	// `ebpfwd reload` alike, and the running one keeps serving.
	if err := os.WriteFile(d.Config, []byte("services: [\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(e2e.Bin, "reload", "--instance", d.Instance).CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "refused") {
		t.Fatalf("ebpfwd reload of a broken file: exit %d, output %q; want 1 and the refusal", code, out)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 64<<10, 10*time.Second); err != nil {
		t.Fatalf("after a refused reload: %v", err)
	}
	heldA.roundTrip(t, "after a refused reload")

	// Back to a valid file: `ebpfwd reload` applies it and says what it did.
	if err := os.WriteFile(d.Config, []byte(e2e.Config(reloadConfig, vars)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err = exec.Command(e2e.Bin, "reload", "--instance", d.Instance).CombinedOutput()
	if code := exitCode(err); code != 0 || !strings.Contains(string(out), "removed: svc-new") {
		t.Fatalf("ebpfwd reload: exit %d, output %q; want 0 and what it did", code, out)
	}
	out, err = exec.Command(e2e.Bin, "reload", "--instance", "e2e-not-running-"+fmt.Sprint(os.Getpid())).CombinedOutput()
	if code := exitCode(err); code != 1 || !strings.Contains(string(out), "is not running") {
		t.Fatalf("ebpfwd reload of an instance that does not run: exit %d, output %q", code, out)
	}
}

// steadyConns opens connections one after the other (bounded to 30 s)
// until checked.
type steadyConns struct {
	stop          chan struct{}
	wg            sync.WaitGroup
	tried, failed atomic.Int64
	firstFailure  atomic.Value
}

func connectSteadily(t *testing.T, ns *topo.NS, addr string) *steadyConns {
	s := &steadyConns{stop: make(chan struct{})}
	s.wg.Go(func() {
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
			select {
			case <-s.stop:
				return
			default:
			}
			s.tried.Add(1)
			if err := e2e.Exchange(t, ns, addr, 4<<10, 5*time.Second); err != nil {
				s.failed.Add(1)
				s.firstFailure.CompareAndSwap(nil, err.Error())
			}
		}
	})
	return s
}

// check stops the connections and fails the test if any failed.
func (s *steadyConns) check(t *testing.T, what string) {
	t.Helper()
	close(s.stop)
	s.wg.Wait()
	if n := s.failed.Load(); n > 0 || s.tried.Load() < 5 {
		t.Fatalf("%d of %d connections %s failed across the reload (first: %v)", n, s.tried.Load(), what, s.firstFailure.Load())
	}
}

// exitCode is a command's exit status (0 for a nil error, -1 when it did
// not run).
func exitCode(err error) int {
	if err == nil {
		return 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	return -1
}

const reloadTC = `services:
- name: tc-tcp
  addr: "10.36.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "$NODE:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`

// TestReloadTC: a reload that changes a tc service's nodes updates the
// kernel's maps in place: kernel flows in progress keep their node and
// keep going, new flows go to the new node, in the kernel, and no
// connection is refused meanwhile.
func TestReloadTC(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-rltc-c")
	gw := testutil.NewNS(t, "e2e-rltc-g")
	server := testutil.NewNS(t, "e2e-rltc-s")
	testutil.Veth(t, client, "c0", "10.36.1.2/24", gw, "g0", "10.36.1.1/24")
	testutil.Veth(t, gw, "g1", "10.36.2.1/24", server, "s0", "10.36.2.2/24")
	if err := server.IP("addr", "add", "10.36.2.3/24", "dev", "s0"); err != nil {
		t.Fatal(err)
	}
	e2e.EchoIn(t, server, "10.36.2.2:9000")
	second := e2e.EchoIn(t, server, "10.36.2.3:9000")
	vars := map[string]string{"GW": gw.Name, "NODE": "10.36.2.2"}
	d := e2e.Start(t, "reload-tc", e2e.Config(reloadTC, vars), e2e.Options{})
	held := holdConn(t, client, "10.36.1.1:8000")

	steady := connectSteadily(t, client, "10.36.1.1:8000")
	vars["NODE"] = "10.36.2.3"
	if err := os.WriteFile(d.Config, []byte(e2e.Config(reloadTC, vars)), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	if err := d.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, 15*time.Second, "configuration reloaded", "changed: tc-tcp")
	time.Sleep(300 * time.Millisecond)
	steady.check(t, "to the tc service")
	held.roundTrip(t, "after the reload (a kernel flow to the old node)")

	before := second.Count()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, client, "tcp", "10.36.1.1:8000")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	(&heldConn{c: c}).roundTrip(t, "on a new connection after the reload")
	if got := second.Count() - before; got != 1 {
		t.Fatalf("the new node got %d new connections, want 1", got)
	}
	out := conns(t, d)
	flow := regexp.MustCompile(`(?m)^tc-tcp\s+tc\s+tcp\s+` + regexp.QuoteMeta(c.LocalAddr().String()) + `\s+server-0\s+10\.36\.2\.3:9000`)
	if !flow.MatchString(out) {
		t.Fatalf("the new connection is not a kernel flow to the new node:\n%s", out)
	}
}
