// Package daemon turns a validated configuration into running services:
// it resolves namespaces, builds chains and node selectors, plans a datapath
// per service, opens listeners, and drains on shutdown.
//
// The way of a connection reads top to bottom: config -> plan -> datapath
// Setup -> accept -> dial (node selection, chain) -> datapath Splice.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/metrics"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
	"github.com/ebpfwd/ebpfwd/userspace"
	"github.com/ebpfwd/ebpfwd/userspace/chain"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

// dialTimeout bounds one attempt to reach one node (through its chain, if
// any); a dead node then costs at most this before the next is tried.
const dialTimeout = 10 * time.Second

// Options tune a daemon's lifetime, not its traffic (that is the config's).
type Options struct {
	// DrainTimeout is how long in-flight connections may finish after
	// shutdown starts before they are closed.
	DrainTimeout time.Duration
	// ReadyFile, when set, is written once every service is listening.
	ReadyFile string
	// Metrics records dial latencies; nil records nothing.
	Metrics *metrics.Recorder
	// Instance names this daemon's control socket; "" opens none.
	Instance string
	// Hurry, when it is closed during a drain, ends the drain at once:
	// connections still open are closed and everything is removed as
	// after a drain timeout (a second SIGTERM). Nil never fires.
	Hurry <-chan struct{}
	// Datapaths are the datapaths services may be planned on; nil offers
	// only the userspace relay. The CLI registers the kernel ones.
	Datapaths *datapath.Set
	// Restart, when it is closed or receives, shuts the daemon down like
	// the end of Run's context, except that the kernel datapaths keep
	// their state (attached programs, pinned maps, splice links) for the
	// next run, and Run returns ErrRestart: the caller then re-executes
	// the daemon, whose next run takes the state over. Nil never fires.
	Restart <-chan struct{}
	// Upgrade, when it receives, hands the daemon over to a new process
	// (see Upgrader) and Run returns ErrUpgraded once its own connections
	// are done. Nil never fires.
	Upgrade <-chan Upgrader
	// Inherited are the listening sockets the previous process of an
	// upgrade handed over, by ListenerKey: a service takes its own
	// instead of binding; the rest are closed once every service listens.
	Inherited map[string]*os.File
	// Adopt, when set, is called by Run before it sets anything up: the
	// new process of an upgrade waits there until the old one let go of
	// the kernel state and the control socket. An error stops Run.
	Adopt func() error
	// Serving, when set, is called once every service serves.
	Serving func()
}

// ErrRestart is what Run returns after a shutdown for Options.Restart: the
// services are closed, the kernel datapaths' flows keep going, and the
// caller is expected to start the next run at once.
var ErrRestart = errors.New("daemon stopped to restart in place")

// stateKeeper is a datapath whose kernel state can outlive the process for
// a restart in place (tc).
type stateKeeper interface {
	// KeepForRestart makes closing services leave the kernel's state.
	KeepForRestart()
}

// setupFinisher is a datapath that cleans up after every service is set
// up: what a previous run left and this one does not need (tc).
type setupFinisher interface {
	FinishSetup() error
}

// Daemon runs the services of one configuration, and of the next one a
// reload gives it.
type Daemon struct {
	opts      Options
	log       *slog.Logger
	datapaths *datapath.Set

	// mu guards what a reload replaces; metrics scrapes and the control
	// socket read it meanwhile.
	mu       sync.RWMutex
	cfg      *config.Config
	services []*service
	chains   []*chain.Chain

	// conns is the parent of every service's connection context; Run sets
	// it before the first service starts.
	conns    context.Context
	reloads  chan reloadRequest
	stopped  chan struct{}  // closed when Run no longer takes reloads
	retiring sync.WaitGroup // services a reload replaced, still draining
	// budget is the fd budget Run fixed at start (under mu: metrics read
	// it); only Run's goroutine (start, reloads) changes it. pool is what the services draw on: every
	// service's Limit is the pool's.
	budget fdBudget
	pool   *datapath.Pool
	// inheritMu guards opts.Inherited, which services take from.
	inheritMu sync.Mutex
}

// current returns the running services.
func (d *Daemon) current() []*service {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return d.services
}

// New builds the daemon's services from cfg without opening anything: it
// wires chains and selectors and plans each service's datapath. Errors
// name the config file, line and field.
func New(cfg *config.Config, opts Options, log *slog.Logger) (*Daemon, error) {
	d := &Daemon{opts: opts, log: log, datapaths: opts.Datapaths, conns: context.Background(),
		reloads: make(chan reloadRequest), stopped: make(chan struct{}), pool: datapath.NewPool()}
	if d.datapaths == nil {
		d.datapaths = datapath.NewSet(userspace.Datapath{Logger: log})
	}
	services, chains, err := d.build(cfg)
	if err != nil {
		return nil, err
	}
	d.cfg, d.services, d.chains = cfg, services, chains
	return d, nil
}

