package netns

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

func TestSocketsLiveInTheirNamespace(t *testing.T) {
	ns := newTestNS(t)
	ctx := testContext(t)
	_, port := echoListener(t, ns)
	addr := net.JoinHostPort("127.0.0.1", port)

	conn, err := ns.Dial(ctx, "tcp", addr)
	if err != nil {
		t.Fatalf("dial from the listener's namespace: %v", err)
	}
	assertEcho(t, conn)

	if conn, err := (NS{}).Dial(ctx, "tcp", addr); err == nil {
		conn.Close()
		t.Fatalf("dial %s from the daemon's own namespace reached the listener in %s", addr, ns)
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial from own namespace: %v, want connection refused", err)
	}

	// UDP: a packet socket in the namespace receives what is sent from it.
	pc, err := ns.ListenPacket(ctx, "udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen udp: %v", err)
	}
	defer pc.Close()
	uconn, err := ns.Dial(ctx, "udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatalf("dial udp: %v", err)
	}
	defer uconn.Close()
	if _, err := uconn.Write([]byte("ping")); err != nil {
		t.Fatalf("send udp: %v", err)
	}
	pc.SetReadDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 16)
	n, _, err := pc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("udp read = %q, %v; want ping", buf[:n], err)
	}
}

func TestDialErrorNamesNamespace(t *testing.T) {
	ns := newTestNS(t)
	ln, port := echoListener(t, ns)
	ln.Close() // now nothing listens on port
	addr := "127.0.0.1:" + port
	_, err := ns.Dial(testContext(t), "tcp", addr)
	want := fmt.Sprintf("dial tcp %s in netns %s: connect: connection refused", addr, ns)
	if err == nil || err.Error() != want {
		t.Fatalf("Dial error = %v, want %q", err, want)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("errors.Is(%v, ECONNREFUSED) = false", err)
	}
}

func TestNamespaceByPath(t *testing.T) {
	named := newTestNS(t)
	ctx := testContext(t)

	// A process living in the namespace gives it a /proc path.
	sleeper := exec.Command("ip", "netns", "exec", named.name, "sleep", "30")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sleeper.Process.Kill()
		sleeper.Wait()
	})
	procPath := fmt.Sprintf("/proc/%d/ns/net", sleeper.Process.Pid)
	want, err := nsInode(named.Path())
	if err != nil {
		t.Fatal(err)
	}
	// `ip netns exec` enters the namespace before it execs sleep; wait for it.
	for deadline := time.Now().Add(testTimeout); ; time.Sleep(10 * time.Millisecond) {
		if ino, err := nsInode(procPath); err == nil && ino == want {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never entered namespace %s", procPath, named)
		}
	}

	forms := []string{named.name, named.Path(), procPath}
	for _, listenSpec := range forms {
		for _, dialSpec := range forms {
			t.Run(fmt.Sprintf("listen %s dial %s", listenSpec, dialSpec), func(t *testing.T) {
				listenNS, err := Parse(listenSpec)
				if err != nil {
					t.Fatal(err)
				}
				dialNS, err := Parse(dialSpec)
				if err != nil {
					t.Fatal(err)
				}
				if err := dialNS.Check(); err != nil {
					t.Fatalf("Check: %v", err)
				}
				_, port := echoListener(t, listenNS)
				conn, err := dialNS.Dial(ctx, "tcp", "127.0.0.1:"+port)
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				assertEcho(t, conn)
			})
		}
	}
}

