package main

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ebpfwd/ebpfwd/daemon"
)

// stopSignals are the signals that stop the daemon cleanly: drain, remove
// everything, exit 0.
var stopSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT}

// notifyStop returns a context cancelled by the first stop signal, and a
// channel closed by the second: the operator who sends it again wants the
// drain over now, and still gets a clean stop (nothing left attached).
// release stops catching them.
func notifyStop(logger *slog.Logger) (ctx context.Context, hurry <-chan struct{}, release func()) {
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, stopSignals...)
	ctx, cancel := context.WithCancel(context.Background())
	hurryCh := make(chan struct{})
	done := make(chan struct{})
	go func() {
		select {
		case s := <-sig:
			logger.Info("stop requested: draining; send it again to stop at once", "signal", s.String())
			cancel()
		case <-done:
			return
		}
		select {
		case s := <-sig:
			logger.Warn("second stop request: ending the drain now", "signal", s.String())
			close(hurryCh)
		case <-done:
		}
	}()
	return ctx, hurryCh, func() {
		signal.Stop(sig)
		close(done)
		cancel()
	}
}

// notifyHangup catches SIGHUP from now on, so that it never terminates
// the daemon (Go's default): as in GOST, it reloads the configuration.
func notifyHangup() (hup <-chan os.Signal, release func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGHUP)
	return ch, func() { signal.Stop(ch) }
}

// reloadOnHangup reloads d's configuration file on every SIGHUP until ctx
// is done. A configuration that does not load or apply is refused (the
// daemon logs why and counts it) and the previous one keeps running.
func reloadOnHangup(ctx context.Context, hup <-chan os.Signal, d *daemon.Daemon, logger *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
		}
		logger.Info("SIGHUP: reloading the configuration")
		if _, err := d.ReloadFile(); errors.Is(err, daemon.ErrNotRunning) {
			return
		}
	}
}
