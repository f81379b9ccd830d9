package daemon

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
)

// A reload applies a new configuration to the running daemon, as GOST does
// on SIGHUP, without a restart:
//
//   - The new file is loaded and checked first, and every service of it
//     is built and planned; anything wrong refuses the whole reload, and
//     the old configuration keeps running untouched.
//   - A service whose configuration (and chain) did not change is left
//     alone: same listener, same connections, same kernel flows.
//   - A changed TCP service that listens where it did (same address and
//     namespace; matched by name, else by that address) gets its new
//     datapath set up, then takes over the old form's listening socket:
//     no connection is refused, and the old form's connections drain (up
//     to the drain timeout) on the old form. Nodes, selectors, chains and
//     datapaths change this way; the tc datapath updates its maps in place,
//     so kernel flows keep going.
//   - A changed UDP service that listens where it did is stopped, then
//     started anew on the same address: its sessions end, and datagrams
//     arriving in between (well under a millisecond) are lost.
//   - A new service starts; a removed one stops accepting and drains.
//
// Log and metrics settings are read at start only: a reload that changes
// them says so and applies the rest.

type reloadRequest struct {
	cfg  *config.Config
	done chan reloadOutcome
}

type reloadOutcome struct {
	res ReloadResult
	err error
}

// ReloadResult says what a reload did, by service name.
type ReloadResult struct {
	Unchanged, Changed, Added, Removed []string
	// Ignored lists settings the reload changed but only a restart
	// applies.
	Ignored []string
}

func (r ReloadResult) String() string {
	part := func(what string, names []string) string {
		if len(names) == 0 {
			return ""
		}
		return fmt.Sprintf("%s: %s; ", what, strings.Join(names, ", "))
	}
	s := part("unchanged", r.Unchanged) + part("changed", r.Changed) + part("added", r.Added) +
		part("removed", r.Removed) + part("needs a restart to apply", r.Ignored)
	return strings.TrimSuffix(s, "; ")
}

// ErrNotRunning is returned by Reload when Run is not serving.
var ErrNotRunning = errors.New("the daemon is not running")

// ReloadFile reloads the configuration file the daemon runs: it loads it
// again and applies it (see Reload). A file that does not load is refused
// with its errors, and the old configuration keeps running.
func (d *Daemon) ReloadFile() (ReloadResult, error) {
	d.mu.RLock()
	path := d.cfg.Path
	d.mu.RUnlock()
	cfg, _, err := config.Load(path)
	if err != nil {
		d.opts.Metrics.ConfigLoaded(false, time.Now())
		d.log.Error("reload refused: the configuration does not load; still running the previous one",
			"config", path, "err", err)
		return ReloadResult{}, err
	}
	return d.Reload(cfg)
}

// Reload applies cfg to the running daemon (see the top of this file). It
// returns once the new services serve; the old forms drain on their own.
func (d *Daemon) Reload(cfg *config.Config) (ReloadResult, error) {
	req := reloadRequest{cfg: cfg, done: make(chan reloadOutcome, 1)}
	select {
	case d.reloads <- req:
	case <-d.stopped:
		return ReloadResult{}, ErrNotRunning
	}
	out := <-req.done
	d.opts.Metrics.ConfigLoaded(out.err == nil, time.Now())
	if out.err != nil {
		d.log.Error("reload refused: still running the previous configuration", "config", cfg.Path, "err", out.err)
	} else {
		d.log.Info("configuration reloaded", "config", cfg.Path, "result", out.res.String())
	}
	return out.res, out.err
}

