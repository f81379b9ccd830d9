package test

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// The tc datapath crosses into netns.out over a splice link: a veth pair
// the daemon creates between the listen namespace and netns.out, with
// addresses from 169.254.200.0/24 (and fd65:6270:6677::/64); the node sees
// the listen end's address as the source.
const (
	spliceListenAddr  = "169.254.200.1"
	spliceListenAddr6 = "fd65:6270:6677::1"
)

// seedOnTC is the seed 000 service without its chain, on the tc datapath:
// it listens in ns1 and dials from the daemon's own namespace (no
// netns.out), where the target is local and ns1 has no route to it.
const seedOnTC = `services:
- name: service-0
  addr: "10.0.0.1:8000"
  handler:
    type: tcp
  listener:
    type: tcp
  forwarder:
    nodes:
    - name: target-0
      addr: 10.0.1.11:8000
  metadata:
    netns: $NS1
    datapath: tc
`

// spliceLinksIn lists the splice links (named ebs...) in ns, from `ip -n`.
func spliceLinksIn(t *testing.T, ns *topo.NS) []string {
	t.Helper()
	out, err := exec.Command("ip", "-n", ns.Name, "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s link show: %v\n%s", ns.Name, err, out)
	}
	var names []string
	for _, m := range regexp.MustCompile(`(?m)^\d+:\s+(ebs[0-9a-f]+)[@:]`).FindAllStringSubmatch(string(out), -1) {
		names = append(names, m[1])
	}
	return names
}

// pinDirsOf lists what an instance has pinned: its namespaces' pin
// directories under /sys/fs/bpf/ebpfwd/<instance>/ (as "<instance>/<dir>"),
// or the instance's directory itself if it is there but empty.
func pinDirsOf(instance string) []string {
	root := filepath.Join("/sys/fs/bpf/ebpfwd", instance)
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil
	}
	if len(entries) == 0 {
		return []string{instance}
	}
	var dirs []string
	for _, e := range entries {
		dirs = append(dirs, instance+"/"+e.Name())
	}
	return dirs
}

// requireCleanExit stops d with SIGTERM and checks that it exited 0 and
// left no splice link in any of nss and no pins.
func requireCleanExit(t *testing.T, d *e2e.Daemon, nss ...*topo.NS) {
	t.Helper()
	if code, err := d.Stop(); err != nil || code != 0 {
		t.Fatalf("daemon stop: status %d, %v", code, err)
	}
	for _, ns := range nss {
		if links := spliceLinksIn(t, ns); len(links) > 0 {
			t.Errorf("splice links %v left in %s after exit", links, ns.Name)
		}
	}
	if dirs := pinDirsOf(d.Instance); len(dirs) > 0 {
		t.Errorf("pin directories %v left after exit", dirs)
	}
}

// heldFlow opens a TCP connection from ns to addr, moves a few bytes and
// returns it open, so that `ebpfwd conns` can list it.
func heldFlow(t *testing.T, ns *topo.NS, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, ns, "tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		c.Close()
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
		c.Close()
		t.Fatal(err)
	}
	return c
}

