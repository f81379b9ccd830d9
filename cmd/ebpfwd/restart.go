// Restart in place (SIGUSR2): the running daemon checks the configuration
// first, stops leaving the kernel datapaths' state pinned, and the process
// re-executes itself.

package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
)

// watchRestart closes restart on the first SIGUSR2 that finds the
// configuration at path valid. A restart with a broken configuration would
// stop the daemon for good, so such a SIGUSR2 is refused (logged) and the
// daemon keeps running. It returns when ctx is done.
func watchRestart(ctx context.Context, path string, logger *slog.Logger, restart chan<- struct{}) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR2)
	defer signal.Stop(sig)
	for {
		select {
		case <-ctx.Done():
			return
		case <-sig:
		}
		logger.Info("SIGUSR2: checking the configuration before restarting in place", "config", path)
		if err := validConfig(path); err != nil {
			logger.Error("restart refused: the configuration does not load; still running the previous one",
				"config", path, "err", firstLine(err))
			continue
		}
		close(restart)
		return
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

// reexec replaces the process with exe (resolved by os.Executable when the
// run started; exeErr is what that said), with the same arguments and
// environment. It returns only on failure, with the exit status.
func reexec(e env, exe string, exeErr error) int {
	if exeErr != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: cannot restart: find own executable: %v\n", exeErr)
		return 1
	}
	// Same PID (systemd's MAINPID stays), same arguments and environment.
	// File descriptors are all close-on-exec, so nothing but the kernel
	// state the tc datapath pinned crosses over.
	err := syscall.Exec(exe, os.Args, os.Environ())
	// Exec returns only on failure. The kernel state stays pinned: the
	// next start of the instance adopts it.
	fmt.Fprintf(e.stderr, "ebpfwd run: cannot restart: exec %s: %v\n", exe, err)
	return 1
}
