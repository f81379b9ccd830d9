// Package test holds ebpfwd's end-to-end tests: they build the real
// ebpfwd binary, run it over real network namespaces and veth links, and
// verify every byte that crosses it. They need root; without it every test
// skips.
package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// ebpfwdBin is the binary TestMain built; "" when not running as root.
var ebpfwdBin string

const (
	buildTimeout = 3 * time.Minute
	readyTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
)

func TestMain(m *testing.M) {
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	if !testutil.IsRoot() {
		// Every test skips on its own with the reason; building is pointless.
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "ebpfwd-e2e-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: temp dir: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin, err := buildDaemon(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: cannot build the daemon, no end-to-end test can run:\n%v\n", err)
		return 1
	}
	ebpfwdBin = bin
	return m.Run()
}

// buildDaemon builds ./cmd/ebpfwd from the module root into dir.
func buildDaemon(dir string) (string, error) {
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

// daemon is one running ebpfwd process.
type daemon struct {
	name     string
	instance string // for `ebpfwd conns --instance`
	config   string // the configuration file it runs
	cmd      *exec.Cmd
	output   *syncbuf.Buffer // stdout and stderr, interleaved
	exited   chan struct{}
	// waitErr is cmd.Wait's result, valid once exited is closed.
	waitErr error
}

// daemonOptions tunes startDaemon.
type daemonOptions struct {
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
}

// startDaemon writes yaml to a temp file, runs `ebpfwd run --ready-file`
// on it and waits until the daemon is ready. The daemon is stopped with
// SIGTERM in t.Cleanup; its output is logged if the test failed, or always
// when EBPFWD_E2E_DAEMON_LOGS is set.
func startDaemon(t *testing.T, name, yaml string, opts daemonOptions) *daemon {
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
	argv := append([]string{ebpfwdBin}, args...)
	if opts.In != nil {
		// nsenter execs ebpfwd in place, so cmd.Process.Pid is the daemon.
		argv = append([]string{"nsenter", "--net=" + opts.In.Path()}, argv...)
	}
	if opts.FDLimit > 0 {
		// So does prlimit, after setting the limit on itself.
		n := strconv.Itoa(opts.FDLimit)
		argv = append([]string{"prlimit", "--nofile=" + n + ":" + n}, argv...)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	d := &daemon{name: name, instance: instance, config: cfg, cmd: cmd, output: &syncbuf.Buffer{}, exited: make(chan struct{})}
	cmd.Stdout = d.output
	cmd.Stderr = d.output
	if err := cmd.Start(); err != nil {
		t.Fatalf("start daemon %s: %v", name, err)
	}
	go func() {
		d.waitErr = cmd.Wait()
		close(d.exited)
	}()
	t.Cleanup(func() {
		if code, err := d.stop(); err != nil {
			t.Errorf("daemon %s: %v", name, err)
		} else if code != 0 && code != -1 {
			t.Logf("daemon %s exited with status %d", name, code)
		}
		if t.Failed() || os.Getenv("EBPFWD_E2E_DAEMON_LOGS") != "" {
			t.Logf("daemon %s (%s) output:\n%s", name, strings.Join(cmd.Args, " "), d.output)
		}
	})

	deadline := time.Now().Add(readyTimeout)
	for {
		if data, err := os.ReadFile(ready); err == nil && bytes.HasSuffix(data, []byte("\n")) {
			return d
		}
		select {
		case <-d.exited:
			t.Fatalf("daemon %s exited before it was ready (%v); config:\n%s\noutput:\n%s", name, d.waitErr, yaml, d.output)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %s not ready after %v; output:\n%s", name, readyTimeout, d.output)
		}
	}
}

// pid is the daemon's process id.
func (d *daemon) pid() int { return d.cmd.Process.Pid }

// running reports whether the process has not exited.
func (d *daemon) running() bool {
	select {
	case <-d.exited:
		return false
	default:
		return true
	}
}

// signal sends sig to the daemon.
func (d *daemon) signal(sig os.Signal) error {
	if err := d.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signal daemon %s: %w", d.name, err)
	}
	return nil
}

// stop sends SIGTERM (unless the daemon already exited) and waits up to
// stopTimeout for it to exit, then kills it. It returns the exit status;
// the error is set only when the daemon had to be killed. Calling stop
// again returns the same status.
func (d *daemon) stop() (int, error) {
	if d.running() {
		if err := d.signal(syscall.SIGTERM); err != nil {
			return -1, err
		}
	}
	return d.wait(stopTimeout)
}

// crash kills the daemon with SIGKILL, as a crash or the OOM killer would:
// nothing it attached, pinned or created is cleaned up.
func (d *daemon) crash(t *testing.T) {
	t.Helper()
	if err := d.signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := d.wait(stopTimeout); err != nil {
		t.Fatal(err)
	}
}

// wait waits up to timeout for the daemon to exit on its own, killing it
// after that.
func (d *daemon) wait(timeout time.Duration) (int, error) {
	select {
	case <-d.exited:
		return d.cmd.ProcessState.ExitCode(), nil
	case <-time.After(timeout):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return -1, fmt.Errorf("did not exit within %v of SIGTERM; killed", timeout)
	}
}

// waitLog waits until the daemon's output has a line containing every one
// of parts, and returns that line.
func (d *daemon) waitLog(t *testing.T, timeout time.Duration, parts ...string) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, line := range strings.Split(d.output.String(), "\n") {
			if containsAll(line, parts...) {
				return line
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon %s logged no line containing all of %q within %v; output:\n%s", d.name, parts, timeout, d.output)
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

// openFDs lists the targets of the daemon's open file descriptors
// ("socket:[123]", "pipe:[456]", "anon_inode:[eventpoll]", ...).
func (d *daemon) openFDs(t *testing.T) []string {
	t.Helper()
	dir := "/proc/" + strconv.Itoa(d.pid()) + "/fd"
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("list fds of daemon %s: %v", d.name, err)
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

// settledFDs waits until the daemon's fd count stops changing (connections
// that just ended are closed asynchronously) and returns the fds.
func (d *daemon) settledFDs(t *testing.T) []string {
	t.Helper()
	const (
		interval = 50 * time.Millisecond
		stableN  = 4 // equal counts in a row
		timeout  = 5 * time.Second
	)
	deadline := time.Now().Add(timeout)
	last, same := d.openFDs(t), 1
	for same < stableN && time.Now().Before(deadline) {
		time.Sleep(interval)
		cur := d.openFDs(t)
		if len(cur) == len(last) {
			same++
		} else {
			same = 1
		}
		last = cur
	}
	return last
}

// fdKinds summarises fd targets by kind, for failure messages.
func fdKinds(fds []string) map[string]int {
	kinds := map[string]int{}
	for _, f := range fds {
		kind, _, _ := strings.Cut(f, "[")
		kinds[kind]++
	}
	return kinds
}