// TestTCSpliceSeed runs the seed 000 shape on tc: the service listens in
// ns1, the target lives in the namespace playing the default one (where
// the daemon runs), and ns1 cannot route there. The splice link is the
// only way across.
func TestTCSpliceSeed(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	host := testutil.NewNS(t, "e2e-spl-host")
	ns1 := testutil.NewNS(t, "e2e-spl-ns1")
	ns2 := testutil.NewNS(t, "e2e-spl-ns2")
	testutil.Veth(t, host, "veth0", "10.0.0.11/24", ns1, "veth1", "10.0.0.1/24")
	testutil.Veth(t, host, "veth2", "10.0.1.11/24", ns2, "veth3", "10.0.1.1/24")
	target := e2e.EchoIn(t, host, "10.0.1.11:8000")

	d := e2e.Start(t, "tc-splice-seed", e2e.Config(seedOnTC, map[string]string{"NS1": ns1.Name}), e2e.Options{In: host})
	for _, ns := range []*topo.NS{host, ns1} {
		if links := spliceLinksIn(t, ns); len(links) != 1 {
			t.Fatalf("splice links in %s: %v, want one", ns.Name, links)
		}
	}
	link := spliceLinksIn(t, ns1)[0]
	if n := tcxPrograms(t, e2e.Handle(t, ns1), link); n != 1 {
		t.Errorf("%d tcx programs on the splice end %s in ns1, want 1", n, link)
	}
	if links := spliceLinksIn(t, ns2); len(links) != 0 {
		t.Errorf("splice links %v in ns2, which the service does not use", links)
	}

	t.Run("1 MiB each way", func(t *testing.T) {
		if err := e2e.Exchange(t, host, "10.0.0.1:8000", 1<<20, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a held connection is a kernel flow via the splice link", func(t *testing.T) {
		c := heldFlow(t, host, "10.0.0.1:8000")
		defer c.Close()
		local := c.LocalAddr().String()
		out := conns(t, d)
		flow := regexp.MustCompile(`(?m)^service-0\s+tc\s+tcp\s+` + regexp.QuoteMeta(local) +
			`\s+target-0\s+10\.0\.1\.11:8000\s+established.*via ` + regexp.QuoteMeta(spliceListenAddr) + `:`)
		if !flow.MatchString(out) {
			t.Fatalf("conns does not list the connection as a tc flow via the splice link:\n%s", out)
		}
		if regexp.MustCompile(`(?m)^service-0\s+userspace`).MatchString(out) {
			t.Fatalf("the connection reached the userspace listener:\n%s", out)
		}
	})

	if got := target.Sources(); !slices.Equal(got, []string{spliceListenAddr}) {
		t.Errorf("target saw connections from %v, want only the splice address %s", got, spliceListenAddr)
	}
	requireCleanExit(t, d, host, ns1, ns2)
	if n := tcxPrograms(t, e2e.Handle(t, ns1), "veth1"); n != 0 {
		t.Errorf("%d tcx programs left on veth1 after exit", n)
	}
}

// spliceOut is client ns -> listen ns A (the services) -> netns.out B,
// where the targets listen on addresses of an interface of B that A has no
// route to.
const spliceOut = `services:
- name: out-tcp
  addr: "10.33.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.33.9.2:9000"}
  metadata: {netns: $A, netns.out: $B, datapath: tc}
- name: out-udp
  addr: "10.33.1.1:8001"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}} # tc keeps a flow: sessions kept alive
  forwarder:
    nodes:
    - {name: target-0, addr: "10.33.9.2:9001"}
  metadata: {netns: $A, netns.out: $B, datapath: tc}
- name: out-tcp6
  addr: "[fd00:33:1::1]:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "[fd00:33:9::2]:9000"}
  metadata: {netns: $A, netns.out: $B, datapath: tc}
`

type spliceOutTopo struct {
	client, a, b *topo.NS
	target       *e2e.AcceptLog // TCP, IPv4
	target6      *e2e.AcceptLog // TCP, IPv6
	vars         map[string]string
}

func newSpliceOutTopo(t *testing.T, prefix string) spliceOutTopo {
	t.Helper()
	tp := spliceOutTopo{client: testutil.NewNS(t, prefix+"-c"), a: testutil.NewNS(t, prefix+"-a"), b: testutil.NewNS(t, prefix+"-b")}
	testutil.Veth(t, tp.client, "c0", "10.33.1.2/24", tp.a, "a0", "10.33.1.1/24")
	// The targets' addresses sit on a veth pair inside B (this kernel may
	// have no dummy driver): local to B, on an interface, not loopback.
	testutil.Veth(t, tp.b, "t0", "10.33.9.2/24", tp.b, "t1", "")
	for _, step := range []struct {
		ns   *topo.NS
		args []string
	}{
		{tp.client, []string{"addr", "add", "fd00:33:1::2/64", "dev", "c0", "nodad"}},
		{tp.a, []string{"addr", "add", "fd00:33:1::1/64", "dev", "a0", "nodad"}},
		{tp.b, []string{"addr", "add", "fd00:33:9::2/64", "dev", "t0", "nodad"}},
	} {
		if err := step.ns.IP(step.args...); err != nil {
			t.Fatal(err)
		}
	}
	tp.target = e2e.EchoIn(t, tp.b, "10.33.9.2:9000")
	tp.target6 = e2e.EchoIn(t, tp.b, "[fd00:33:9::2]:9000")
	e2e.UDPEchoIn(t, tp.b, "10.33.9.2:9001")
	tp.vars = map[string]string{"A": tp.a.Name, "B": tp.b.Name}

	// Without the splice link the targets are out of reach from A.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for _, addr := range []string{"10.33.9.2:9000", "[fd00:33:9::2]:9000"} {
		if c, err := e2e.DialFrom(ctx, t, tp.a, "tcp", addr); err == nil {
			c.Close()
			t.Fatalf("%s is reachable from the listen namespace; the test would prove nothing", addr)
		}
	}
	return tp
}

