package test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// tcRestart is client ns -> gateway ns (services, datapath tc) -> server
// ns. tc-drop is the service a later configuration drops.
const tcRestart = `services:
- name: tc-keep
  addr: "10.34.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "10.34.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`

const tcRestartDropped = `- name: tc-drop
  addr: "10.34.1.1:8002"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "10.34.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`

// restartTimeout bounds a restart in place: drain (nothing to drain in
// these tests), exec, load, adopt, listen.
const restartTimeout = 15 * time.Second

type restartTopo struct {
	client, gw, server *topo.NS
}

// newRestartTopo is client (10.34.1.2) <-> gateway (10.34.1.1, 10.34.2.1)
// <-> server (10.34.2.2, an echo server on :9000), each namespace the
// test's own: the tc tests' usual layout, not only the restart tests'.
func newRestartTopo(t *testing.T, prefix string) restartTopo {
	t.Helper()
	tp := restartTopo{client: testutil.NewNS(t, prefix+"-c"), gw: testutil.NewNS(t, prefix+"-g"), server: testutil.NewNS(t, prefix+"-s")}
	testutil.Veth(t, tp.client, "c0", "10.34.1.2/24", tp.gw, "g0", "10.34.1.1/24")
	testutil.Veth(t, tp.gw, "g1", "10.34.2.1/24", tp.server, "s0", "10.34.2.2/24")
	e2e.EchoIn(t, tp.server, "10.34.2.2:9000")
	return tp
}

// fixedInstance returns daemon options that give every daemon of a test
// one instance name: the harness passes its own --instance first, and the
// flag package keeps the last.
func fixedInstance(name string) (string, e2e.Options) {
	instance := fmt.Sprintf("e2e-%s-%08x", name, rand.Uint32())
	return instance, e2e.Options{Args: []string{"--instance", instance, "--drain-timeout", "5s"}}
}

// pacedExchange starts a 20 MiB peer.Exchange (SHA-256 checked both ways)
// from ns to addr with paced writes, so that it spans a restart, and
// returns once bytes have come back. The transfer takes about 6s.
func pacedExchange(t *testing.T, ns *topo.NS, addr string) (local string, done <-chan error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	c, err := e2e.DialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	// 640 writes of 32 KiB, 10ms apart.
	pc := &pacedConn{TCPConn: c.(*net.TCPConn), pause: 10 * time.Millisecond}
	ch := make(chan error, 1)
	go func() { ch <- peer.Exchange(ctx, pc, 20<<20) }()
	deadline := time.Now().Add(10 * time.Second)
	for pc.read.Load() == 0 {
		select {
		case err := <-ch:
			t.Fatalf("transfer ended before it got going: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("no echo within 10s")
		}
	}
	return c.LocalAddr().String(), ch
}

// stillRunning fails the test if the transfer already ended: it would not
// have spanned what the test meant it to span.
func stillRunning(t *testing.T, done <-chan error, what string) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("the transfer ended (%v) before %s: the test proved nothing; make it longer", err, what)
	default:
	}
}

// upgradeTo sends SIGUSR2 and waits until the new process has taken over
// and the old one has exited: the old one let go of the kernel state and
// the new one adopted it. It returns the new process.
func upgradeTo(t *testing.T, d *e2e.Daemon) *e2e.Daemon {
	t.Helper()
	next := d.Upgrade(t, restartTimeout)
	select {
	case <-d.Exited():
	case <-time.After(restartTimeout):
		t.Fatalf("daemon %s: the old process did not exit within %v of the upgrade; output:\n%s", d.Name, restartTimeout, d.Output)
	}
	if next.Pid() == d.Pid() || !next.Running() {
		t.Fatalf("daemon %s: new process %d (running %v) after the upgrade of %d", d.Name, next.Pid(), next.Running(), d.Pid())
	}
	d.WaitLog(t, time.Second, "ebpfwd exiting: the new process serves")
	if n := strings.Count(d.Output.String(), "ebpfwd starting"); n != 2 {
		t.Fatalf("daemon %s started %d times, want 2 (one upgrade); output:\n%s", d.Name, n, d.Output)
	}
	return next
}

// tcFlow matches a service's established kernel flow from client in
// `ebpfwd conns`.
func tcFlow(service, client string) *regexp.Regexp {
	return regexp.MustCompile(`(?m)^` + service + `\s+tc\s+tcp\s+` + regexp.QuoteMeta(client) + `\s+\S+\s+\S+\s+established`)
}

// TestTCRestartKeepsFlows: SIGUSR2 re-executes the daemon in place; a TCP
// flow streaming through the tc datapath keeps going byte-exact across
// it, stays listed, and new connections work afterwards. SIGTERM then
// removes everything.
func TestTCRestartKeepsFlows(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newRestartTopo(t, "e2e-rst")
	instance, opts := fixedInstance("tc-restart")
	d := e2e.Start(t, "tc-restart", e2e.Config(tcRestart, map[string]string{"GW": tp.gw.Name}), opts)
	d.Instance = instance
	gw := e2e.Handle(t, tp.gw)

	local, done := pacedExchange(t, tp.client, "10.34.1.1:8000")
	if out := conns(t, d); !tcFlow("tc-keep", local).MatchString(out) {
		t.Fatalf("conns does not list the flow before the restart:\n%s", out)
	}
	d = upgradeTo(t, d)
	stillRunning(t, done, "the restart completed")
	d.WaitLog(t, time.Second, "adopted the pinned tcx link of a previous run", "g0")
	d.WaitLog(t, time.Second, "reusing the pinned maps of a previous run")
	if out := conns(t, d); !tcFlow("tc-keep", local).MatchString(out) {
		t.Errorf("conns does not list the flow after the restart:\n%s", out)
	}
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gw, ifname); n != 1 {
			t.Errorf("%d tcx programs on %s after the restart, want 1", n, ifname)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("transfer across the restart: %v", err)
	}
	if err := e2e.Exchange(t, tp.client, "10.34.1.1:8000", 1<<20, 20*time.Second); err != nil {
		t.Fatalf("new connection after the restart: %v", err)
	}

	requireCleanExit(t, d, tp.gw)
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gw, ifname); n != 0 {
			t.Errorf("%d tcx programs left on %s after SIGTERM", n, ifname)
		}
	}
}