func TestCheckRejects(t *testing.T) {
	testutil.RequireRoot(t)
	missing := testutil.UniqueName(t, "ebpfwd-t-missing")
	plainFile := filepath.Join(t.TempDir(), "not-a-namespace")
	if err := os.WriteFile(plainFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		spec     string
		want     string // exact error text
		wantGone bool
	}{
		{
			spec:     missing,
			want:     fmt.Sprintf(`netns %q: open /var/run/netns/%s: no such file or directory`, missing, missing),
			wantGone: true,
		},
		{
			spec:     "/proc/self/ns/" + missing,
			want:     fmt.Sprintf(`netns "/proc/self/ns/%s": open /proc/self/ns/%s: no such file or directory`, missing, missing),
			wantGone: true,
		},
		{
			spec: plainFile,
			want: fmt.Sprintf(`netns %q: %s is not a namespace file (file system type 0x1021994, want nsfs)`, plainFile, plainFile),
		},
		{
			spec: "/proc/self/ns/uts",
			want: `netns "/proc/self/ns/uts": /proc/self/ns/uts is a namespace of type 0x4000000, not a network namespace`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			ns, err := Parse(tt.spec)
			if err != nil {
				t.Fatal(err)
			}
			checkErr := ns.Check()
			if tt.spec == plainFile {
				// The file system type depends on where TMPDIR lives;
				// compare only up to it.
				if checkErr == nil || !strings.HasPrefix(checkErr.Error(), strings.SplitN(tt.want, "(", 2)[0]) {
					t.Fatalf("Check() = %v, want %q", checkErr, tt.want)
				}
			} else if checkErr == nil || checkErr.Error() != tt.want {
				t.Fatalf("Check() = %v, want %q", checkErr, tt.want)
			}
			if got := errors.Is(checkErr, ErrGone); got != tt.wantGone {
				t.Errorf("errors.Is(Check(), ErrGone) = %v, want %v", got, tt.wantGone)
			}

			// Every operation fails the same way, naming the namespace.
			_, dialErr := ns.Dial(testContext(t), "tcp", "127.0.0.1:9")
			if dialErr == nil || !strings.Contains(dialErr.Error(), "in netns "+ns.String()+": ") {
				t.Fatalf("Dial error = %v, want it to name %s", dialErr, ns)
			}
			if got := errors.Is(dialErr, ErrGone); got != tt.wantGone {
				t.Errorf("errors.Is(Dial error, ErrGone) = %v, want %v", got, tt.wantGone)
			}
			ran := false
			if err := ns.Do(func() error { ran = true; return nil }); err == nil || ran {
				t.Fatalf("Do() = %v, ran fn = %v; want an error and fn not run", err, ran)
			}
		})
	}
}

func TestDeletedWhileRunning(t *testing.T) {
	ns := newTestNS(t)
	ctx := testContext(t)
	_, port := echoListener(t, ns)

	// Keep a handle so the test can still reach the namespace once its name
	// is gone; the listener alone would keep it alive but unreachable.
	handle, err := os.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer handle.Close()
	runCmd(t, "ip", "netns", "del", ns.name)

	_, err = ns.Dial(ctx, "tcp", "127.0.0.1:"+port)
	if !errors.Is(err, ErrGone) {
		t.Fatalf("Dial after `ip netns del` = %v, want an error wrapping ErrGone", err)
	}
	if !strings.Contains(err.Error(), ns.name) {
		t.Errorf("Dial error %q does not name the namespace", err)
	}
	if _, err := ns.Listen(ctx, "tcp", "127.0.0.1:0"); !errors.Is(err, ErrGone) {
		t.Fatalf("Listen after `ip netns del` = %v, want an error wrapping ErrGone", err)
	}

	viaHandle, err := Parse(fmt.Sprintf("/proc/self/fd/%d", handle.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	conn, err := viaHandle.Dial(ctx, "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatalf("the listener opened before the deletion is unreachable: %v", err)
	}
	assertEcho(t, conn)
}

func TestResolveWithNamespaceHosts(t *testing.T) {
	ns := newTestNS(t)
	writeNSEtc(t, ns, "hosts", "# test hosts\n127.0.0.1 Svc.Ebpfwd.Test svc-alias # the service\n10.9.8.7 other\n")
	ctx := testContext(t)
	tests := []struct {
		host string
		want []string
	}{
		{"svc.ebpfwd.test", []string{"127.0.0.1"}},
		{"SVC.EBPFWD.TEST.", []string{"127.0.0.1"}},
		{"svc-alias", []string{"127.0.0.1"}},
		{"other", []string{"10.9.8.7"}},
		{"localhost", []string{"127.0.0.1", "::1"}}, // not in the file: built-in fallback
		{"192.0.2.1", []string{"192.0.2.1"}},        // literals skip every lookup
		{"2001:db8::1", []string{"2001:db8::1"}},
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			addrs, err := ns.Resolve(ctx, tt.host)
			if err != nil {
				t.Fatalf("Resolve: %v", err)
			}
			if got := addrStrings(addrs); strings.Join(got, ",") != strings.Join(tt.want, ",") {
				t.Fatalf("Resolve(%q) = %v, want %v", tt.host, got, tt.want)
			}
		})
	}

	_, port := echoListener(t, ns)
	conn, err := ns.Dial(ctx, "tcp", "svc.ebpfwd.test:"+port)
	if err != nil {
		t.Fatalf("dial by a name from /etc/netns hosts: %v", err)
	}
	assertEcho(t, conn)

	if _, err := ns.Resolve(ctx, ""); err == nil {
		t.Error("Resolve(\"\") succeeded, want an error")
	}
}

