package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// Bin is the binary Main built; "" when not running as root.
var Bin string

const (
	buildTimeout = 3 * time.Minute
	// readyTimeout bounds a daemon's start. A tc service's start is mostly
	// the verifier (about 2 s of CPU per namespace on a quiet 2-CPU
	// machine), and the e2e tests start many daemons in parallel: on such
	// a machine under load, ten starting at once have waited more than
	// 10 s for their turn on the CPUs.
	readyTimeout = 30 * time.Second
	// StopTimeout is how long Stop waits after SIGTERM before it kills.
	StopTimeout = 10 * time.Second
)

// Main is a TestMain body: as root it builds ./cmd/ebpfwd into a temporary
// directory (Bin), runs the tests and removes the binary. Without root it
// only runs them: every test skips on its own with the reason, so building
// is pointless. Use it as os.Exit(e2e.Main(m)).
func Main(m *testing.M) int {
	if !testutil.IsRoot() {
		return m.Run()
	}
	// The new process of a daemon's upgrade outlives its parent: as a
	// subreaper, this process becomes its parent and can wait for it
	// (Daemon.Upgrade), instead of init.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: become a child subreaper: %v\n", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "ebpfwd-e2e-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: temp dir: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin, err := Build(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: cannot build the daemon, no end-to-end test can run:\n%v\n", err)
		return 1
	}
	Bin = bin
	return m.Run()
}

// Build builds ./cmd/ebpfwd from the module root into dir.
func Build(dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	if root == "." || root == "/dev" {
		return "", fmt.Errorf("go env GOMOD = %q: not inside the ebpfwd module", gomod)
	}
	bin := filepath.Join(dir, "ebpfwd")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/ebpfwd")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build -o %s ./cmd/ebpfwd (in %s): %w\n%s", bin, root, err, out)
	}
	return bin, nil
}

// Daemon is one running ebpfwd process.
type Daemon struct {
	Name     string
	Instance string // for `ebpfwd conns --instance`
	Config   string // the configuration file it runs
	// Cmd started the daemon; the process a daemon upgraded to was not
	// started by the test, and its Cmd is the original's.
	Cmd    *exec.Cmd
	Output *syncbuf.Buffer // stdout and stderr, interleaved (of every process of an upgrade)
	proc   *os.Process
	ready  string // the ready file
	exited chan struct{}
	// waitErr and exitCode are the process's end, valid once exited is
	// closed.
	waitErr  error
	exitCode int
}

// Options tunes Start.
type Options struct {
	// In runs the daemon inside this namespace (nsenter --net), for when
	// the daemon plays a process living there; nil runs it in the test's
	// own namespace.
	In *topo.NS
	// Args are extra flags for `ebpfwd run`, such as --drain-timeout.
	Args []string
	// CommandLine runs GOST's command line (-L, -F...) instead of a
	// configuration file; yaml is then ignored.
	CommandLine []string
	// FDLimit, when set, runs the daemon with RLIMIT_NOFILE at this
	// (soft and hard) through util-linux prlimit, which execs in place.
	FDLimit int
	// Env is added to the daemon's environment (NAME=value).
	Env []string
	// Wrap is a command that execs the daemon in place, such as
	// setpriv with the capabilities to run it with; it runs inside In.
	Wrap []string
}

