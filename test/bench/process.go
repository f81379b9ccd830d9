package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/topo"
)

const (
	readyTimeout = 10 * time.Second
	stopTimeout  = 10 * time.Second
	// logTail is how much of a child's output is kept for error messages.
	logTail = 8 << 10
)

// process is a long-running child (a server or an ebpfwd daemon) living
// inside a namespace for the length of one run.
type process struct {
	name string
	cmd  *exec.Cmd
	out  *tailBuffer
	done chan struct{}
	err  error // valid after done is closed
	// cleanExit: the program promises exit status termStatus on SIGTERM
	// (ebpfwd 0, HAProxy 143); other servers may exit with any status and
	// that is not an error.
	cleanExit  bool
	termStatus int
}

// startIn starts name args... inside ns. The child gets its own process
// group, so a Ctrl-C on the terminal reaches only the driver, which then
// stops children in order; Pdeathsig kills it should the driver itself die
// without cleaning up.
func startIn(ns *topo.NS, label, name string, args ...string) (*process, error) {
	cmd := inNS(context.Background(), ns, name, args...)
	out := &tailBuffer{max: logTail}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in namespace %s: %w", label, ns.Name, err)
	}
	p := &process{name: label, cmd: cmd, out: out, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// pid is the program's own PID: nsenter execs it without forking.
func (p *process) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process is gone, with its error if so.
func (p *process) exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// waitReady waits until check succeeds, the process exits or the timeout
// passes, whichever comes first.
func (p *process) waitReady(ctx context.Context, check func() bool) error {
	deadline := time.NewTimer(readyTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if check() {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was ready (%v): %s", p.name, p.err, p.out)
		case <-deadline.C:
			return fmt.Errorf("%s not ready after %v: %s", p.name, readyTimeout, p.out)
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// stop sends SIGTERM and waits for the exit, killing the process if it
// does not go within stopTimeout. For a program that promises its status
// on SIGTERM, any other status is reported.
func (p *process) stop() error {
	if done, err := p.exited(); done {
		if err != nil {
			return fmt.Errorf("%s had already exited: %w: %s", p.name, err, p.out)
		}
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if p.cleanExit && shellStatus(p.cmd.ProcessState) != p.termStatus {
			return fmt.Errorf("%s did not exit cleanly on SIGTERM (want status %d): %v: %s", p.name, p.termStatus, p.err, p.out)
		}
		return nil
	case <-time.After(stopTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within %v of SIGTERM; killed", p.name, stopTimeout)
	}
}

// shellStatus is the exit status as a shell reports it: 128+N for death
// by signal N, so a promised 143 holds whether the program calls exit(143)
// or lets SIGTERM end it. -1 if unknown.
func shellStatus(st *os.ProcessState) int {
	if st == nil {
		return -1
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}

// startDaemon runs `ebpfwd run` with config inside ns as the contender's
// daemon for role, and waits for its ready file. The instance name is the
// contender's prefix plus role, given explicitly rather than left to the
// config file's name, so that it is unique among all the daemons of a run.
func startDaemon(ctx context.Context, ns *topo.NS, e *runEnv, role, config string) (*process, error) {
	instance := e.instance + "-" + role
	cfgPath := filepath.Join(e.dir, role+".yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		return nil, fmt.Errorf("write config of ebpfwd %s: %w", instance, err)
	}
	ready := filepath.Join(e.dir, role+".ready")
	if err := os.Remove(ready); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale ready file of ebpfwd %s: %w", instance, err)
	}
	p, err := startIn(ns, "ebpfwd "+instance, e.ebpfwd, "run", "--instance", instance, "--ready-file", ready, cfgPath)
	if err != nil {
		return nil, err
	}
	p.cleanExit = true
	if err := p.waitReady(ctx, func() bool { _, err := os.Stat(ready); return err == nil }); err != nil {
		_ = p.stop()
		return nil, err
	}
	return p, nil
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = append(t.b[:0], t.b[over:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}