func TestDialTriesEveryAddress(t *testing.T) {
	ns := newTestNS(t)
	// ::1 first, but only the IPv4 listener exists.
	writeNSEtc(t, ns, "hosts", "::1 dual.ebpfwd.test\n127.0.0.1 dual.ebpfwd.test\n")
	ctx := testContext(t)
	ln, port := echoListener(t, ns)

	conn, err := ns.Dial(ctx, "tcp", "dual.ebpfwd.test:"+port)
	if err != nil {
		t.Fatalf("dial dual-stack name: %v", err)
	}
	if got, want := conn.RemoteAddr().String(), "127.0.0.1:"+port; got != want {
		t.Errorf("connected to %s, want %s", got, want)
	}
	assertEcho(t, conn)

	ln.Close()
	tests := []struct {
		network string
		want    string
	}{
		{"tcp", fmt.Sprintf("dial tcp dual.ebpfwd.test:%[1]s in netns %[2]s: [::1]:%[1]s: connect: connection refused; 127.0.0.1:%[1]s: connect: connection refused", port, ns)},
		{"tcp4", fmt.Sprintf("dial tcp4 dual.ebpfwd.test:%[1]s in netns %[2]s: 127.0.0.1:%[1]s: connect: connection refused", port, ns)},
		{"tcp6", fmt.Sprintf("dial tcp6 dual.ebpfwd.test:%[1]s in netns %[2]s: [::1]:%[1]s: connect: connection refused", port, ns)},
	}
	for _, tt := range tests {
		t.Run(tt.network, func(t *testing.T) {
			_, err := ns.Dial(ctx, tt.network, "dual.ebpfwd.test:"+port)
			if err == nil || err.Error() != tt.want {
				t.Fatalf("Dial error =\n  %v\nwant\n  %s", err, tt.want)
			}
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("errors.Is(err, ECONNREFUSED) = false")
			}
		})
	}
}