// TestTCRestartKeepsSpliceFlows: a flow over a splice link (netns.out)
// survives a restart in place; the link is adopted, not recreated.
func TestTCRestartKeepsSpliceFlows(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newSpliceOutTopo(t, "e2e-rspl")
	instance, opts := fixedInstance("tc-restart-splice")
	d := e2e.Start(t, "tc-restart-splice", e2e.Config(spliceOut, tp.vars), opts)
	d.Instance = instance
	links := spliceLinksIn(t, tp.a)
	if len(links) != 1 {
		t.Fatalf("splice links in A: %v, want one", links)
	}
	ifindex := func() int {
		t.Helper()
		var idx int
		err := e2e.Handle(t, tp.a).Do(func() error {
			iface, err := net.InterfaceByName(links[0])
			if err == nil {
				idx = iface.Index
			}
			return err
		})
		if err != nil {
			t.Fatalf("splice link %s in A: %v", links[0], err)
		}
		return idx
	}
	before := ifindex()

	local, done := pacedExchange(t, tp.client, "10.33.1.1:8000")
	d = upgradeTo(t, d)
	stillRunning(t, done, "the restart completed")
	d.WaitLog(t, time.Second, "splice link of a previous run adopted", links[0])
	if after := ifindex(); after != before {
		t.Errorf("splice link %s has ifindex %d after the restart, was %d: it was recreated", links[0], after, before)
	}
	if out := conns(t, d); !tcFlow("out-tcp", local).MatchString(out) {
		t.Errorf("conns does not list the flow after the restart:\n%s", out)
	}
	if err := <-done; err != nil {
		t.Fatalf("transfer over the splice link across the restart: %v", err)
	}
	if err := e2e.Exchange(t, tp.client, "10.33.1.1:8000", 1<<20, 20*time.Second); err != nil {
		t.Fatalf("new connection after the restart: %v", err)
	}
	requireCleanExit(t, d, tp.a, tp.b, tp.client)
}

// TestTCCrashKeepsFlowsAndPrunes: after SIGKILL the kernel keeps
// forwarding; the next start of the instance, with a configuration that
// dropped a service, keeps the flow (maps reused), stops translating the
// dropped service, and removes the link of an interface that vanished
// meanwhile.
func TestTCCrashKeepsFlowsAndPrunes(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newRestartTopo(t, "e2e-crash")
	// A third interface of the gateway, deleted while no daemon runs.
	other := testutil.NewNS(t, "e2e-crash-o")
	testutil.Veth(t, tp.gw, "g2", "10.34.3.1/24", other, "o0", "10.34.3.2/24")
	instance, opts := fixedInstance("tc-crash")
	vars := map[string]string{"GW": tp.gw.Name}

	killed := e2e.Start(t, "tc-crash-killed", e2e.Config(tcRestart+tcRestartDropped, vars), opts)
	killed.Instance = instance
	// The dropped service works while configured.
	if err := e2e.Exchange(t, tp.client, "10.34.1.1:8002", 64<<10, 10*time.Second); err != nil {
		t.Fatalf("service to be dropped: %v", err)
	}
	local, done := pacedExchange(t, tp.client, "10.34.1.1:8000")
	killed.Crash(t)
	if err := tp.gw.IP("link", "del", "g2"); err != nil {
		t.Fatal(err)
	}

	restarted := e2e.Start(t, "tc-crash-restarted", e2e.Config(tcRestart, vars), opts)
	restarted.Instance = instance
	stillRunning(t, done, "the next start was ready")
	restarted.WaitLog(t, time.Second, "reusing the pinned maps of a previous run")
	restarted.WaitLog(t, time.Second, "removed services of a previous run")
	restarted.WaitLog(t, time.Second, "removed tcx links of a previous run", "link_g2_")
	if out := conns(t, restarted); !tcFlow("tc-keep", local).MatchString(out) {
		t.Errorf("conns does not list the flow the killed daemon set up:\n%s", out)
	}
	if err := <-done; err != nil {
		t.Fatalf("transfer across the crash and the next start: %v", err)
	}
	// Nothing listens on 8002 in the gateway: only a translation that
	// should be gone could connect.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if c, err := e2e.DialFrom(ctx, t, tp.client, "tcp", "10.34.1.1:8002"); err == nil {
		c.Close()
		t.Error("the dropped service still forwards after the next start")
	}
	for _, dir := range pinDirsOf(instance) {
		entries, _ := os.ReadDir("/sys/fs/bpf/ebpfwd/" + dir)
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), "link_g2_") {
				t.Errorf("pin %s/%s of the deleted interface left", dir, e.Name())
			}
		}
	}
	if err := e2e.Exchange(t, tp.client, "10.34.1.1:8000", 1<<20, 20*time.Second); err != nil {
		t.Fatalf("new connection after the next start: %v", err)
	}
	requireCleanExit(t, restarted, tp.gw)
}