// build makes the services and chains of cfg, planned but not started.
func (d *Daemon) build(cfg *config.Config) ([]*service, []*chain.Chain, error) {
	var (
		errs     []error
		services []*service
		chains   []*chain.Chain
	)
	byName := map[string]*chain.Chain{}
	for _, cc := range cfg.Chains {
		c := buildChain(cc)
		byName[cc.Name] = c
		chains = append(chains, c)
	}
	for i, sc := range cfg.Services {
		s, err := newService(d, cfg, i, sc, byName)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		services = append(services, s)
	}
	return services, chains, errors.Join(errs...)
}

// at is pos, or fallback when pos was not recorded.
func at(pos, fallback config.Pos) config.Pos {
	if pos == (config.Pos{}) {
		return fallback
	}
	return pos
}

// located formats an error at a config position, as config's diagnostics do.
func located(cfg *config.Config, pos config.Pos, field string, err error) error {
	return fmt.Errorf("%s:%d:%d: %s: %w", cfg.Path, pos.Line, pos.Column, field, err)
}

func selectorOptions(s config.Selector) selector.Options {
	return selector.Options{Strategy: s.Strategy, MaxFails: s.MaxFails, FailTimeout: s.FailTimeout}
}

func buildChain(cc *config.Chain) *chain.Chain {
	c := &chain.Chain{Name: cc.Name}
	for _, hc := range cc.Hops {
		var nodes []*selector.Node[*chain.Node]
		for _, nc := range hc.Nodes {
			n := &chain.Node{Name: nc.Name, Addr: nc.Addr, NS: nc.NetNS, ProxyProtocol: nc.ProxyProtocol}
			if a := nc.Connector.Auth; a != nil {
				n.Auth = &httpconnect.Auth{Username: a.Username, Password: a.Password}
			}
			nodes = append(nodes, &selector.Node[*chain.Node]{Name: nc.Name, Value: n})
		}
		c.Hops = append(c.Hops, &chain.Hop{Name: hc.Name, NS: hc.NetNS, Selector: selector.New(selectorOptions(hc.Selector), nodes...)})
	}
	return c
}

// Check opens every namespace the configuration names, so a missing one is
// reported before anything listens. It returns every problem found.
func (d *Daemon) Check() error {
	d.mu.RLock()
	defer d.mu.RUnlock()
	return CheckNamespaces(d.cfg)
}

