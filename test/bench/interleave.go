package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"
)

// One run measures every contender on every workload, interleaved: all
// contenders are set up first, each on a topology of its own; then each
// workload step runs for every contender back to back before the next step
// starts; then everything is torn down. The machine's speed drifts by tens
// of percent over tens of seconds, so a contender's figure is only
// comparable with the baseline's figure taken seconds apart, not the
// minute apart it would be if each contender ran all its workloads alone.

// stage is one contender set up for one run: its topology, its servers,
// its started path and what its steps have measured so far.
type stage struct {
	c       contender
	env     *runEnv
	servers []*process
	path    *path
	sample  sample
	charge  cpuCharge
	// err is the contender's first failure in this run: its remaining
	// steps are skipped and its sample is left out.
	err error
}

// workloadStep is one workload of a run, measured for every contender in
// turn before the next workload starts.
type workloadStep struct {
	name string
	// applies says whether the step measures anything on the path; nil
	// means every path.
	applies func(p *path) bool
	run     func(ctx context.Context, st *stage) error
}

// workloadSteps are the workloads of a run, in order. The three iperf3
// runs charge their CPU to the contender's cpuCharge; finish turns it into
// the per-GB figures.
func workloadSteps() []workloadStep {
	iperfStep := func(key metricKey, reverse bool, streams int) func(context.Context, *stage) error {
		return func(ctx context.Context, st *stage) error {
			return measureThroughput(ctx, st.env, st.path, key, reverse, streams, st.sample.values, &st.charge)
		}
	}
	return []workloadStep{
		{name: "iperf3 1 stream up", run: iperfStep(tputUp, false, 1)},
		{name: "iperf3 1 stream down", run: iperfStep(tputDown, true, 1)},
		{name: "iperf3 8 streams up", run: iperfStep(tputP8, false, 8)},
		{name: "connection rate", run: func(ctx context.Context, st *stage) error {
			return measureConnRate(ctx, st.env, st.path, st.sample.values)
		}},
		{name: "keep-alive request rate", run: func(ctx context.Context, st *stage) error {
			return measureKeepAlive(ctx, st.env, st.path, st.sample.values)
		}},
		{name: "latency", run: func(ctx context.Context, st *stage) error {
			return measureLatency(ctx, st.env, st.path, st.sample.values)
		}},
		// One contender at a time holds the idle connections: the hold
		// program releases them before it returns, so the machine never
		// carries two contenders' worth. Kernel paths keep their per-flow
		// state in kernel memory and have no daemon to measure.
		{name: "idle RSS", applies: func(p *path) bool { return len(p.daemons) > 0 },
			run: func(ctx context.Context, st *stage) error {
				fds, err := measureIdleRSS(ctx, st.env, st.path, st.sample.values)
				st.sample.fdsPerFlow = fds
				return err
			}},
	}
}

// rotated returns xs starting at element run mod len(xs), wrapping round.
// Each run starts at the next contender, so the order in which contenders
// meet the machine's drift changes from run to run.
func rotated[T any](xs []T, run int) []T {
	if len(xs) == 0 {
		return nil
	}
	k := run % len(xs)
	return append(append(make([]T, 0, len(xs)), xs[k:]...), xs[:k]...)
}

// benchRun runs run number run (from 0) over the contenders cs and returns
// one stage per contender, in cs's order, everything torn down. setUp
// readies one contender (the driver passes stage.setUp; tests pass fakes).
// A stage with err set failed; the others hold a complete sample. When ctx
// ends, the run stops between steps and the stages are incomplete.
func benchRun(ctx context.Context, run int, cs []contender, steps []workloadStep,
	setUp func(context.Context, *stage) error) []*stage {
	order := rotated(cs, run)
	stages := make([]*stage, 0, len(order))
	defer func() {
		for _, st := range stages {
			st.tearDown()
		}
	}()
	for _, c := range order {
		if ctx.Err() != nil {
			return stages
		}
		st := &stage{c: c, sample: sample{run: run, values: map[metricKey]float64{}}}
		stages = append(stages, st)
		if err := setUp(ctx, st); err != nil {
			if ctx.Err() != nil {
				return stages // interrupted, not failed
			}
			st.fail(run, "set up", err)
		}
	}
	start := time.Now()
	for _, step := range steps {
		for _, st := range stages {
			if ctx.Err() != nil {
				return stages
			}
			if st.err != nil || (step.applies != nil && !step.applies(st.path)) {
				continue
			}
			slog.Info("benchmarking", "run", run+1, "step", step.name, "contender", st.c.name,
				"run_elapsed", time.Since(start).Round(time.Second))
			if err := step.run(ctx, st); err != nil {
				if ctx.Err() != nil {
					return stages // interrupted, not failed
				}
				st.fail(run, step.name, err)
			}
		}
	}
	for _, st := range stages {
		if st.err == nil && ctx.Err() == nil {
			st.finish(ctx)
		}
	}
	// The deferred tear-down runs before the caller reads the stages, and
	// a daemon that does not stop cleanly fails its contender's run.
	return byContender(stages, cs)
}

// byContender reorders stages into the order of cs, dropping contenders
// that have no stage (the run was interrupted before their set-up).
func byContender(stages []*stage, cs []contender) []*stage {
	out := make([]*stage, 0, len(stages))
	for _, c := range cs {
		for _, st := range stages {
			if st.c.name == c.name {
				out = append(out, st)
			}
		}
	}
	return out
}

// setUp builds the contender's topology, starts its servers and its path.
// What it started stays in st for tearDown, also on error.
func (st *stage) setUp(ctx context.Context, base runEnv) error {
	e := base
	e.instance = instancePrefix(st.c.name)
	e.dir = filepath.Join(base.dir, e.instance)
	st.env = &e
	if err := os.MkdirAll(e.dir, 0o755); err != nil {
		return fmt.Errorf("config directory of %s: %w", st.c.name, err)
	}
	t, err := buildTopology()
	if err != nil {
		return err
	}
	e.topo = t
	st.servers, err = startServers(ctx, t.server, e.self)
	if err != nil {
		return err
	}
	st.path, err = st.c.start(ctx, &e)
	if err != nil {
		return fmt.Errorf("start %s: %w", st.c.name, err)
	}
	return nil
}

// finish turns the charged CPU into per-GB figures and reads the flow
// capacity, which for iptables reports the conntrack entries the
// workloads left.
func (st *stage) finish(ctx context.Context) {
	st.charge.perGB(len(st.path.daemons), st.sample.values)
	st.sample.capacity = st.path.capacity(ctx, st.sample.fdsPerFlow)
}

// tearDown stops the path, then the servers, then removes the topology.
// A path that does not stop cleanly fails the contender's run: a daemon
// that crashed or hung meanwhile may have skewed its figures.
func (st *stage) tearDown() {
	if st.path != nil {
		if err := st.path.stop(); err != nil && st.err == nil {
			st.fail(st.sample.run, "stop", err)
		}
		st.path = nil
	}
	var errs []error
	for _, p := range st.servers {
		errs = append(errs, p.stop())
	}
	st.servers = nil
	if err := errors.Join(errs...); err != nil {
		slog.Warn("stop servers", "contender", st.c.name, "err", err)
	}
	if st.env != nil && st.env.topo != nil {
		st.env.topo.teardown()
		st.env.topo = nil
	}
}

func (st *stage) fail(run int, what string, err error) {
	st.err = fmt.Errorf("%s: %w", what, err)
	slog.Error("contender failed in this run; its figures of the run are left out",
		"contender", st.c.name, "run", run+1, "step", what, "err", err)
}
