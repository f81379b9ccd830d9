package netns

import (
	"context"
	"errors"
	"fmt"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// blackholeNS creates a test namespace where 198.51.100.0/24 (TEST-NET-2)
// is on one end of a veth pair whose both ends stay in the namespace. The
// peer's address has a fixed neighbour entry with a MAC address nobody
// owns, so SYNs leave, are dropped by the other end and are never answered
// or refused: connects stay pending until their context ends. Nothing is
// added outside the test namespace. It returns the namespace and the
// address that never answers.
func blackholeNS(t *testing.T) (NS, string) {
	t.Helper()
	ns := newTestNS(t)
	for _, args := range [][]string{
		{"link", "add", "bh0", "type", "veth", "peer", "name", "bh1"},
		{"addr", "add", "198.51.100.1/24", "dev", "bh0"},
		{"link", "set", "bh0", "up"},
		{"link", "set", "bh1", "up"},
		{"neigh", "add", "198.51.100.2", "lladdr", "02:00:5e:00:53:02", "dev", "bh0", "nud", "permanent"},
	} {
		runCmd(t, "ip", append([]string{"-n", ns.name}, args...)...)
	}
	return ns, "198.51.100.2:80"
}

// threadCount is the process's thread count, as /proc/self/status says.
func threadCount(t *testing.T) int {
	t.Helper()
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatalf("parse %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// TestPendingDialsHoldNoThreads: thousands of dials pending at once towards
// an address that never answers must not need a thread each. With the
// thread limit far below the number of dials, the old design (connect on
// the locked thread) dies with "fatal error: thread exhaustion".
func TestPendingDialsHoldNoThreads(t *testing.T) {
	ns, addr := blackholeNS(t)
	const dials, maxThreads = 3000, 200
	prev := debug.SetMaxThreads(maxThreads)
	t.Cleanup(func() { debug.SetMaxThreads(prev) })

	// One dial first, so that the maker and the runtime's long-lived
	// threads and fds exist before the baselines are taken.
	warm, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if _, err := ns.Dial(warm, "tcp", addr); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("warm-up dial = %v, want the context's deadline", err)
	}
	cancel()
	baseThreads, baseFDs := threadCount(t), openFDs(t)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	errs := make(chan error, dials)
	var wg sync.WaitGroup
	for range dials {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := ns.Dial(ctx, "tcp", addr)
			if err == nil {
				conn.Close()
			}
			errs <- err
		}()
	}
	// Sample while the dials are pending.
	peak := 0
	for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		peak = max(peak, threadCount(t))
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("a pending dial ended with %v, want the context's deadline", err)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("error %v is not a net.Error timeout", err)
		}
	}
	t.Logf("threads: %d before, at most %d during %d pending dials, %d after; fds: %d before, %d after",
		baseThreads, peak, dials, threadCount(t), baseFDs, openFDs(t))
	// A few threads may come and go for stat(2) and the netpoller; one per
	// dial may not.
	const slack = 20
	if peak > baseThreads+slack {
		t.Errorf("threads rose from %d to %d while %d dials were pending", baseThreads, peak, dials)
	}
	if now := threadCount(t); now > baseThreads+slack {
		t.Errorf("threads: %d before the dials, %d after", baseThreads, now)
	}
	if now := openFDs(t); now > baseFDs+4 {
		t.Errorf("open fds: %d before the dials, %d after", baseFDs, now)
	}
}

// TestPendingDialEnds: a dial waiting for an answer that never comes ends
// with its context, reported as the net package reports it.
func TestPendingDialEnds(t *testing.T) {
	ns, addr := blackholeNS(t)
	tests := []struct {
		name    string
		ctx     func() (context.Context, context.CancelFunc)
		wantIs  error
		wantMsg string
	}{
		{
			name: "deadline",
			ctx: func() (context.Context, context.CancelFunc) {
				return context.WithTimeout(context.Background(), 100*time.Millisecond)
			},
			wantIs:  context.DeadlineExceeded,
			wantMsg: "i/o timeout",
		},
		{
			name: "canceled",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				time.AfterFunc(100*time.Millisecond, cancel)
				return ctx, cancel
			},
			wantIs:  context.Canceled,
			wantMsg: "operation was canceled",
		},
		{
			name: "already over",
			ctx: func() (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return ctx, cancel
			},
			wantIs:  context.Canceled,
			wantMsg: "operation was canceled",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			done := make(chan error, 1)
			go func() {
				_, err := ns.Dial(ctx, "tcp", addr)
				done <- err
			}()
			var err error
			select {
			case err = <-done:
			case <-time.After(testTimeout):
				t.Fatal("dial did not end with its context")
			}
			want := fmt.Sprintf("dial tcp %s in netns %s: %s", addr, ns, tt.wantMsg)
			if err == nil || err.Error() != want {
				t.Fatalf("Dial = %v, want %q", err, want)
			}
			if !errors.Is(err, tt.wantIs) {
				t.Fatalf("errors.Is(%v, %v) = false", err, tt.wantIs)
			}
		})
	}
}