func TestDoRestoresThreads(t *testing.T) {
	ns := newTestNS(t)
	want := originalInode(t)
	inside, err := nsInode(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	const calls, workers = 400, 8
	errs := make(chan error, calls)
	sem := make(chan struct{}, workers)
	for i := range calls {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			fail := errors.New("fn failed on purpose")
			err := ns.Do(func() error {
				ino, err := nsInode("/proc/thread-self/ns/net")
				switch {
				case err != nil:
					return err
				case ino != inside:
					return fmt.Errorf("fn ran in namespace %d, want %d", ino, inside)
				case i%2 == 1:
					return fail // failing functions restore the thread too
				}
				return nil
			})
			if i%2 == 1 && errors.Is(err, fail) {
				err = nil
			}
			errs <- err
		}()
	}
	for range calls {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if ino, err := nsInode("/proc/self/ns/net"); err != nil || ino != want {
		t.Fatalf("process namespace = %d, %v; want %d", ino, err, want)
	}
	assertThreadsInOriginal(t)
}

func TestDoOwnRunsDirectly(t *testing.T) {
	sentinel := errors.New("sentinel")
	calls := 0
	if err := (NS{}).Do(func() error { calls++; return sentinel }); !errors.Is(err, sentinel) || calls != 1 {
		t.Fatalf("Do = %v after %d calls, want sentinel after 1", err, calls)
	}
}

func TestDoPanicReachesCaller(t *testing.T) {
	ns := newTestNS(t)
	got := func() (p any) {
		defer func() { p = recover() }()
		ns.Do(func() error { panic("boom") })
		return nil
	}()
	if got != "boom" {
		t.Fatalf("recovered %v, want boom", got)
	}
	assertThreadsInOriginal(t)
}

func TestDoGoexitReturns(t *testing.T) {
	ns := newTestNS(t)
	err := ns.Do(func() error {
		runtime.Goexit()
		return nil
	})
	if !errors.Is(err, errGoexit) {
		t.Fatalf("Do = %v, want errGoexit", err)
	}
	assertThreadsInOriginal(t)
}

func TestOwnNamespaceSockets(t *testing.T) {
	var own NS
	ctx := testContext(t)
	_, port := echoListener(t, own)
	for _, host := range []string{"127.0.0.1", "localhost"} {
		t.Run(host, func(t *testing.T) {
			conn, err := own.Dial(ctx, "tcp4", net.JoinHostPort(host, port))
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			assertEcho(t, conn)
		})
	}
}

func TestFDCountStaysFlat(t *testing.T) {
	ns := newTestNS(t)
	ctx := testContext(t)
	missing, err := Parse(testutil.UniqueName(t, "ebpfwd-t-missing"))
	if err != nil {
		t.Fatal(err)
	}
	churn := func(rounds int) {
		for range rounds {
			ln, err := ns.Listen(ctx, "tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("listen: %v", err)
			}
			conn, err := ns.Dial(ctx, "tcp", ln.Addr().String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			conn.Close()
			ln.Close()
			// Failure paths must not leak either.
			if _, err := ns.Dial(ctx, "tcp", ln.Addr().String()); err == nil {
				t.Fatal("dial to a closed listener succeeded")
			}
			if _, err := missing.Dial(ctx, "tcp", "127.0.0.1:9"); !errors.Is(err, ErrGone) {
				t.Fatalf("dial in a missing namespace: %v", err)
			}
			if err := ns.Check(); err != nil {
				t.Fatal(err)
			}
		}
	}
	churn(5) // let the runtime open its long-lived fds (epoll, pipes)
	before := openFDs(t)
	churn(1000) // 2000 Listen/Dial calls that succeed, 2000 that fail
	after := openFDs(t)
	const slack = 4
	if after > before+slack {
		t.Fatalf("open fds grew from %d to %d over 4000 calls", before, after)
	}
}

func TestRestoreFailureDiscardsThread(t *testing.T) {
	inChildWithNS(t, "EBPFWD_NETNS_RESTORE_CHILD_NS", restoreFailureChild)
}

func restoreFailureChild(t *testing.T, path string) {
	testutil.RequireRoot(t)
	ns, err := Parse(path)
	if err != nil {
		t.Fatal(err)
	}
	setns = func(fd, nstype int) error {
		if fd == original.fd {
			return syscall.EPERM
		}
		return unix.Setns(fd, nstype)
	}
	var tid int
	err = ns.Do(func() error { tid = syscall.Gettid(); return nil })
	setns = unix.Setns
	if err != nil {
		t.Fatalf("Do = %v; fn succeeded, so Do must too", err)
	}
	if tid != os.Getpid() {
		// An ordinary thread exits. (The main thread cannot exit; the
		// runtime parks it forever instead, and the probes below show
		// it never runs Go code again.)
		taskDir := fmt.Sprintf("/proc/self/task/%d", tid)
		for deadline := time.Now().Add(testTimeout); ; time.Sleep(10 * time.Millisecond) {
			if _, err := os.Stat(taskDir); errors.Is(err, os.ErrNotExist) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("thread %d left in the wrong namespace still exists", tid)
			}
		}
	}
	probeThreadsAvoid(t, tid)
}

// probeThreadsAvoid runs locked goroutines on many threads and checks that
// none of them is thread bad and all are in the original namespace.
func probeThreadsAvoid(t *testing.T, bad int) {
	t.Helper()
	want := originalInode(t)
	const probes = 200
	errs := make(chan error, probes)
	for range probes {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tid := unix.Gettid()
			ino, err := nsInode("/proc/thread-self/ns/net")
			switch {
			case err != nil:
			case tid == bad:
				err = fmt.Errorf("thread %d, left in the wrong namespace, runs goroutines again", tid)
			case ino != want:
				err = fmt.Errorf("thread %d is in network namespace %d, want %d", tid, ino, want)
			}
			errs <- err
		}()
	}
	for range probes {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// TestIdentityOverSpelling: a namespace written as its `ip netns` name, as
// its path under /var/run/netns, and as /proc/PID/ns/net of a process in
// it is one namespace (same ID, Same), and Find gives it back from its ID;
// another namespace and the daemon's own are not it.
func TestIdentityOverSpelling(t *testing.T) {
	blue := newTestNS(t)
	other := newTestNS(t)
	// A process living in blue gives the namespace a third spelling.
	cmd := exec.Command("nsenter", "--net="+blue.Path(), "sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	byProc, err := Parse(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// nsenter enters the namespace after it starts: wait (bounded) until
	// the process is in it before reading its /proc entry as a spelling.
	blueID, err := blue.ID()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if id, err := byProc.ID(); err == nil && id == blueID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the process never entered the test namespace")
		}
	}
	byPath, err := Parse(blue.Path())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		x, y NS
		want bool
	}{
		{"name and itself", blue, blue, true},
		{"name and path", blue, byPath, true},
		{"name and /proc/PID/ns/net", blue, byProc, true},
		{"path and /proc/PID/ns/net", byPath, byProc, true},
		{"two namespaces", blue, other, false},
		{"own and another", NS{}, blue, false},
		{"own and own", NS{}, NS{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			same, err := tt.x.Same(tt.y)
			if err != nil || same != tt.want {
				t.Fatalf("Same = %v, %v; want %v", same, err, tt.want)
			}
			idX, errX := tt.x.ID()
			idY, errY := tt.y.ID()
			if errX != nil || errY != nil || (idX == idY) != tt.want {
				t.Fatalf("IDs %v (%v) and %v (%v): equal should be %v", idX, errX, idY, errY, tt.want)
			}
		})
	}
	id, err := byProc.ID()
	if err != nil {
		t.Fatal(err)
	}
	found, ok := Find(id)
	if !ok || found.Spec() != blue.Spec() {
		t.Fatalf("Find(%v) = %v, %v; want %s (its ip netns name comes before any /proc path)", id, found, ok, blue)
	}
	if _, err := Parse("/etc/hostname"); err == nil {
		if _, err := (NS{path: "/etc/hostname"}).ID(); err == nil {
			t.Fatal("ID of a file that is not a namespace: no error")
		}
	}
}

