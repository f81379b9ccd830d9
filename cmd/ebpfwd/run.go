package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"

	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/metrics"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// cmdRun is `ebpfwd run`: the daemon, then, if it stopped for a restart in
// place, the same binary again.
func cmdRun(e env, args []string) int {
	// The restart re-executes the path the process was started from,
	// resolved now: a binary replaced on disk since (a new file at that
	// path) is what the restart runs. /proc/self/exe would not do: it
	// keeps pointing at the running, possibly deleted, old file. (A
	// symlink is resolved here, so switching a symlink to another
	// version is not picked up; replace the file instead.)
	exe, exeErr := os.Executable()
	code, restart := runDaemon(e, args)
	if !restart {
		return code
	}
	return reexec(e, exe, exeErr)
}

// runDaemon runs the daemon until SIGINT or SIGTERM (a full stop), or
// SIGUSR2 with a valid configuration (restart: it returns true, having left
// the kernel datapaths' state in place, and the caller re-executes).
func runDaemon(e env, args []string) (code int, restart bool) {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	instance := fs.String("instance", "", "name of this daemon's control socket (default: the config file's name without extension)")
	readyFile := fs.String("ready-file", "", "write this file (the daemon's pid) once every service listens")
	drain := fs.Duration("drain-timeout", 10*time.Second, "how long in-flight connections may finish after SIGINT/SIGTERM/SIGUSR2")
	var pool splice.Pool
	fs.Func("splice-pool4", "IPv4 prefix the tc datapath's splice links take their /30s from (default "+splice.DefaultPool4.String()+")",
		prefixFlag(&pool.V4))
	fs.Func("splice-pool6", "IPv6 prefix the tc datapath's splice links take their /126s from (default "+splice.DefaultPool6.String()+")",
		prefixFlag(&pool.V6))
	path, ok := parseArgs(e, fs, args)
	if !ok {
		return 2, false
	}
	if err := pool.Check(); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: --splice-pool4/--splice-pool6: %v\n", err)
		return 2, false
	}
	if *drain < 0 {
		fmt.Fprintln(e.stderr, "ebpfwd run: --drain-timeout must not be negative")
		return 2, false
	}
	if *instance == "" {
		*instance = instanceOf(path)
	}
	if err := daemon.ValidateInstance(*instance); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: --instance: %v\n", err)
		return 2, false
	}
	cfg, ok := loadConfig(e, path)
	if !ok {
		return 1, false
	}
	logger, closeLog, err := newLogger(cfg.Log, e.stderr)
	if err != nil {
		fmt.Fprintf(e.stderr, "%s: log: %v\n", path, err)
		return 1, false
	}
	defer closeLog()
	// Packages that log without a logger of their own (loader) log
	// where and how the configuration says.
	slog.SetDefault(logger)
	if err := missingPrivileges(cfg); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: %v\n", err)
		return 1, false
	}
	hup, releaseHangup := notifyHangup()
	defer releaseHangup()
	ctx, hurry, stop := notifyStop(logger)
	defer stop()
	restartReq := make(chan struct{})
	go watchRestart(ctx, path, logger, restartReq)

	rec := metrics.NewRecorder()
	d, err := daemon.New(cfg, daemon.Options{ReadyFile: *readyFile, DrainTimeout: *drain, Metrics: rec,
		Instance: *instance, Restart: restartReq, Hurry: hurry, Datapaths: datapaths(*instance, pool, logger)}, logger)
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return 1, false
	}
	go reloadOnHangup(ctx, hup, d, logger)
	if cfg.Metrics.Addr != "" {
		srv, err := serveMetrics(cfg, d, rec, logger)
		if err != nil {
			fmt.Fprintf(e.stderr, "%s: %v\n", path, err)
			return 1, false
		}
		defer srv.Shutdown()
	}
	logger.Info("ebpfwd starting", "version", version, "config", path, "pid", os.Getpid())
	switch err := d.Run(ctx); {
	case errors.Is(err, daemon.ErrRestart):
		logger.Info("ebpfwd re-executing itself to restart in place", "pid", os.Getpid(), "config", path)
		return 0, true
	case err != nil:
		logger.Error("ebpfwd failed to start", "err", firstLine(err))
		fmt.Fprintln(e.stderr, err)
		return 1, false
	}
	return 0, false
}

// prefixFlag parses a CIDR flag into p.
func prefixFlag(p *netip.Prefix) func(string) error {
	return func(v string) error {
		pfx, err := netip.ParsePrefix(v)
		if err != nil {
			return err
		}
		*p = pfx
		return nil
	}
}