// Start writes yaml to a temp file, runs `ebpfwd run --ready-file` on it
// and waits until the daemon is ready. The daemon is stopped with SIGTERM
// in t.Cleanup; its output is logged if the test failed, or always when
// EBPFWD_E2E_DAEMON_LOGS is set.
func Start(t testing.TB, name, yaml string, opts Options) *Daemon {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, name+".yaml")
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatalf("write config of daemon %s: %v", name, err)
	}
	ready := filepath.Join(dir, name+".ready")
	// A unique instance keeps parallel tests (and other runs on the
	// machine) from sharing a control socket.
	instance := testutil.UniqueName(t, "e2e-"+name)
	args := append([]string{"run", "--instance", instance, "--ready-file", ready}, opts.Args...)
	args = append(args, cfg)
	if opts.CommandLine != nil {
		args = append(append(slices.Clone(opts.CommandLine), "--instance", instance, "--ready-file", ready), opts.Args...)
	}
	argv := append(slices.Clone(opts.Wrap), append([]string{Bin}, args...)...)
	if opts.In != nil {
		// nsenter execs ebpfwd in place, so Cmd.Process.Pid is the daemon.
		argv = append([]string{"nsenter", "--net=" + opts.In.Path()}, argv...)
	}
	if opts.FDLimit > 0 {
		// So does prlimit, after setting the limit on itself.
		n := strconv.Itoa(opts.FDLimit)
		argv = append([]string{"prlimit", "--nofile=" + n + ":" + n}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	if len(opts.Env) > 0 {
		cmd.Env = append(os.Environ(), opts.Env...)
	}
	d := &Daemon{Name: name, Instance: instance, Config: cfg, Cmd: cmd, Output: &syncbuf.Buffer{}, ready: ready, exited: make(chan struct{})}
	// A pipe of our own rather than Cmd's copying: Wait then returns when
	// the daemon exits, not when every process holding the pipe (the new
	// process of an upgrade) has.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatalf("daemon %s: output pipe: %v", name, err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		pr.Close()
		pw.Close()
		t.Fatalf("start daemon %s: %v", name, err)
	}
	pw.Close()
	go func() {
		_, _ = io.Copy(d.Output, pr)
		pr.Close()
	}()
	d.proc = cmd.Process
	go func() {
		d.waitErr = cmd.Wait()
		d.exitCode = cmd.ProcessState.ExitCode()
		close(d.exited)
	}()
	t.Cleanup(func() {
		// A daemon a test killed could not remove its control socket;
		// one that stopped removed it already.
		defer os.Remove(daemon.ControlSocket(instance))
		if code, err := d.Stop(); err != nil {
			t.Errorf("daemon %s: %v", name, err)
		} else if code != 0 && code != -1 {
			t.Logf("daemon %s exited with status %d", name, code)
		}
		if t.Failed() || os.Getenv("EBPFWD_E2E_DAEMON_LOGS") != "" {
			t.Logf("daemon %s (%s) output:\n%s", name, strings.Join(cmd.Args, " "), d.Output)
		}
	})

	deadline := time.Now().Add(readyTimeout)
	for {
		if data, err := os.ReadFile(ready); err == nil && bytes.HasSuffix(data, []byte("\n")) {
			return d
		}
		select {
		case <-d.exited:
			t.Fatalf("daemon %s exited before it was ready (%v); config:\n%s\noutput:\n%s", name, d.waitErr, yaml, d.Output)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %s not ready after %v; output:\n%s", name, readyTimeout, d.Output)
		}
	}
}

// Pid is the daemon's process id.
func (d *Daemon) Pid() int { return d.proc.Pid }

// Exited is closed once the process has exited.
func (d *Daemon) Exited() <-chan struct{} { return d.exited }

// WaitErr is Cmd.Wait's result; valid once Exited is closed.
func (d *Daemon) WaitErr() error { return d.waitErr }

// Running reports whether the process has not exited.
func (d *Daemon) Running() bool {
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// Signal sends sig to the daemon.
func (d *Daemon) Signal(sig os.Signal) error {
	if err := d.proc.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal daemon %s: %w", d.Name, err)
	}
	return nil
}

// Stop sends SIGTERM (unless the daemon already exited) and waits up to
// StopTimeout for it to exit, then kills it. It returns the exit status;
// the error is set only when the daemon had to be killed. Calling Stop
// again returns the same status.
func (d *Daemon) Stop() (int, error) {
	if d.Running() {
		if err := d.Signal(syscall.SIGTERM); err != nil {
			return -1, err
		}
	}
	return d.Wait(StopTimeout)
}

// Crash kills the daemon with SIGKILL, as a crash or the OOM killer would:
// nothing it attached, pinned or created is cleaned up.
func (d *Daemon) Crash(t testing.TB) {
	t.Helper()
	if err := d.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Wait(StopTimeout); err != nil {
		t.Fatal(err)
	}
}

