// Command ebpfwd forwards TCP and UDP between Linux network namespaces,
// configured with GOST v3's YAML.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/metrics"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// env is what a command may touch, injected so tests can run the CLI
// in-process.
type env struct {
	stdout, stderr io.Writer
}

type command struct {
	name, usage, help string
	run               func(e env, args []string) int
}

func commands() []command {
	return []command{
		{"run", "run [--instance NAME] [--ready-file PATH] [--drain-timeout D] CONFIG", "run the services of CONFIG in the foreground (SIGHUP: reload; SIGUSR2: restart in place)", cmdRun},
		{"reload", "reload [--instance NAME | CONFIG]", "reload the configuration of a running instance, as SIGHUP does, and print the outcome", cmdReload},
		{"conns", "conns [--instance NAME | CONFIG]", "list the live connections and flows of a running instance", cmdConns},
		{"check", "check CONFIG", "validate CONFIG and open every namespace it names", cmdCheck},
		{"plan", "plan CONFIG", "print the datapath chosen for each service, and why", cmdPlan},
		{"version", "version", "print the version", cmdVersion},
	}
}

func main() {
	os.Exit(dispatch(env{stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:]))
}

func dispatch(e env, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(e.stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(e, args[1:])
		}
	}
	fmt.Fprintf(e.stderr, "ebpfwd: unknown command %q\n\n", args[0])
	usage(e.stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: ebpfwd COMMAND [ARGS]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-52s %s\n", c.usage, c.help)
	}
}

func cmdVersion(e env, _ []string) int {
	fmt.Fprintf(e.stdout, "ebpfwd %s\n", version)
	return 0
}

// loadConfig loads and validates path, printing warnings and errors.
func loadConfig(e env, path string) (*config.Config, bool) {
	cfg, warnings, err := config.Load(path)
	for _, w := range warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", w)
	}
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return nil, false
	}
	return cfg, true
}

// parseArgs parses a command's flags and its one CONFIG argument. It
// returns false, after saying why, for a usage error (exit status 2).
func parseArgs(e env, fs *flag.FlagSet, args []string) (string, bool) {
	fs.SetOutput(e.stderr)
	if fs.Parse(args) != nil {
		return "", false
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(e.stderr, "ebpfwd %s: exactly one CONFIG file is needed (got %d arguments)\n", fs.Name(), fs.NArg())
		return "", false
	}
	return fs.Arg(0), true
}

func cmdCheck(e env, args []string) int {
	path, ok := parseArgs(e, flag.NewFlagSet("check", flag.ContinueOnError), args)
	if !ok {
		return 2
	}
	// Every problem at once: configuration errors, then the namespaces even
	// of a configuration that is otherwise invalid.
	cfg, warnings, cfgErr := config.Inspect(path)
	for _, w := range warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", w)
	}
	if cfg == nil {
		fmt.Fprintln(e.stderr, cfgErr)
		return 1
	}
	failed := false
	report := func(err error) {
		if err != nil {
			fmt.Fprintln(e.stderr, err)
			failed = true
		}
	}
	report(cfgErr)
	if cfgErr == nil {
		_, err := daemon.New(cfg, daemon.Options{Datapaths: planningDatapaths()}, discardLogger())
		report(err)
	}
	if err := missingPrivileges(cfg); err != nil {
		report(fmt.Errorf("ebpfwd check: %w", err))
	} else {
		report(daemon.CheckNamespaces(cfg))
		if cfgErr == nil {
			report(daemon.Preflight(cfg))
		}
	}
	if failed {
		return 1
	}
	fmt.Fprintf(e.stdout, "%s: ok (%d services, %d chains)\n", path, len(cfg.Services), len(cfg.Chains))
	return 0
}

func cmdPlan(e env, args []string) int {
	path, ok := parseArgs(e, flag.NewFlagSet("plan", flag.ContinueOnError), args)
	if !ok {
		return 2
	}
	cfg, ok := loadConfig(e, path)
	if !ok {
		return 1
	}
	d, err := daemon.New(cfg, daemon.Options{Datapaths: planningDatapaths()}, discardLogger())
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return 1
	}
	for _, p := range d.Plans() {
		fmt.Fprintf(e.stdout, "%s\t%s\t%s\n", p.Service, p.Datapath, p.Reason)
	}
	return 0
}

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

// serveMetrics starts the Prometheus endpoint GOST's `metrics` section
// describes, reading the daemon's figures at scrape time.
func serveMetrics(cfg *config.Config, d *daemon.Daemon, rec *metrics.Recorder, logger *slog.Logger) (*metrics.Server, error) {
	mc := metrics.ServerConfig{Addr: cfg.Metrics.Addr, Path: cfg.Metrics.Path}
	if a := cfg.Metrics.Auth; a != nil {
		mc.Username, mc.Password = a.Username, a.Password
	}
	srv, err := metrics.Listen(mc, metrics.Registry(d, rec, version, time.Now()), logger)
	if err != nil {
		return nil, err
	}
	// BPF program cost is a metric; without the kernel's accounting it
	// would read zero. A kernel that refuses only costs that metric.
	if stats, err := metrics.EnableBPFStats(); err != nil {
		logger.Warn("BPF program cost will read zero", "err", err)
	} else {
		srv.OnShutdown(func() { stats.Close() })
	}
	go srv.Serve()
	logger.Info("serving metrics", "addr", srv.Addr(), "path", mc.Path)
	return srv, nil
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

func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}

var errNoPrivileges = errors.New("missing privileges")
