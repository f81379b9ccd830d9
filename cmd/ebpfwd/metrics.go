package main

import (
	"log/slog"
	"os"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/metrics"
)

// serveMetrics starts the Prometheus endpoint GOST's `metrics` section
// describes, reading the daemon's figures at scrape time.
// inherited, when set, is the socket the previous process of an upgrade
// served metrics on.
func serveMetrics(cfg *config.Config, d *daemon.Daemon, rec *metrics.Recorder, inherited *os.File, logger *slog.Logger) (*metrics.Server, error) {
	mc := metrics.ServerConfig{Addr: cfg.Metrics.Addr, Path: cfg.Metrics.Path, Inherited: inherited}
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