// CheckNamespaces opens every namespace cfg names and returns every problem
// found, each located in the config. It reads only namespace fields, so it
// also works on the partial configuration config returns alongside its
// errors: `ebpfwd check` reports a missing namespace next to a bad address.
func CheckNamespaces(cfg *config.Config) error {
	var errs []error
	check := func(ns netns.NS, pos config.Pos, field string) {
		if ns.IsOwn() {
			return
		}
		if err := ns.Check(); err != nil {
			errs = append(errs, located(cfg, pos, field, err))
		}
	}
	for i, s := range cfg.Services {
		if s == nil {
			continue
		}
		field := fmt.Sprintf("services[%d].metadata", i)
		check(s.NetNS, at(s.NetNSPos, s.Pos), field+".netns")
		check(s.NetNSOut, at(s.NetNSOutPos, s.Pos), field+".netns.out")
	}
	for _, cc := range cfg.Chains {
		if cc == nil {
			continue
		}
		for hi, hc := range cc.Hops {
			if hc == nil {
				continue
			}
			field := fmt.Sprintf("chains[%s].hops[%d]", cc.Name, hi)
			check(hc.NetNS, at(hc.NetNSPos, hc.Pos), field+".metadata.netns")
			for ni, nc := range hc.Nodes {
				if nc != nil {
					check(nc.NetNS, at(nc.NetNSPos, nc.Pos), fmt.Sprintf("%s.nodes[%d].metadata.netns", field, ni))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// Plan is the datapath chosen for one service and why.
type Plan = datapath.Plan

// Plans describes the datapath chosen for each service and why.
func (d *Daemon) Plans() []Plan {
	services := d.current()
	plans := make([]Plan, 0, len(services))
	for _, s := range services {
		plans = append(plans, s.plan)
	}
	return plans
}

// Run starts every service and serves until ctx is done, then stops
// accepting, lets in-flight connections finish for the drain timeout,
// closes the rest and removes whatever the datapaths attached. If any
// service cannot start, everything already started is undone and the
// error returned. Options.Restart ends it the same way but leaves the
// kernel datapaths' state, and returns ErrRestart.
//
// After every service is set up, datapaths remove what a previous run of
// the instance left and this run does not need.
func (d *Daemon) Run(ctx context.Context) error {
	if err := d.Check(); err != nil {
		return err
	}
	fdLimit := raiseFDLimit(d.log)
	if d.opts.Adopt != nil {
		if err := d.opts.Adopt(); err != nil {
			return fmt.Errorf("take over from the previous process: %w", err)
		}
	}
	closeControl := func() {}
	if d.opts.Instance != "" {
		l, err := listenControl(d.opts.Instance)
		if err != nil {
			return err
		}
		path := l.Addr().String()
		controlCtx, stopControl := context.WithCancel(context.WithoutCancel(ctx))
		// Once: an upgrade closes it early, so the new process can open
		// its own at the same path.
		closeControl = sync.OnceFunc(func() {
			stopControl() // the server closes l
			os.Remove(path)
		})
		defer closeControl()
		go d.serveControl(controlCtx, l)
	}
	// Connections live in their own context: shutdown cancels it only
	// after the drain timeout, so in-flight transfers may finish.
	connCtx, cancelConns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelConns()
	d.conns = connCtx
	stopReloads := sync.OnceFunc(func() { close(d.stopped) })
	defer stopReloads()
	if err := d.start(ctx); err != nil {
		d.closeAll()
		return err
	}
	d.finishSetup()
	// Measured now, with every listener and datapath open, and before
	// any connection: what the daemon holds for itself.
	d.startBudget(fdLimit)
	for _, s := range d.current() {
		s.logStarted("service started")
	}
	if d.opts.ReadyFile != "" {
		if err := os.WriteFile(d.opts.ReadyFile, []byte(fmt.Sprintf("%d\n", os.Getpid())), 0o644); err != nil {
			d.closeAll()
			return fmt.Errorf("write ready file: %w", err)
		}
	}
	for _, s := range d.current() {
		s.serve()
	}
	d.closeUnclaimed()
	if d.opts.Serving != nil {
		d.opts.Serving()
	}

	restart, upgraded := false, false
	var upgradeErr error
wait:
	for {
		select {
		case u := <-d.opts.Upgrade:
			d.log.Info("upgrade: starting the new process with this one's listening sockets")
			started, err := d.handOver(u, closeControl)
			if !started {
				d.log.Error("upgrade refused: the new process did not start; still serving", "err", err)
				continue
			}
			upgraded, upgradeErr = true, err
			if err != nil {
				d.log.Error("upgrade: the new process failed after this one let go; finishing this one's connections and exiting with an error", "err", err)
			} else {
				d.log.Info("upgrade: the new process serves; finishing this one's connections", "drain_timeout", d.opts.DrainTimeout)
			}
			break wait
		case <-ctx.Done():
			d.log.Info("shutting down: no longer accepting", "drain_timeout", d.opts.DrainTimeout)
			break wait
		case <-d.opts.Restart:
			restart = true
			d.log.Info("restarting in place: no longer accepting; kernel flows keep going", "drain_timeout", d.opts.DrainTimeout)
			break wait
		case req := <-d.reloads:
			req.done <- d.reload(ctx, req.cfg)
		}
	}
	stopReloads()
	services := d.current()
	for _, s := range services {
		s.stopAccepting()
	}
	var drained sync.WaitGroup
	for _, s := range services {
		drained.Go(func() {
			if left := s.drain(d.opts.DrainTimeout, d.opts.Hurry); left > 0 {
				d.log.Warn("drain ended: closing connections still open", "service", s.cfg.Name, "active", left)
			}
		})
	}
	drained.Wait()
	d.retiring.Wait() // a reload's drains are bounded by the same timeout
	if restart && ctx.Err() != nil {
		// A stop requested during the restart's drain wins: leaving the
		// kernel state behind would break the promise of a full stop.
		restart = false
		d.log.Info("stop requested during the restart: stopping instead, removing the kernel state")
	}
	if restart {
		for _, dp := range d.datapaths.Datapaths() {
			if k, ok := dp.(stateKeeper); ok {
				k.KeepForRestart()
			}
		}
	}
	d.closeAll()
	if upgraded {
		if upgradeErr != nil {
			return fmt.Errorf("upgrade: %w", upgradeErr)
		}
		d.log.Info("stopped after the upgrade: the new process serves")
		return ErrUpgraded
	}
	if restart {
		d.log.Info("stopped for restart: kernel datapaths left in place for the next run")
		return ErrRestart
	}
	d.log.Info("stopped")
	return nil
}

// finishSetup lets the datapaths remove what a previous run left and this
// one does not need.
func (d *Daemon) finishSetup() {
	for _, dp := range d.datapaths.Datapaths() {
		if f, ok := dp.(setupFinisher); ok {
			// Leftovers cost map slots and interfaces, not correctness:
			// they are no reason to refuse to serve.
			if err := f.FinishSetup(); err != nil {
				d.log.Warn("could not remove everything a previous run left", "datapath", dp.Kind(), "err", err)
			}
		}
	}
}

func (d *Daemon) start(ctx context.Context) error {
	for _, s := range d.current() {
		if err := s.start(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (d *Daemon) closeAll() {
	for _, s := range d.current() {
		s.close()
	}
}

func (d *Daemon) active() int64 {
	var n int64
	for _, s := range d.current() {
		if s.att != nil {
			n += s.att.Counters().Active
		}
	}
	return n
}