// Wait waits up to timeout for the daemon to exit on its own, killing it
// after that.
func (d *Daemon) Wait(timeout time.Duration) (int, error) {
	select {
	case <-d.exited:
		return d.exitCode, nil
	case <-time.After(timeout):
		_ = d.proc.Kill()
		<-d.exited
		return -1, fmt.Errorf("did not exit within %v of SIGTERM; killed", timeout)
	}
}

// WaitLog waits until the daemon's output has a line containing every one
// of parts, and returns that line.
func (d *Daemon) WaitLog(t testing.TB, timeout time.Duration, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range strings.Split(d.Output.String(), "\n") {
			if containsAll(line, parts...) {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %s logged no line containing all of %q within %v; output:\n%s", d.Name, parts, timeout, d.Output)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func containsAll(s string, parts ...string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// OpenFDs lists the targets of the daemon's open file descriptors
// ("socket:[123]", "pipe:[456]", "anon_inode:[eventpoll]", ...).
func (d *Daemon) OpenFDs(t testing.TB) []string {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(d.Pid()) + "/fd"
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("list fds of daemon %s: %v", d.Name, err)
	}
	var targets []string
	for _, e := range entries {
		// An fd closed between ReadDir and Readlink is simply gone.
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil {
			targets = append(targets, target)
		}
	}
	return targets
}

// SettledFDs waits until the daemon's fd count stops changing (connections
// that just ended are closed asynchronously) and returns the fds.
func (d *Daemon) SettledFDs(t testing.TB) []string {
	t.Helper()
	const (
		interval = 50 * time.Millisecond
		stableN  = 4 // equal counts in a row
		timeout  = 5 * time.Second
	)
	deadline := time.Now().Add(timeout)
	last, same := d.OpenFDs(t), 1
	for same < stableN && time.Now().Before(deadline) {
		time.Sleep(interval)
		cur := d.OpenFDs(t)
		if len(cur) == len(last) {
			same++
		} else {
			same = 1
		}
		last = cur
	}
	return last
}

// FDKinds summarises fd targets by kind, for failure messages.
func FDKinds(fds []string) map[string]int {
	kinds := map[string]int{}
	for _, f := range fds {
		kind, _, _ := strings.Cut(f, "[")
		kinds[kind]++
	}
	return kinds
}

// Upgrade sends SIGUSR2 and waits up to timeout until the new process the
// daemon hands over to is ready (the ready file names a new pid). It
// returns that process as a Daemon, stopped in t.Cleanup; d, the old
// process, finishes its connections and exits on its own (d.Exited).
func (d *Daemon) Upgrade(t testing.TB, timeout time.Duration) *Daemon {
	t.Helper()
	old := strconv.Itoa(d.Pid())
	if err := d.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(timeout)
	for {
		data, err := os.ReadFile(d.ready)
		if pid := strings.TrimSpace(string(data)); err == nil && bytes.HasSuffix(data, []byte("\n")) && pid != old {
			n, err := strconv.Atoi(pid)
			if err != nil {
				t.Fatalf("daemon %s: ready file after the upgrade holds %q", d.Name, data)
			}
			return d.successor(t, n)
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %s: no new process ready within %v of SIGUSR2; output:\n%s", d.Name, timeout, d.Output)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// successor tracks the new process pid of d's upgrade. It becomes this
// (subreaper) process's child once d exits; only then can it be waited for.
func (d *Daemon) successor(t testing.TB, pid int) *Daemon {
	t.Helper()
	p, err := os.FindProcess(pid)
	if err != nil {
		t.Fatalf("daemon %s: find new process %d: %v", d.Name, pid, err)
	}
	next := &Daemon{Name: d.Name, Instance: d.Instance, Config: d.Config, Cmd: d.Cmd, Output: d.Output,
		proc: p, ready: d.ready, exited: make(chan struct{})}
	go func() {
		<-d.exited
		state, err := p.Wait()
		next.waitErr, next.exitCode = err, -1
		if state != nil {
			next.exitCode = state.ExitCode()
		}
		close(next.exited)
	}()
	t.Cleanup(func() {
		if code, err := next.Stop(); err != nil {
			t.Errorf("daemon %s (after its upgrade): %v", d.Name, err)
		} else if code != 0 && code != -1 {
			t.Logf("daemon %s (after its upgrade) exited with status %d", d.Name, code)
		}
	})
	return next
}
