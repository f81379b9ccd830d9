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

// cmdRun is `ebpfwd run`: the daemon, until a stop signal or an upgrade
// (SIGUSR2: a new process takes over and this one exits once its
// connections are done).
func cmdRun(e env, args []string) int {
	// An upgrade starts the path the process was started from, resolved
	// now: a binary replaced on disk since (a new file at that path) is
	// what the upgrade runs. /proc/self/exe would not do: it keeps
	// pointing at the running, possibly deleted, old file. (A symlink is
	// resolved here, so switching a symlink to another version is not
	// picked up; replace the file instead.)
	exe, exeErr := os.Executable()
	return runDaemon(e, args, exe, exeErr)
}

// runDaemon runs the daemon until SIGINT or SIGTERM (a full stop), or
// until a new process took over after SIGUSR2 (an upgrade) and this one's
// connections are done.
func runDaemon(e env, args []string, exe string, exeErr error) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	instance := fs.String("instance", "", "name of this daemon's control socket (default: the config file's name without extension)")
	readyFile := fs.String("ready-file", "", "write this file (the daemon's pid) once every service listens")
	drain := fs.Duration("drain-timeout", 10*time.Second, "how long in-flight connections may finish after SIGINT/SIGTERM/SIGUSR2")
	watchEvery := fs.Duration("watch-config", 0, "reload when the config file's content changed, checked this often (0: only on SIGHUP or `ebpfwd reload`)")
	var pool splice.Pool
	fs.Func("splice-pool4", "IPv4 prefix the tc datapath's splice links take their /30s from (default "+splice.DefaultPool4.String()+")",
		prefixFlag(&pool.V4))
	fs.Func("splice-pool6", "IPv6 prefix the tc datapath's splice links take their /126s from (default "+splice.DefaultPool6.String()+")",
		prefixFlag(&pool.V6))
	path, ok := parseArgs(e, fs, args)
	if !ok {
		return 2
	}
	if err := pool.Check(); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: --splice-pool4/--splice-pool6: %v\n", err)
		return 2
	}
	if *drain < 0 {
		fmt.Fprintln(e.stderr, "ebpfwd run: --drain-timeout must not be negative")
		return 2
	}
	if *watchEvery < 0 {
		fmt.Fprintln(e.stderr, "ebpfwd run: --watch-config must not be negative")
		return 2
	}
	if *instance == "" {
		*instance = instanceOf(path)
	}
	if err := daemon.ValidateInstance(*instance); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: --instance: %v\n", err)
		return 2
	}
	// The watch starts from the content before the load: a change in
	// between is then seen (and reloaded) at the first check.
	var watch *configWatch
	if *watchEvery > 0 {
		w, err := newConfigWatch(path)
		if err != nil {
			fmt.Fprintf(e.stderr, "ebpfwd run: %v\n", err)
			return 1
		}
		watch = w
	}
	cfg, ok := loadConfig(e, path)
	if !ok {
		return 1
	}
	logger, closeLog, err := newLogger(cfg.Log, e.stderr)
	if err != nil {
		fmt.Fprintf(e.stderr, "%s: log: %v\n", path, err)
		return 1
	}
	defer closeLog()
	// Packages that log without a logger of their own (loader) log
	// where and how the configuration says.
	slog.SetDefault(logger)
	if err := missingPrivileges(cfg); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: %v\n", err)
		return 1
	}
	succ, err := successorFromEnv()
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd run: upgrade: %v\n", err)
		return 1
	}
	hup, releaseHangup := notifyHangup()
	defer releaseHangup()
	ctx, hurry, stop := notifyStop(logger)
	defer stop()

	rec := metrics.NewRecorder()
	opts := daemon.Options{ReadyFile: *readyFile, DrainTimeout: *drain, Metrics: rec,
		Instance: *instance, Hurry: hurry, Datapaths: datapaths(*instance, pool, logger)}
	upgrades := make(chan daemon.Upgrader)
	opts.Upgrade = upgrades
	opts.Serving = func() {
		if succ != nil {
			succ.serving()
		}
		notifyReady(logger, succ != nil)
	}
	var inheritedMetrics *os.File
	if succ != nil {
		opts.Inherited, opts.Adopt, inheritedMetrics = succ.listeners, succ.adopt, succ.metrics
		logger.Info("ebpfwd taking over from the previous process", "sockets", len(succ.listeners))
	}
	d, err := daemon.New(cfg, opts, logger)
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return 1
	}
	go reloadOnHangup(ctx, hup, d, logger)
	if watch != nil {
		go watchConfig(ctx, watch, *watchEvery, func() error { _, err := d.ReloadFile(); return err }, logger)
	}
	var srv *metrics.Server
	if cfg.Metrics.Addr != "" {
		if srv, err = serveMetrics(cfg, d, rec, inheritedMetrics, logger); err != nil {
			fmt.Fprintf(e.stderr, "%s: %v\n", path, err)
			return 1
		}
		defer srv.Shutdown()
	} else if inheritedMetrics != nil {
		inheritedMetrics.Close() // the new configuration serves no metrics
	}
	go watchUpgrade(ctx, path, exe, exeErr, func() *metrics.Server { return srv }, logger, upgrades)
	logger.Info("ebpfwd starting", "version", version, "config", path, "pid", os.Getpid())
	switch err := d.Run(ctx); {
	case errors.Is(err, daemon.ErrUpgraded):
		logger.Info("ebpfwd exiting: the new process serves", "pid", os.Getpid())
	case err != nil:
		logger.Error("ebpfwd stopped with an error", "err", firstLine(err))
		fmt.Fprintln(e.stderr, err)
		return 1
	}
	return 0
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
