package test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// forwardTCP is one tcp service listening at 127.0.0.1:8000 in $LISTEN and
// forwarding to 127.0.0.1:9000 as seen from $OUT.
const forwardTCP = `services:
- name: fwd
  addr: 127.0.0.1:8000
  handler:
    type: tcp
  listener:
    type: tcp
  forwarder:
    nodes:
    - name: target-0
      addr: 127.0.0.1:9000
  metadata:
    netns: $LISTEN
    netns.out: $OUT
`

// crossNS is the common fixture: clients in one namespace, the target echo
// server in another, and a daemon forwarding between them.
type crossNS struct {
	client, target *topo.NS
	target0        *e2e.AcceptLog
	d              *e2e.Daemon
}

func newCrossNS(t *testing.T, prefix string, opts e2e.Options) crossNS {
	t.Helper()
	f := crossNS{client: testutil.NewNS(t, prefix+"-c"), target: testutil.NewNS(t, prefix+"-t")}
	f.target0 = e2e.EchoIn(t, f.target, "127.0.0.1:9000")
	f.d = e2e.Start(t, prefix, e2e.Config(forwardTCP, map[string]string{
		"LISTEN": f.client.Name, "OUT": f.target.Name,
	}), opts)
	return f
}

// sameNS reports whether two namespace files name the same namespace.
func sameNS(a, b string) (bool, error) {
	var sa, sb syscall.Stat_t
	if err := syscall.Stat(a, &sa); err != nil {
		return false, err
	}
	if err := syscall.Stat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// processIn starts a long-sleeping process inside ns and returns the path
// of its network namespace under /proc, once the process has entered ns.
func processIn(t *testing.T, ns *topo.NS) string {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+ns.Path(), "sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start a process in %s: %v", ns.Name, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	path := "/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/net"
	deadline := time.Now().Add(5 * time.Second)
	for {
		same, err := sameNS(path, ns.Path())
		if err == nil && same {
			return path
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d did not enter %s within 5s (last error: %v)", cmd.Process.Pid, ns.Name, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestListenByPath gives the listen namespace as a path instead of a name:
// the bind mount under /var/run/netns, and /proc/PID/ns/net of a process
// living in the namespace (how one joins a container's namespace).
func TestListenByPath(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	byMount := testutil.NewNS(t, "e2e-path-a")
	byProc := testutil.NewNS(t, "e2e-path-b")
	target := testutil.NewNS(t, "e2e-path-t")
	e2e.EchoIn(t, target, "127.0.0.1:9000")
	procPath := processIn(t, byProc)

	tests := []struct {
		name   string
		client *topo.NS
		netns  string
	}{
		{"bind mount path", byMount, byMount.Path()},
		{"/proc/PID/ns/net", byProc, procPath},
	}
	yaml := "services:\n"
	for i, tc := range tests {
		yaml += fmt.Sprintf(`- name: svc-%d
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata:
    netns: %s
    netns.out: %s
`, i, tc.netns, target.Name)
	}
	e2e.Start(t, "listen-by-path", yaml, e2e.Options{})
	for _, tc := range tests {
		if err := e2e.Exchange(t, tc.client, "127.0.0.1:8000", 256<<10, 20*time.Second); err != nil {
			t.Errorf("service with netns %s: %v", tc.netns, err)
		}
	}
}

// TestNetnsOut listens in A and dials the target from B, where the target
// is reachable while it is not from A.
func TestNetnsOut(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	a := testutil.NewNS(t, "e2e-out-a")
	b := testutil.NewNS(t, "e2e-out-b")
	tg := testutil.NewNS(t, "e2e-out-t")
	testutil.Veth(t, b, "veth-b", "10.0.2.1/24", tg, "veth-t", "10.0.2.2/24")
	target := e2e.EchoIn(t, tg, "10.0.2.2:9000")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if c, err := e2e.DialFrom(ctx, t, a, "tcp", "10.0.2.2:9000"); err == nil {
		c.Close()
		t.Fatal("the target is reachable from the listen namespace; the test would prove nothing")
	}

	yaml := e2e.Config(`services:
- name: svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.0.2.2:9000"}
  metadata:
    netns: $A
    netns.out: $B
`, map[string]string{"A": a.Name, "B": b.Name})
	e2e.Start(t, "netns-out", yaml, e2e.Options{})
	if err := e2e.Exchange(t, a, "127.0.0.1:8000", 1<<20, 20*time.Second); err != nil {
		t.Fatalf("A -> (netns.out B) -> target: %v", err)
	}
	if got := target.Sources(); !slices.Equal(got, []string{"10.0.2.1"}) {
		t.Errorf("target saw connections from %v, want only B's 10.0.2.1", got)
	}
}

// TestNodeFailover: with one of two nodes down (nothing listening), every
// connection must still reach the other, whichever the selector tries first.
func TestNodeFailover(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tests := []struct {
		name string
		down int // index of the node with nothing listening
	}{
		{"first node down", 0},
		{"second node down", 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ns := testutil.NewNS(t, "e2e-failover")
			ports := []int{9001, 9002}
			e2e.EchoIn(t, ns, fmt.Sprintf("127.0.0.1:%d", ports[1-tc.down]))
			yaml := e2e.Config(`services:
- name: svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    selector: {strategy: round, maxFails: 1, failTimeout: 10s}
    nodes:
    - {name: node-0, addr: "127.0.0.1:9001"}
    - {name: node-1, addr: "127.0.0.1:9002"}
  metadata:
    netns: $NS
    netns.out: $NS
`, map[string]string{"NS": ns.Name})
			e2e.Start(t, "failover", yaml, e2e.Options{})
			for i := range 20 {
				if err := e2e.Exchange(t, ns, "127.0.0.1:8000", 64<<10, 10*time.Second); err != nil {
					t.Fatalf("connection %d with node-%d down: %v", i, tc.down, err)
				}
			}
		})
	}
}

// TestUDP forwards datagrams from clients in one namespace, through a udp
// service in a second, to an echo server in a third, all over veth links.
func TestUDP(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	cl := testutil.NewNS(t, "e2e-udp-cl")
	svc := testutil.NewNS(t, "e2e-udp-svc")
	tg := testutil.NewNS(t, "e2e-udp-t")
	testutil.Veth(t, cl, "veth-cl", "10.0.21.2/24", svc, "veth-in", "10.0.21.1/24")
	testutil.Veth(t, svc, "veth-out", "10.0.20.1/24", tg, "veth-t", "10.0.20.2/24")
	e2e.UDPEchoIn(t, tg, "10.0.20.2:9053")
	yaml := e2e.Config(`services:
- name: udp-svc
  addr: "10.0.21.1:8053"
  handler: {type: udp}
  listener: {type: udp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.0.20.2:9053"}
  metadata:
    netns: $SVC
    netns.out: $SVC
`, map[string]string{"SVC": svc.Name})
	e2e.Start(t, "udp", yaml, e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const clients, datagrams, maxSize = 2, 200, 1400
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			c, err := e2e.DialFrom(ctx, t, cl, "udp", "10.0.21.1:8053")
			if err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
				return
			}
			if err := peer.UDPExchange(ctx, c, datagrams, maxSize); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestConcurrent100x1MiB runs 100 connections at once, 1 MiB each way,
// every byte verified in both directions.
func TestConcurrent100x1MiB(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	f := newCrossNS(t, "e2e-conc", e2e.Options{})
	const conns, size = 100, 1 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	errs := make(chan error, conns)
	var wg sync.WaitGroup
	for i := range conns {
		wg.Go(func() {
			c, err := e2e.DialFrom(ctx, t, f.client, "tcp", "127.0.0.1:8000")
			if err == nil {
				err = peer.Exchange(ctx, c, size)
			}
			if err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	var failed []error
	for err := range errs {
		failed = append(failed, err)
	}
	if len(failed) > 0 {
		t.Fatalf("%d of %d connections failed:\n%v", len(failed), conns, errors.Join(failed...))
	}
}

// TestFDsFlatUnderChurn: 2000 short connections must not leak descriptors.
func TestFDsFlatUnderChurn(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	f := newCrossNS(t, "e2e-fds", e2e.Options{})
	churn := func(n int) {
		t.Helper()
		// Few workers: Go's splice keeps a pool of pipes (2 fds each) per
		// concurrent copy, freed only by the daemon's GC; with high
		// concurrency that pool alone would swing the count by more than
		// the allowed 10. A leak of even one fd per connection shows as
		// +2000 either way.
		const workers = 2
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		jobs := make(chan int)
		errs := make(chan error, n)
		var wg sync.WaitGroup
		for range workers {
			wg.Go(func() {
				for i := range jobs {
					c, err := e2e.DialFrom(ctx, t, f.client, "tcp", "127.0.0.1:8000")
					if err == nil {
						err = peer.Exchange(ctx, c, 1024)
					}
					if err != nil {
						errs <- fmt.Errorf("connection %d: %w", i, err)
					}
				}
			})
		}
		for i := range n {
			jobs <- i
		}
		close(jobs)
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatalf("churn: %v", err)
		}
	}
	// Warm up first, with the same concurrency, so lazily opened
	// descriptors (namespace handles, epoll, pooled splice pipes) are
	// counted in "before".
	churn(50)
	before := f.d.SettledFDs(t)
	churn(2000)
	after := f.d.SettledFDs(t)
	t.Logf("daemon fds: %d before %v, %d after 2000 connections %v", len(before), e2e.FDKinds(before), len(after), e2e.FDKinds(after))
	if len(after) > len(before)+10 {
		t.Fatalf("daemon fds grew from %d to %d over 2000 connections (allowed: +10)", len(before), len(after))
	}
}
