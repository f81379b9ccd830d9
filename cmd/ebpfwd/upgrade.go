// Upgrade (SIGUSR2): the running daemon starts the binary at its path as
// a new process, hands it every listening socket, lets go of the kernel
// state once the new process is ready to take it, and finishes its own
// connections; see daemon.Upgrader. No connection is refused and none is
// reset: the listening sockets never close, and the old process's streams
// run to their end.
//
// The two processes talk over a socket pair the new one inherits: it
// writes "adopt" once it has loaded its configuration and waits to take
// over, the old one answers "go" once it let go, and the new one writes
// "serving" once every service serves. Under systemd (Type=notify,
// NotifyAccess=all) the new process then tells the manager it is the main
// process (MAINPID=).

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/metrics"
)

// The environment a new process of an upgrade finds: the descriptor of
// its end of the socket pair, and its inherited listening sockets as a
// JSON object from daemon.ListenerKey (or metricsKey) to descriptor.
const (
	envUpgradeSync = "EBPFWD_UPGRADE_SYNC"
	envUpgradeFDs  = "EBPFWD_UPGRADE_FDS"
	metricsKey     = "metrics"
)

// upgradeStepTimeout bounds each wait of the handshake: the new process's
// start-up (configuration, planning, BPF probes) and its set-up (adopting
// the kernel state, taking the sockets).
const upgradeStepTimeout = 60 * time.Second

// watchUpgrade sends an upgrader on upgrades for each SIGUSR2 that finds
// the configuration at path valid (a new process with a broken one would
// fail anyway; refusing early keeps the log plain). It returns when ctx is
// done.
func watchUpgrade(ctx context.Context, path string, exe string, exeErr error, metricsSrv func() *metrics.Server,
	logger *slog.Logger, upgrades chan<- daemon.Upgrader) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	defer signal.Stop(sig)
	for {
		select {
		case <-ctx.Done():
			return
		case <-sig:
		}
		logger.Info("SIGUSR2: checking the configuration before upgrading", "config", path, "binary", exe)
		if exeErr != nil {
			logger.Error("upgrade refused: cannot find this binary's path; still running", "err", exeErr)
			continue
		}
		if err := validConfig(path); err != nil {
			logger.Error("upgrade refused: the configuration does not load; still running the previous one",
				"config", path, "err", firstLine(err))
			continue
		}
		select {
		case upgrades <- &upgrader{exe: exe, args: os.Args[1:], metrics: metricsSrv(), log: logger}:
		case <-ctx.Done():
			return
		}
	}
}

// validConfig loads path and builds a daemon from it without opening
// anything: what the next run would do first.
func validConfig(path string) error {
	cfg, _, err := config.Load(path)
	if err != nil {
		return err
	}
	_, err = daemon.New(cfg, daemon.Options{Datapaths: planningDatapaths()}, discardLogger())
	return err
}

// upgrader is the old process's side of one upgrade.
type upgrader struct {
	exe     string
	args    []string
	metrics *metrics.Server // nil without a metrics endpoint
	log     *slog.Logger

	cmd    *exec.Cmd
	sync   *os.File
	lines  *bufio.Reader
	waited chan struct{} // closed when cmd has exited
}

// Start starts the new process with the listening sockets and the metrics
// socket, and waits for its "adopt".
func (u *upgrader) Start(listeners map[string]*os.File) error {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket pair for the new process: %w", err)
	}
	u.sync = os.NewFile(uintptr(pair[0]), "upgrade-sync")
	child := os.NewFile(uintptr(pair[1]), "upgrade-sync-child")
	defer child.Close()

	files := map[string]*os.File{}
	for k, f := range listeners {
		files[k] = f
	}
	if u.metrics != nil {
		f, err := u.metrics.File()
		if err != nil {
			return err
		}
		defer f.Close()
		files[metricsKey] = f
	}
	// ExtraFiles[i] is descriptor 3+i in the new process.
	extra := []*os.File{child}
	fds := map[string]int{}
	for k, f := range files {
		fds[k] = 3 + len(extra)
		extra = append(extra, f)
	}
	fdsJSON, err := json.Marshal(fds)
	if err != nil {
		return err
	}
	u.cmd = exec.Command(u.exe, u.args...)
	u.cmd.Stdin, u.cmd.Stdout, u.cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	u.cmd.ExtraFiles = extra
	u.cmd.Env = append(withoutUpgradeEnv(os.Environ()), envUpgradeSync+"=3", envUpgradeFDs+"="+string(fdsJSON))
	if err := u.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", u.exe, err)
	}
	u.waited = make(chan struct{})
	go func() { _ = u.cmd.Wait(); close(u.waited) }()
	u.lines = bufio.NewReader(u.sync)
	u.log.Info("upgrade: new process started; waiting until it is ready to take over", "pid", u.cmd.Process.Pid)
	return u.expect("adopt")
}