// TestDialedConns: what Dial returns in another namespace is what the net
// package's dialer returns: a *net.TCPConn or *net.UDPConn with both
// addresses, TCP with keep-alive on and Nagle off.
func TestDialedConns(t *testing.T) {
	ns := newTestNS(t)
	ctx := testContext(t)
	tests := []struct {
		network, listenAddr string
	}{
		{"tcp", "127.0.0.1:0"},
		{"tcp4", "127.0.0.1:0"},
		{"tcp6", "[::1]:0"},
		{"tcp", "[::1]:0"},
		{"udp", "127.0.0.1:0"},
		{"udp6", "[::1]:0"},
	}
	for _, tt := range tests {
		t.Run(tt.network+" "+tt.listenAddr, func(t *testing.T) {
			var target net.Addr
			if strings.HasPrefix(tt.network, "tcp") {
				ln, err := ns.Listen(ctx, tt.network, tt.listenAddr)
				if err != nil {
					t.Skipf("listen (no IPv6 on lo?): %v", err)
				}
				defer ln.Close()
				target = ln.Addr()
			} else {
				pc, err := ns.ListenPacket(ctx, tt.network, tt.listenAddr)
				if err != nil {
					t.Skipf("listen (no IPv6 on lo?): %v", err)
				}
				defer pc.Close()
				target = pc.LocalAddr()
			}
			conn, err := ns.Dial(ctx, tt.network, target.String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer conn.Close()
			if conn.RemoteAddr().String() != target.String() {
				t.Errorf("RemoteAddr = %v, want %v", conn.RemoteAddr(), target)
			}
			host, port, err := net.SplitHostPort(conn.LocalAddr().String())
			if lhost, _, _ := net.SplitHostPort(target.String()); err != nil || host != lhost || port == "0" {
				t.Errorf("LocalAddr = %v, want %s with a port", conn.LocalAddr(), lhost)
			}
			var raw syscall.RawConn
			switch c := conn.(type) {
			case *net.TCPConn:
				if !strings.HasPrefix(tt.network, "tcp") {
					t.Fatalf("%s dial returned %T", tt.network, conn)
				}
				raw, err = c.SyscallConn()
			case *net.UDPConn:
				if !strings.HasPrefix(tt.network, "udp") {
					t.Fatalf("%s dial returned %T", tt.network, conn)
				}
				return
			default:
				t.Fatalf("dial returned %T, want *net.TCPConn or *net.UDPConn", conn)
			}
			if err != nil {
				t.Fatal(err)
			}
			// The net package's dialer defaults: keep-alive after 15s idle,
			// no Nagle delay.
			opts := []struct {
				level, opt, want int
				name             string
			}{
				{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1, "SO_KEEPALIVE"},
				{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15, "TCP_KEEPIDLE"},
				{unix.IPPROTO_TCP, unix.TCP_NODELAY, 1, "TCP_NODELAY"},
			}
			raw.Control(func(fd uintptr) {
				for _, o := range opts {
					if got, err := unix.GetsockoptInt(int(fd), o.level, o.opt); err != nil || got != o.want {
						t.Errorf("%s = %d, %v; want %d", o.name, got, err, o.want)
					}
				}
			})
		})
	}
}

// TestDialAfterDeleteWithMaker: once a namespace's name is deleted, dials by
// that name fail with ErrGone even though a maker for the namespace still
// runs (here because another path, an open handle, still names it); the
// maker exits once no path of its own names it, and a new namespace under
// the old name gets a maker of its own.
func TestDialAfterDeleteWithMaker(t *testing.T) {
	setMakerTiming(t, makerTiming{tick: 10 * time.Millisecond, idleTicks: 1000})
	ns := newTestNS(t)
	ctx := testContext(t)
	_, port := echoListener(t, ns)
	addr := "127.0.0.1:" + port
	handle, err := os.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer handle.Close()
	viaHandle, err := Parse(fmt.Sprintf("/proc/self/fd/%d", handle.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	// The maker starts for the handle's path; the name shares it.
	for _, spec := range []NS{viaHandle, ns} {
		conn, err := spec.Dial(ctx, "tcp", addr)
		if err != nil {
			t.Fatalf("dial via %s: %v", spec, err)
		}
		assertEcho(t, conn)
	}
	if !hasMaker(id) {
		t.Fatal("no maker after a dial")
	}

	runCmd(t, "ip", "netns", "del", ns.name)
	_, err = ns.Dial(ctx, "tcp", addr)
	if !errors.Is(err, ErrGone) {
		t.Fatalf("Dial after `ip netns del` = %v, want an error wrapping ErrGone", err)
	}
	if !strings.Contains(err.Error(), ns.name) {
		t.Errorf("Dial error %q does not name the namespace", err)
	}
	if !hasMaker(id) {
		t.Fatal("the maker stopped although its path still names the namespace")
	}
	conn, err := viaHandle.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial via the handle after the name was deleted: %v", err)
	}
	assertEcho(t, conn)

	handle.Close()
	waitNoMaker(t, id) // no path of its own names its namespace
	assertThreadsInOriginal(t)

	// Same name, another namespace: no listener there.
	runCmd(t, "ip", "netns", "add", ns.name)
	runCmd(t, "ip", "-n", ns.name, "link", "set", "lo", "up")
	if conn, err := ns.Dial(ctx, "tcp", addr); err == nil {
		conn.Close()
		t.Fatal("a dial into the re-created namespace reached the listener of the deleted one")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial into the re-created namespace = %v, want connection refused", err)
	}
}

// setMakerTiming gives makers started from now until the test ends timing.
func setMakerTiming(t *testing.T, timing makerTiming) {
	makers.mu.Lock()
	makers.timing = timing
	makers.mu.Unlock()
	t.Cleanup(func() {
		makers.mu.Lock()
		makers.timing = defaultMakerTiming
		makers.mu.Unlock()
	})
}

func hasMaker(id ID) bool {
	makers.mu.Lock()
	defer makers.mu.Unlock()
	return makers.byID[id] != nil
}

// TestIdleMakerExits: a maker without requests exits, returning its thread
// to the original namespace, and the next dial starts a fresh one.
func TestIdleMakerExits(t *testing.T) {
	setMakerTiming(t, makerTiming{tick: 10 * time.Millisecond, idleTicks: 3})
	ns := newTestNS(t)
	ctx := testContext(t)
	_, port := echoListener(t, ns)
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	for round := range 3 {
		conn, err := ns.Dial(ctx, "tcp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatalf("round %d: dial: %v", round, err)
		}
		assertEcho(t, conn)
		waitNoMaker(t, id)
		assertThreadsInOriginal(t)
	}
}

// TestMakerRestoreFailureDiscardsThread: a maker whose thread cannot return
// to the original namespace ends with the thread locked, so the runtime
// destroys it instead of running goroutines on it in the wrong namespace.
func TestMakerRestoreFailureDiscardsThread(t *testing.T) {
	out := inChildWithNS(t, "EBPFWD_NETNS_MAKER_RESTORE_CHILD_NS", makerRestoreFailureChild)
	if out != "" && !strings.Contains(out, "cannot return socket maker thread") {
		t.Fatalf("the child's maker never failed to return its thread:\n%s", out)
	}
}

func makerRestoreFailureChild(t *testing.T, path string) {
	testutil.RequireRoot(t)
	ns, err := Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := testContext(t)
	_, port := echoListener(t, ns)
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	setMakerTiming(t, makerTiming{tick: 10 * time.Millisecond, idleTicks: 1})
	setns = func(fd, nstype int) error {
		if fd == original.fd {
			return syscall.EPERM
		}
		return unix.Setns(fd, nstype)
	}
	t.Cleanup(func() { setns = unix.Setns })
	conn, err := ns.Dial(ctx, "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	assertEcho(t, conn)
	tids := makerThreads()
	if len(tids) != 1 {
		t.Fatalf("maker threads = %v, want one", tids)
	}
	var tid int
	for tid = range tids {
	}
	if tid == os.Getpid() {
		t.Fatal("the maker runs on the main thread")
	}
	taskDir := fmt.Sprintf("/proc/self/task/%d", tid)
	for deadline := time.Now().Add(testTimeout); hasMaker(id) || !errors.Is(statErr(taskDir), os.ErrNotExist); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("maker thread %d, unable to return to the original namespace, still exists", tid)
		}
	}
	setns = unix.Setns
	probeThreadsAvoid(t, tid)
}

func statErr(path string) error {
	_, err := os.Stat(path)
	return err
}

// TestSparesServeDials: dials in quick succession take spare sockets and
// still land in the maker's namespace, and a maker's exit closes the spares
// nobody took.
func TestSparesServeDials(t *testing.T) {
	setMakerTiming(t, makerTiming{tick: 10 * time.Millisecond, idleTicks: 3})
	ns := newTestNS(t)
	ctx := testContext(t)
	// Not an echo listener: its splice(2) pipes stay pooled and would be
	// counted as open fds.
	addr := discardListener(t, ns)
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	before := openFDs(t)
	for i := range 3 * spareCap {
		conn, err := ns.Dial(ctx, "tcp", addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		conn.Close()
	}
	if !hasMaker(id) {
		t.Fatal("no maker after the dials")
	}
	if n := spareFDs(id); n == 0 || n > spareCap {
		t.Errorf("the maker holds %d spares, want 1 to %d", n, spareCap)
	}
	waitNoMaker(t, id)
	// The listener closes its ends as the dialer's closes reach it.
	for deadline := time.Now().Add(testTimeout); openFDs(t) > before; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("open fds: %d before the dials, %d after the maker exited", before, openFDs(t))
		}
	}
}

// waitNoMaker waits until namespace id has no maker.
func waitNoMaker(t *testing.T, id ID) {
	t.Helper()
	for deadline := time.Now().Add(testTimeout); hasMaker(id); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("a maker that should have exited still runs")
		}
	}
}