// Accepted connections keep the net package's default keep-alive although
// the listener, not every accept, sets it.
func TestAcceptedConnectionsKeepAlive(t *testing.T) {
	for _, tc := range []struct {
		name string
		ns   func(t *testing.T) NS
	}{
		{"own namespace", func(*testing.T) NS { return NS{} }},
		{"other namespace", func(t *testing.T) NS { return newTestNS(t) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := tc.ns(t)
			ctx := testContext(t)
			ln, err := ns.Listen(ctx, "tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatalf("listen: %v", err)
			}
			defer ln.Close()
			client, err := ns.Dial(ctx, "tcp", ln.Addr().String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer client.Close()
			conn, err := ln.Accept()
			if err != nil {
				t.Fatalf("accept: %v", err)
			}
			defer conn.Close()
			raw, err := conn.(*net.TCPConn).SyscallConn()
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]struct{ level, opt, value int }{
				"SO_KEEPALIVE":  {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
				"TCP_KEEPIDLE":  {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, keepAliveIdle},
				"TCP_KEEPINTVL": {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, keepAliveInterval},
				"TCP_KEEPCNT":   {unix.IPPROTO_TCP, unix.TCP_KEEPCNT, keepAliveCount},
				"TCP_NODELAY":   {unix.IPPROTO_TCP, unix.TCP_NODELAY, 1},
			}
			for name, o := range want {
				var got int
				var gerr error
				raw.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), o.level, o.opt) })
				if gerr != nil || got != o.value {
					t.Errorf("%s of the accepted socket = %d (%v), want %d", name, got, gerr, o.value)
				}
			}
		})
	}
}

// A dial from the daemon's own namespace starts connect(2) itself before
// the net package's dialer does (connectFirst); the outcome and the error
// text are the dialer's.
func TestOwnNamespaceDialOutcome(t *testing.T) {
	var own NS
	ctx := testContext(t)
	_, open := echoListener(t, own)
	closedLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := closedLn.Addr().String()
	closedLn.Close()
	for _, tc := range []struct {
		network, addr string
		wantErr       string // "" = the dial succeeds and echoes
	}{
		{"tcp", net.JoinHostPort("127.0.0.1", open), ""},
		{"tcp4", net.JoinHostPort("127.0.0.1", open), ""},
		{"tcp", net.JoinHostPort("::1", open), "connect: connection refused"}, // the listener is IPv4 only
		{"tcp", closed, "dial tcp " + closed + " in netns (own): connect: connection refused"},
	} {
		t.Run(tc.network+" "+tc.addr, func(t *testing.T) {
			conn, err := own.Dial(ctx, tc.network, tc.addr)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				assertEcho(t, conn)
				return
			}
			if err == nil {
				conn.Close()
				t.Fatalf("dial succeeded, want %q", tc.wantErr)
			}
			if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("dial error %q, want one containing %q that is ECONNREFUSED", err, tc.wantErr)
			}
		})
	}
}