// Release lets the new process take over (the metrics endpoint too) and
// waits for its "serving".
func (u *upgrader) Release() error {
	if u.metrics != nil {
		u.metrics.Shutdown() // the new process serves the same socket
	}
	if _, err := u.sync.Write([]byte("go\n")); err != nil {
		return fmt.Errorf("tell the new process to take over: %w", err)
	}
	err := u.expect("serving")
	u.sync.Close()
	if err == nil {
		u.log.Info("upgrade: the new process took over", "pid", u.cmd.Process.Pid)
	}
	return err
}

// Abort ends the new process and waits for it.
func (u *upgrader) Abort() {
	if u.sync != nil {
		u.sync.Close()
	}
	if u.cmd == nil || u.cmd.Process == nil {
		return
	}
	_ = u.cmd.Process.Kill()
	<-u.waited
}

// expect reads the new process's next line within upgradeStepTimeout.
func (u *upgrader) expect(want string) error {
	_ = u.sync.SetReadDeadline(time.Now().Add(upgradeStepTimeout))
	line, err := u.lines.ReadString('\n')
	switch {
	case err != nil:
		return fmt.Errorf("the new process (pid %d) did not say %q: %w", u.cmd.Process.Pid, want, err)
	case strings.TrimSpace(line) != want:
		return fmt.Errorf("the new process (pid %d) said %q, not %q", u.cmd.Process.Pid, strings.TrimSpace(line), want)
	}
	return nil
}

func withoutUpgradeEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		if !strings.HasPrefix(kv, envUpgradeSync+"=") && !strings.HasPrefix(kv, envUpgradeFDs+"=") {
			out = append(out, kv)
		}
	}
	return out
}

// successor is the new process's side of an upgrade, read from the
// environment; nil when this process was not started by an upgrade.
type successor struct {
	sync      *os.File
	lines     *bufio.Reader
	listeners map[string]*os.File // daemon.ListenerKey -> socket
	metrics   *os.File            // nil without one
	once      sync.Once
}

// successorFromEnv takes the upgrade's descriptors and clears the
// environment, so that this process's own upgrades start clean.
func successorFromEnv() (*successor, error) {
	syncFD, fdsJSON := os.Getenv(envUpgradeSync), os.Getenv(envUpgradeFDs)
	if syncFD == "" {
		return nil, nil
	}
	os.Unsetenv(envUpgradeSync)
	os.Unsetenv(envUpgradeFDs)
	n, err := strconv.Atoi(syncFD)
	if err != nil || n < 3 {
		return nil, fmt.Errorf("%s=%q is not a descriptor", envUpgradeSync, syncFD)
	}
	var fds map[string]int
	if err := json.Unmarshal([]byte(fdsJSON), &fds); err != nil {
		return nil, fmt.Errorf("%s: %w", envUpgradeFDs, err)
	}
	s := &successor{sync: os.NewFile(uintptr(n), "upgrade-sync"), listeners: map[string]*os.File{}}
	unix.CloseOnExec(n)
	s.lines = bufio.NewReader(s.sync)
	for k, fd := range fds {
		unix.CloseOnExec(fd)
		f := os.NewFile(uintptr(fd), k)
		if k == metricsKey {
			s.metrics = f
		} else {
			s.listeners[k] = f
		}
	}
	return s, nil
}

// adopt says "adopt" and waits for the old process's "go".
func (s *successor) adopt() error {
	if _, err := s.sync.Write([]byte("adopt\n")); err != nil {
		return fmt.Errorf("tell the previous process this one is ready: %w", err)
	}
	_ = s.sync.SetReadDeadline(time.Now().Add(upgradeStepTimeout))
	line, err := s.lines.ReadString('\n')
	if err != nil {
		return fmt.Errorf("wait for the previous process to let go: %w", err)
	}
	if strings.TrimSpace(line) != "go" {
		return fmt.Errorf("the previous process said %q, not \"go\"", strings.TrimSpace(line))
	}
	return nil
}

// serving says "serving" and tells the service manager this process is
// now the main one.
func (s *successor) serving() {
	s.once.Do(func() {
		_, _ = s.sync.Write([]byte("serving\n"))
		s.sync.Close()
	})
}

// notifyReady tells systemd (Type=notify) that the daemon serves; a new
// process of an upgrade also says it is the main process now. Without
// NOTIFY_SOCKET it does nothing.
func notifyReady(logger *slog.Logger, upgraded bool) {
	state := sddaemon.SdNotifyReady
	if upgraded {
		state = fmt.Sprintf("MAINPID=%d\n%s", os.Getpid(), sddaemon.SdNotifyReady)
	}
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		logger.Warn("could not notify the service manager", "err", err)
	}
}