// TestTCSpliceNetnsOut forwards TCP (IPv4 and IPv6) and UDP from A to
// targets in B over the splice link, 100 concurrent flows each.
func TestTCSpliceNetnsOut(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newSpliceOutTopo(t, "e2e-splo")
	d := e2e.Start(t, "tc-splice-out", e2e.Config(spliceOut, tp.vars), e2e.Options{})
	// One link for the three services.
	for _, ns := range []*topo.NS{tp.a, tp.b} {
		if links := spliceLinksIn(t, ns); len(links) != 1 {
			t.Fatalf("splice links in %s: %v, want one shared by every service", ns.Name, links)
		}
	}

	const flows = 100
	concurrently := func(t *testing.T, run func(i int) error) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, flows)
		for i := range flows {
			wg.Go(func() {
				if err := run(i); err != nil {
					errs <- fmt.Errorf("flow %d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	}

	t.Run("TCP 100 concurrent flows byte-exact", func(t *testing.T) {
		concurrently(t, func(int) error {
			return e2e.Exchange(t, tp.client, "10.33.1.1:8000", 256<<10, 60*time.Second)
		})
		if got := tp.target.Sources(); !slices.Equal(got, []string{spliceListenAddr}) {
			t.Errorf("target saw connections from %v, want only the splice address %s", got, spliceListenAddr)
		}
	})

	t.Run("IPv6 TCP 100 concurrent flows byte-exact", func(t *testing.T) {
		concurrently(t, func(int) error {
			return e2e.Exchange(t, tp.client, "[fd00:33:1::1]:8000", 256<<10, 60*time.Second)
		})
		if got := tp.target6.Sources(); !slices.Equal(got, []string{spliceListenAddr6}) {
			t.Errorf("target saw connections from %v, want only the splice address %s", got, spliceListenAddr6)
		}
	})

	t.Run("UDP 100 concurrent flows byte-exact", func(t *testing.T) {
		concurrently(t, func(int) error {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			c, err := e2e.DialFrom(ctx, t, tp.client, "udp", "10.33.1.1:8001")
			if err != nil {
				return err
			}
			return peer.UDPExchange(ctx, c, 20, 1400)
		})
	})

	t.Run("flows are kernel flows via the splice link", func(t *testing.T) {
		c := heldFlow(t, tp.client, "10.33.1.1:8000")
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		uc, err := e2e.DialFrom(ctx, t, tp.client, "udp", "10.33.1.1:8001")
		if err != nil {
			t.Fatal(err)
		}
		if err := peer.UDPExchange(ctx, uc, 1, 100); err != nil {
			t.Fatal(err)
		}
		out := conns(t, d)
		via := `.*via ` + regexp.QuoteMeta(spliceListenAddr) + `:`
		for _, re := range []string{
			`(?m)^out-tcp\s+tc\s+tcp\s+` + regexp.QuoteMeta(c.LocalAddr().String()) + `\s+target-0\s+10\.33\.9\.2:9000\s+established` + via,
			`(?m)^out-udp\s+tc\s+udp\s+` + regexp.QuoteMeta(uc.LocalAddr().String()) + `\s+target-0\s+10\.33\.9\.2:9001` + via,
		} {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("conns has no line matching %s:\n%s", re, out)
			}
		}
		if regexp.MustCompile(`(?m)^out-\S+\s+userspace`).MatchString(out) {
			t.Errorf("a flow reached the userspace listener:\n%s", out)
		}
	})

	requireCleanExit(t, d, tp.a, tp.b, tp.client)
}

// TestTCSpliceCrashRecovery: SIGTERM removes splice links and pins; SIGKILL
// leaves them, and the next start of the same instance adopts them (so
// flows over them would survive) and forwards again.
func TestTCSpliceCrashRecovery(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newSpliceOutTopo(t, "e2e-splk")
	instance := fmt.Sprintf("e2e-splice-crash-%08x", rand.Uint32())
	// The harness gives every daemon a unique --instance; ours comes
	// later on the command line and wins, so both runs are one instance.
	opts := e2e.Options{Args: []string{"--instance", instance}}
	yaml := e2e.Config(spliceOut, tp.vars)
	start := func(name string) *e2e.Daemon {
		t.Helper()
		d := e2e.Start(t, name, yaml, opts)
		d.Instance = instance
		if err := e2e.Exchange(t, tp.client, "10.33.1.1:8000", 256<<10, 20*time.Second); err != nil {
			t.Fatalf("%s: exchange over the splice link: %v", name, err)
		}
		return d
	}

	killed := start("tc-splice-killed")
	links := spliceLinksIn(t, tp.a)
	if len(links) != 1 {
		t.Fatalf("splice links in A: %v, want one", links)
	}
	killed.Crash(t)
	// Nobody cleaned up: the link (with the program still attached
	// through its pinned tcx link) and the pins are still there.
	if got := spliceLinksIn(t, tp.a); !slices.Equal(got, links) {
		t.Fatalf("splice links in A after SIGKILL: %v, want %v still there", got, links)
	}
	if got := spliceLinksIn(t, tp.b); len(got) != 1 {
		t.Fatalf("splice links in B after SIGKILL: %v, want one still there", got)
	}
	if n := tcxPrograms(t, e2e.Handle(t, tp.a), links[0]); n != 1 {
		t.Fatalf("%d tcx programs on the stale splice end, want the pinned one", n)
	}
	if dirs := pinDirsOf(instance); len(dirs) == 0 {
		t.Fatal("no pins left after SIGKILL: the test would prove nothing")
	}

	restarted := start("tc-splice-restarted")
	restarted.WaitLog(t, 5*time.Second, "splice link of a previous run adopted", links[0])
	for _, ns := range []*topo.NS{tp.a, tp.b} {
		if got := spliceLinksIn(t, ns); len(got) != 1 {
			t.Errorf("splice links in %s after restart: %v, want exactly the new one", ns.Name, got)
		}
	}
	if n := tcxPrograms(t, e2e.Handle(t, tp.a), links[0]); n != 1 {
		t.Errorf("%d tcx programs on the new splice end, want 1", n)
	}
	requireCleanExit(t, restarted, tp.a, tp.b, tp.client)
}

// TestTCCrashThenNamespaceDropped: a daemon killed while serving a tc
// service in namespace A over a splice link to B leaves its program
// attached, its pins and the link; the next start of the instance, with a
// configuration that serves nothing in A, removes all of it: the dropped
// namespace must not go on translating a service nobody runs.
func TestTCCrashThenNamespaceDropped(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newSpliceOutTopo(t, "e2e-spld")
	instance := fmt.Sprintf("e2e-splice-drop-%08x", rand.Uint32())
	opts := e2e.Options{Args: []string{"--instance", instance}}

	killed := e2e.Start(t, "tc-ns-killed", e2e.Config(spliceOut, tp.vars), opts)
	killed.Instance = instance
	if err := e2e.Exchange(t, tp.client, "10.33.1.1:8000", 64<<10, 20*time.Second); err != nil {
		t.Fatalf("exchange over the splice link: %v", err)
	}
	links := spliceLinksIn(t, tp.a)
	if len(links) != 1 {
		t.Fatalf("splice links in A: %v, want one", links)
	}
	killed.Crash(t)
	if n := tcxPrograms(t, e2e.Handle(t, tp.a), "a0"); n != 1 {
		t.Fatalf("%d tcx programs on a0 after SIGKILL, want the pinned one: the test would prove nothing", n)
	}

	// The next configuration has a userspace service in B only.
	const elsewhere = `services:
- name: in-b
  addr: "10.33.9.2:7100"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.33.9.2:9000"}
  metadata: {netns: $B, netns.out: $B, datapath: userspace}
`
	next := e2e.Start(t, "tc-ns-next", e2e.Config(elsewhere, tp.vars), opts)
	next.Instance = instance
	next.WaitLog(t, 5*time.Second, "removed the tc datapath a previous run left in a namespace this run does not serve", tp.a.Name)
	for _, ns := range []*topo.NS{tp.a, tp.b} {
		if got := spliceLinksIn(t, ns); len(got) != 0 {
			t.Errorf("splice links %v left in %s", got, ns.Name)
		}
	}
	if n := tcxPrograms(t, e2e.Handle(t, tp.a), "a0"); n != 0 {
		t.Errorf("%d tcx programs left on a0", n)
	}
	if dirs := pinDirsOf(instance); len(dirs) != 0 {
		t.Errorf("pins %v left although no namespace runs the tc datapath", dirs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if c, err := e2e.DialFrom(ctx, t, tp.client, "tcp", "10.33.1.1:8000"); err == nil {
		c.Close()
		t.Error("the dropped namespace still forwards the service of the killed run")
	}
	if err := e2e.Exchange(t, tp.b, "10.33.9.2:7100", 64<<10, 10*time.Second); err != nil {
		t.Fatalf("the next run's own service: %v", err)
	}
	requireCleanExit(t, next, tp.a, tp.b)
}
