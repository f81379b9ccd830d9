package netns

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// testTimeout bounds every wait in these tests.
const testTimeout = 10 * time.Second

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

func runCmd(t testing.TB, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	if out, err := exec.CommandContext(ctx, name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// newTestNS creates a uniquely named namespace with lo up, removed when
// the test ends.
func newTestNS(t testing.TB) NS {
	t.Helper()
	_, ns := testutil.NewNSHandle(t, "ebpfwd-t", Parse)
	return ns
}

// writeNSEtc writes /etc/netns/NAME/file for the test's duration.
func writeNSEtc(t *testing.T, ns NS, file, content string) {
	t.Helper()
	testutil.WriteNSEtc(t, ns.name, file, content)
}

// echoListener listens on 127.0.0.1:0 in ns and echoes every connection
// until the test ends. It returns the port.
func echoListener(t *testing.T, ns NS) (net.Listener, string) {
	t.Helper()
	ln, err := ns.Listen(testContext(t), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen in %s: %v", ns, err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return ln, port
}

// assertEcho checks that conn reaches an echoListener.
func assertEcho(t *testing.T, conn net.Conn) {
	t.Helper()
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(testTimeout))
	msg := []byte("ebpfwd")
	if _, err := conn.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if string(got) != string(msg) {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

// nsInode identifies the network namespace a /proc ns file points at.
func nsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, err
	}
	return st.Ino, nil
}

func originalInode(t *testing.T) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(original.fd, &st); err != nil {
		t.Fatalf("fstat original namespace: %v", err)
	}
	return st.Ino
}

// assertThreadsInOriginal checks every thread of the process but the socket
// makers', and a batch of freshly locked goroutines, against the original
// namespace.
func assertThreadsInOriginal(t *testing.T) {
	t.Helper()
	want := originalInode(t)
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		t.Fatal(err)
	}
	makerTIDs := makerThreads()
	for _, task := range tasks {
		if tid, err := strconv.Atoi(task.Name()); err == nil && makerTIDs[tid] {
			continue
		}
		ino, err := nsInode(filepath.Join("/proc/self/task", task.Name(), "ns/net"))
		if errors.Is(err, unix.ENOENT) {
			continue // the thread exited meanwhile
		}
		if err != nil {
			t.Fatal(err)
		}
		if ino != want {
			t.Errorf("thread %s is in network namespace %d, want the original %d", task.Name(), ino, want)
		}
	}
	const probes = 64
	errs := make(chan error, probes)
	for range probes {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			ino, err := nsInode("/proc/thread-self/ns/net")
			if err == nil && ino != want {
				err = errors.New("locked goroutine's thread " + strconv.Itoa(unix.Gettid()) + " is in network namespace " + strconv.FormatUint(ino, 10))
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

// openFDs counts the process's open fds but the makers' spare sockets:
// those are bounded, come and go as makers fill them or exit, and
// TestSparesServeDials checks that they are closed.
func openFDs(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries) - spareFDs(ID{})
}

// spareFDs counts the spare sockets of the maker of namespace id, or of
// every maker for the zero ID. A maker filling or dropping its spares just
// then may hold one more, outside its channels.
func spareFDs(id ID) int {
	makers.mu.Lock()
	defer makers.mu.Unlock()
	n := 0
	for mid, m := range makers.byID {
		if id != (ID{}) && mid != id {
			continue
		}
		for _, spares := range m.spares {
			n += len(spares)
		}
	}
	return n
}

// makerThreads returns the ids of the threads socket makers hold in other
// namespaces on purpose.
func makerThreads() map[int]bool {
	makers.mu.Lock()
	defer makers.mu.Unlock()
	return maps.Clone(makers.threads)
}

// inChildWithNS runs the calling test again in a child process, with the
// path of a fresh test namespace in the environment variable env; in the
// child, it calls child with that path instead. Tests that break a thread
// on purpose use it, so that the broken thread cannot leak into other
// tests. It returns the child's output in the parent, "" in the child.
func inChildWithNS(t *testing.T, env string, child func(t *testing.T, path string)) string {
	t.Helper()
	if path := os.Getenv(env); path != "" {
		child(t, path)
		return ""
	}
	ns := newTestNS(t)
	cmd := exec.CommandContext(testContext(t), os.Args[0], "-test.run=^"+t.Name()+"$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), env+"="+ns.Path())
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "--- PASS: "+t.Name()) {
		t.Fatalf("child did not run the test:\n%s", out)
	}
	return string(out)
}
