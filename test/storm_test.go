package test

import (
	"context"
	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// daemonThreads is the daemon's thread count, as /proc/PID/status says.
func daemonThreads(t *testing.T, d *e2e.Daemon) int {
	t.Helper()
	n, ok := threadsOf(d.Pid())
	if !ok {
		t.Fatalf("no thread count in /proc/%d/status", d.Pid())
	}
	return n
}

// threadsOf reads a process's thread count from /proc/PID/status; false
// once the process is gone.
func threadsOf(pid int) (int, bool) {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			return n, err == nil
		}
	}
	return 0, false
}

// blackholeIn makes 198.51.100.2 a black hole inside ns: it sits behind a
// veth whose both ends stay there, with a neighbour entry nobody answers
// for, so connects to it stay pending until their timeout.
func blackholeIn(t *testing.T, ns *topo.NS) {
	t.Helper()
	for _, args := range [][]string{
		{"link", "add", "bh0", "type", "veth", "peer", "name", "bh1"},
		{"addr", "add", "198.51.100.1/24", "dev", "bh0"},
		{"link", "set", "bh0", "up"},
		{"link", "set", "bh1", "up"},
		{"neigh", "add", "198.51.100.2", "lladdr", "02:00:5e:00:53:02", "dev", "bh0", "nud", "permanent"},
	} {
		if err := ns.IP(args...); err != nil {
			t.Fatal(err)
		}
	}
}

// TestPendingDialStorm: thousands of clients of a service whose node never
// answers (its SYNs vanish inside a test namespace) leave the daemon up
// with a bounded number of threads (a pending dial holds none), its other
// service serving throughout, and threads and descriptors back near their
// baseline once the dials have timed out.
func TestPendingDialStorm(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	const clients = 3000
	c := testutil.NewNS(t, "e2e-storm-c")
	dead := testutil.NewNS(t, "e2e-storm-d")
	alive := testutil.NewNS(t, "e2e-storm-a")
	blackholeIn(t, dead)
	e2e.EchoIn(t, alive, "127.0.0.1:9000")
	yaml := e2e.Config(`services:
- name: blackholed
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: dead-0, addr: "198.51.100.2:80"}
  metadata: {netns: $C, netns.out: $DEAD, datapath: userspace}
- name: other
  addr: 127.0.0.1:8001
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: alive-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $ALIVE, datapath: userspace}
`, map[string]string{"C": c.Name, "DEAD": dead.Name, "ALIVE": alive.Name})
	d := e2e.Start(t, "storm", yaml, e2e.Options{})
	if err := e2e.Exchange(t, c, "127.0.0.1:8001", 64<<10, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	baseThreads, baseFDs := daemonThreads(t, d), len(d.SettledFDs(t))

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var (
		mu    sync.Mutex
		conns []net.Conn
		wg    sync.WaitGroup
	)
	for range clients {
		wg.Go(func() {
			conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
			if err == nil {
				mu.Lock()
				conns = append(conns, conn)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, conn := range conns {
			conn.Close()
		}
	})
	if len(conns) < clients*9/10 {
		t.Fatalf("only %d of %d clients connected", len(conns), clients)
	}
	// The dials are pending now: the daemon must not hold a thread each,
	// and its other service must answer.
	time.Sleep(time.Second)
	if n := daemonThreads(t, d); n > baseThreads+64 {
		t.Fatalf("%d threads with %d dials pending (baseline %d): a pending dial holds a thread", n, len(conns), baseThreads)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8001", 256<<10, 10*time.Second); err != nil {
		t.Fatalf("the other service during the storm: %v", err)
	}
	if !d.Running() {
		t.Fatal("the daemon died under the storm")
	}
	for _, conn := range conns {
		conn.Close()
	}
	// Every dial ends at the daemon's dial timeout (10s); then threads
	// and descriptors come back (bounded wait).
	var threads, fds int
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(500 * time.Millisecond) {
		threads, fds = daemonThreads(t, d), len(d.OpenFDs(t))
		if threads <= baseThreads+16 && fds <= baseFDs+16 {
			break
		}
	}
	if threads > baseThreads+16 || fds > baseFDs+16 {
		t.Fatalf("after the storm: %d threads (baseline %d), %d fds (baseline %d)", threads, baseThreads, fds, baseFDs)
	}
	if err := e2e.Exchange(t, c, "127.0.0.1:8001", 64<<10, 10*time.Second); err != nil {
		t.Fatalf("the other service after the storm: %v", err)
	}
}