// reload runs in Run's goroutine, between the start and the shutdown.
func (d *Daemon) reload(ctx context.Context, cfg *config.Config) reloadOutcome {
	if err := CheckNamespaces(cfg); err != nil {
		return reloadOutcome{err: err}
	}
	fresh, chains, err := d.build(cfg)
	if err != nil {
		return reloadOutcome{err: err}
	}
	d.mu.RLock()
	oldCfg, old := d.cfg, d.services
	d.mu.RUnlock()

	var res ReloadResult
	if !equalIgnoringPos(oldCfg.Log, cfg.Log) {
		res.Ignored = append(res.Ignored, "log")
	}
	if !equalIgnoringPos(oldCfg.Metrics, cfg.Metrics) {
		res.Ignored = append(res.Ignored, "metrics")
	}

	// Pair every new service with its old form: by name, else by where it
	// listens (a renamed service keeps its socket).
	type step struct {
		next, prev *service
		keep       bool // prev goes on as it is
		handOver   bool // next takes prev's listener
	}
	taken := map[*service]bool{}
	steps := make([]step, 0, len(fresh))
	for _, n := range fresh {
		var prev *service
		for _, o := range old {
			if o.cfg.Name == n.cfg.Name && !taken[o] {
				prev = o
				break
			}
		}
		if prev == nil {
			for _, o := range old {
				if !taken[o] && sameListen(o, n) {
					prev = o
					break
				}
			}
		}
		st := step{next: n, prev: prev}
		if prev != nil {
			taken[prev] = true
			st.keep = prev.cfg.Name == n.cfg.Name && sameService(oldCfg, prev.cfg, cfg, n.cfg)
			st.handOver = !st.keep && sameListen(prev, n) && prev.ln.acc != nil
			if !st.keep && prev.limit.Cost() == n.limit.Cost() {
				// The old form's connections drain holding their
				// descriptors: they count against the new form's share.
				// (A service that changed between TCP and UDP keeps
				// its old Limit for the old form; that Limit loses
				// its guarantee and borrows until it drains.)
				n.limit = prev.limit
			}
		}
		steps = append(steps, st)
	}

	// Prepare what can be undone: datapaths, and listeners on addresses
	// nobody holds. A failure stops here, and the old configuration runs on.
	var prepared []*service
	undo := func(err error) reloadOutcome {
		for _, s := range prepared {
			s.close()
		}
		return reloadOutcome{err: err}
	}
	for _, st := range steps {
		if st.keep {
			continue
		}
		if err := st.next.setup(ctx); err != nil {
			return undo(err)
		}
		prepared = append(prepared, st.next)
		if st.prev == nil || (!st.handOver && !sameListen(st.prev, st.next)) {
			if err := st.next.listen(ctx); err != nil {
				return undo(err)
			}
		}
	}

	// The shares change with the set of services: every one that runs
	// from now on gets its share before the new ones serve. What the
	// new forms opened (listeners, datapaths) comes out of the headroom
	// of the reserve fixed at start.
	final := make([]*service, 0, len(steps))
	for _, st := range steps {
		if st.keep {
			final = append(final, st.prev)
		} else {
			final = append(final, st.next)
		}
	}
	d.applyBudget(final)

	// Commit: from here on nothing is refused.
	next := make([]*service, 0, len(steps))
	for _, st := range steps {
		switch {
		case st.keep:
			next = append(next, st.prev)
			res.Unchanged = append(res.Unchanged, st.prev.cfg.Name)
			continue
		case st.handOver:
			st.next.ln, st.prev.ln = st.prev.ln, listener{}
			st.next.ln.acc.handOver(st.next)
		case st.prev != nil && st.next.ln == (listener{}):
			// Same address, no socket to hand over (UDP): the old form
			// must let the address go first.
			st.prev.stopAccepting()
			if err := st.next.listen(ctx); err != nil {
				// The old form is stopped and the new one cannot listen:
				// the service is down until the next reload.
				d.log.Error("reload: service could not listen again; it is down", "service", st.next.cfg.Name, "err", err)
			}
		case st.prev != nil:
			st.prev.stopAccepting()
		}
		if st.prev != nil {
			res.Changed = append(res.Changed, st.next.cfg.Name)
			d.retire(st.prev)
		} else {
			res.Added = append(res.Added, st.next.cfg.Name)
		}
		st.next.serve()
		st.next.logStarted("service started by reload")
		next = append(next, st.next)
	}
	for _, o := range old {
		if !taken[o] {
			o.stopAccepting()
			res.Removed = append(res.Removed, o.cfg.Name)
			d.retire(o)
		}
	}
	d.mu.Lock()
	d.cfg, d.services, d.chains = cfg, next, chains
	d.mu.Unlock()
	return reloadOutcome{res: res}
}

// retire drains a service a reload replaced or removed, then closes it.
func (d *Daemon) retire(s *service) {
	d.retiring.Add(1)
	go func() {
		defer d.retiring.Done()
		if left := s.drain(d.opts.DrainTimeout, d.opts.Hurry); left > 0 {
			d.log.Warn("reload: drain timeout, closing connections of the previous form", "service", s.cfg.Name, "active", left)
		}
		s.close()
	}()
}

// sameListen reports whether two services listen on one socket address:
// same network, address and namespace (by identity).
func sameListen(a, b *service) bool {
	if a.cfg.Listener.Type != b.cfg.Listener.Type || a.cfg.Addr != b.cfg.Addr {
		return false
	}
	same, err := a.listenNS.Same(b.listenNS)
	return err == nil && same
}

// sameService reports whether a service's configuration, and that of the
// chain it uses, are unchanged between two configurations. Positions in
// the file do not count.
func sameService(aCfg *config.Config, a *config.Service, bCfg *config.Config, b *config.Service) bool {
	if !equalIgnoringPos(a, b) {
		return false
	}
	if a.Handler.Chain == "" {
		return true
	}
	return equalIgnoringPos(chainOf(aCfg, a.Handler.Chain), chainOf(bCfg, b.Handler.Chain))
}

func chainOf(cfg *config.Config, name string) *config.Chain {
	for _, c := range cfg.Chains {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// equalIgnoringPos compares two configuration values deeply, skipping
// every struct field named Pos (where in the file a value was written).
func equalIgnoringPos(a, b any) bool {
	return equalValues(reflect.ValueOf(a), reflect.ValueOf(b))
}

func equalValues(a, b reflect.Value) bool {
	if a.IsValid() != b.IsValid() {
		return false
	}
	if !a.IsValid() {
		return true
	}
	if a.Type() != b.Type() {
		return false
	}
	switch a.Kind() {
	case reflect.Pointer, reflect.Interface:
		if a.IsNil() || b.IsNil() {
			return a.IsNil() == b.IsNil()
		}
		return equalValues(a.Elem(), b.Elem())
	case reflect.Struct:
		for i := range a.NumField() {
			if a.Type().Field(i).Name == "Pos" {
				continue
			}
			if !equalValues(a.Field(i), b.Field(i)) {
				return false
			}
		}
		return true
	case reflect.Slice, reflect.Array:
		if a.Len() != b.Len() {
			return false
		}
		for i := range a.Len() {
			if !equalValues(a.Index(i), b.Index(i)) {
				return false
			}
		}
		return true
	case reflect.Map:
		if a.Len() != b.Len() {
			return false
		}
		for _, k := range a.MapKeys() {
			bv := b.MapIndex(k)
			if !bv.IsValid() || !equalValues(a.MapIndex(k), bv) {
				return false
			}
		}
		return true
	default:
		return a.Equal(b)
	}
}
