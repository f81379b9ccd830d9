// Package soak is `make soak`: mixed traffic on every datapath for a long
// while (30 minutes by default), with a configuration reload, an upgrade
// and a crash-and-restart in turn every few minutes, reporting what moved,
// what was verified, what failed and when, and the daemon's descriptors
// and memory over time. It is not part of `make test`: without
// -soak.duration it skips.
package soak

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

var (
	duration = flag.Duration("soak.duration", 0, "how long the soak runs (0: skip)")
	every    = flag.Duration("soak.every", 3*time.Minute, "time between events (reload, upgrade, restart, in turn)")
	report   = flag.String("soak.report", "", "also write the report to this file (docs/RELIABILITY.md)")
)

func TestMain(m *testing.M) { os.Exit(e2e.Main(m)) }

// The soak topology: clients in C, the daemon in the root namespace
// listening in G (tc for the kernel datapath, a splice link to S), targets
// in S.
const soakConfig = `services:
- name: tc-tcp
  addr: 10.77.1.1:8000
  handler: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "10.77.2.2:9000"}]}
  metadata: {netns: $G, netns.out: $G, datapath: tc}
- name: relay-tcp
  addr: 10.77.1.1:8001
  handler: {type: tcp}
  forwarder: {nodes: [{name: echo, addr: "10.77.2.2:9000"}]}
  metadata: {netns: $G, netns.out: $G, datapath: userspace}
- name: tc-udp
  addr: 10.77.1.1:8053
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true, ttl: 30s}}
  forwarder: {nodes: [{name: echo, addr: "10.77.2.2:9053"}]}
  metadata: {netns: $G, netns.out: $G, datapath: tc}
- name: relay-udp
  addr: 10.77.1.1:8054
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true, ttl: 30s}}
  forwarder: {nodes: [{name: echo, addr: "10.77.2.2:9053"}]}
  metadata: {netns: $G, netns.out: $G, datapath: userspace}
# reload-generation: $GEN
`

// tally is one datapath's figures.
type tally struct {
	conns, verified atomic.Int64
	bytes           atomic.Int64 // verified both ways
	refused, reset  atomic.Int64
	other           atomic.Int64
	// during counts failures by the event they fell in (eventKinds; ""
	// for none); its keys are fixed by newTally.
	during   map[string]*atomic.Int64
	mu       sync.Mutex
	firstErr string
}

// eventKinds are the soak's events, in the order it takes them.
var eventKinds = []string{"reload", "upgrade", "restart"}

func newTally() *tally {
	t := &tally{during: map[string]*atomic.Int64{"": {}}}
	for _, k := range eventKinds {
		t.during[k] = new(atomic.Int64)
	}
	return t
}

func (t *tally) fail(err error, event string) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		t.refused.Add(1)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		t.reset.Add(1)
	default:
		t.other.Add(1)
	}
	t.during[event].Add(1)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.firstErr == "" {
		t.firstErr = fmt.Sprintf("%v (event: %q)", err, event)
	}
}

// failures returns every failure but those during the events named.
func (t *tally) failures(except ...string) int64 {
	n := t.refused.Load() + t.reset.Load() + t.other.Load()
	for _, e := range except {
		n -= t.during[e].Load()
	}
	return n
}

func TestSoak(t *testing.T) {
	if *duration <= 0 {
		t.Skip("make soak runs this (-soak.duration=30m)")
	}
	testutil.RequireRoot(t)
	c := testutil.NewNS(t, "soak-c")
	g := testutil.NewNS(t, "soak-g")
	s := testutil.NewNS(t, "soak-s")
	testutil.Veth(t, c, "c0", "10.77.1.2/24", g, "g0", "10.77.1.1/24")
	testutil.Veth(t, g, "g1", "10.77.2.1/24", s, "s0", "10.77.2.2/24")
	for _, ns := range []*topo.NS{c, s} {
		gw := "10.77.1.1"
		if ns == s {
			gw = "10.77.2.1"
		}
		if err := ns.IP("route", "add", "default", "via", gw); err != nil {
			t.Fatal(err)
		}
	}
	e2e.EchoIn(t, s, "10.77.2.2:9000")
	e2e.UDPEchoIn(t, s, "10.77.2.2:9053")

	instance := fmt.Sprintf("soak-%08x", rand.Uint32())
	vars := map[string]string{"G": g.Name, "GEN": "0"}
	opts := e2e.Options{Args: []string{"--instance", instance, "--drain-timeout", "30s"}}
	d := e2e.Start(t, "soak", e2e.Config(soakConfig, vars), opts)

	var (
		cur   atomic.Pointer[e2e.Daemon]
		event atomic.Value // the event in progress ("" none)
		// eventSeq counts the events begun; lastEvent is the latest's
		// kind: an exchange during which one began belongs to it, even
		// when it began and ended between the exchange's first and last
		// look.
		eventSeq  atomic.Int64
		lastEvent atomic.Value
		stop      = make(chan struct{})
		wg        sync.WaitGroup
		tcp       = map[string]*tally{"tc": newTally(), "userspace": newTally()}
		udp       = map[string]*tally{"tc": newTally(), "userspace": newTally()}
		events    []string
		evMu      sync.Mutex
	)
	cur.Store(d)
	event.Store("")
	lastEvent.Store("")
	// began is what an exchange notes when it starts; eventOf, when it
	// fails, names the event it fell in: the one in progress at its start
	// or its end, or one that began meanwhile.
	type began struct {
		event string
		seq   int64
	}
	begin := func() began { return began{event.Load().(string), eventSeq.Load()} }
	eventOf := func(b began) string {
		switch ev := event.Load().(string); {
		case ev != "":
			return ev
		case b.event != "":
			return b.event
		case eventSeq.Load() != b.seq:
			return lastEvent.Load().(string)
		}
		return ""
	}
	logEvent := func(format string, args ...any) {
		evMu.Lock()
		defer evMu.Unlock()
		events = append(events, time.Now().Format("15:04:05")+" "+fmt.Sprintf(format, args...))
	}

	// Traffic: per datapath, 4 TCP workers (random sizes, byte-exact both
	// ways) and 2 UDP workers.
	for dp, addr := range map[string]string{"tc": "10.77.1.1:8000", "userspace": "10.77.1.1:8001"} {
		for range 4 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					n := 64<<10 + rand.IntN(4<<20)
					b := begin()
					tcp[dp].conns.Add(1)
					if err := e2e.Exchange(t, c, addr, n, time.Minute); err != nil {
						tcp[dp].fail(err, eventOf(b))
						continue
					}
					tcp[dp].verified.Add(1)
					tcp[dp].bytes.Add(int64(2 * n))
				}
			})
		}
	}
	for dp, addr := range map[string]string{"tc": "10.77.1.1:8053", "userspace": "10.77.1.1:8054"} {
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					b := begin()
					udp[dp].conns.Add(1)
					ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
					conn, err := e2e.DialFrom(ctx, t, c, "udp", addr)
					if err == nil {
						err = peer.UDPExchange(ctx, conn, 20, 1200)
					}
					cancel()
					if err != nil {
						udp[dp].fail(err, eventOf(b))
						continue
					}
					udp[dp].verified.Add(1)
					udp[dp].bytes.Add(2 * 20 * 1200)
				}
			})
		}
	}

	// Samples of the daemon's descriptors and memory.
	type sample struct {
		at       time.Duration
		fds, rss int
	}
	var samples []sample
	start := time.Now()
	sampleNow := func() {
		dd := cur.Load()
		if !dd.Running() {
			return
		}
		samples = append(samples, sample{at: time.Since(start).Round(time.Second), fds: len(dd.OpenFDs(t)), rss: rssKiB(dd.Pid())})
	}

	nextEvent := time.Now().Add(*every)
	sampleTick := time.NewTicker(15 * time.Second)
	defer sampleTick.Stop()
	deadline := start.Add(*duration)
	for k := 0; time.Now().Before(deadline); {
		select {
		case <-sampleTick.C:
			sampleNow()
			continue
		case <-time.After(min(time.Until(nextEvent), time.Until(deadline))):
		}
		if !time.Now().Before(deadline) {
			break
		}
		kind := eventKinds[k%len(eventKinds)]
		k++
		lastEvent.Store(kind)
		eventSeq.Add(1)
		event.Store(kind)
		dd := cur.Load()
		switch kind {
		case "reload":
			vars["GEN"] = strconv.Itoa(k)
			if err := os.WriteFile(dd.Config, []byte(e2e.Config(soakConfig, vars)), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := dd.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second)
			logEvent("reload (SIGHUP)")
		case "upgrade":
			next := dd.Upgrade(t, time.Minute)
			cur.Store(next)
			logEvent("upgrade (SIGUSR2): pid %d -> %d", dd.Pid(), next.Pid())
		case "restart":
			dd.Crash(t)
			next := e2e.Start(t, "soak", e2e.Config(soakConfig, vars), opts)
			cur.Store(next)
			logEvent("crash (SIGKILL) and start: pid %d -> %d", dd.Pid(), next.Pid())
		}
		// Failures seen up to 5s after an event belong to it.
		time.Sleep(5 * time.Second)
		event.Store("")
		nextEvent = time.Now().Add(*every)
	}
	close(stop)
	wg.Wait()
	sampleNow()

	out := render(*duration, tcp, udp, events, func() []string {
		var rows []string
		for _, s := range samples {
			rows = append(rows, fmt.Sprintf("| %v | %d | %d |", s.at, s.fds, s.rss))
		}
		return rows
	}())
	t.Log("\n" + out)
	if *report != "" {
		if err := writeReport(*report, out); err != nil {
			t.Fatal(err)
		}
	}
	for dp, tl := range tcp {
		if bad := tl.failures("restart"); bad > 0 {
			t.Errorf("tcp on %s: %d connections failed outside restarts (first: %s)", dp, bad, tl.firstErr)
		}
	}
}

func rssKiB(pid int) int {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n
		}
	}
	return -1
}

func render(dur time.Duration, tcp, udp map[string]*tally, events, samples []string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# Reliability\n\nThe latest `make soak` (%v of mixed traffic; `make soak SOAK=30m` sets the length): TCP exchanges\n", dur)
	b.WriteString("of 64 KiB to 4 MiB, each SHA-256 checked both ways, and UDP exchanges of 20 datagrams, on the tc datapath and\n")
	b.WriteString("the userspace relay at once; a reload (SIGHUP), an upgrade (SIGUSR2) and a crash (SIGKILL) with a new start in turn\n")
	b.WriteString("every few minutes. A crash resets the relay's connections in flight (SO_LINGER: a cut stream never looks\n")
	b.WriteString("complete); those are counted apart. Written by `test/soak`.\n\n")
	b.WriteString("Each failure is counted where it fell: during a reload, an upgrade or a crash (from the event until 5s after it\n")
	b.WriteString("was done, and for an exchange that was under way when one began), or at none of them.\n\n")
	b.WriteString("| traffic | datapath | exchanges | verified | bytes verified | refused | reset | other failures | during a reload | during an upgrade | during a crash | at no event |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, kind := range []struct {
		name string
		m    map[string]*tally
	}{{"tcp", tcp}, {"udp", udp}} {
		for _, dp := range []string{"tc", "userspace"} {
			tl := kind.m[dp]
			fmt.Fprintf(&b, "| %s | %s | %d | %d | %d MiB | %d | %d | %d | %d | %d | %d | %d |\n", kind.name, dp, tl.conns.Load(), tl.verified.Load(),
				tl.bytes.Load()>>20, tl.refused.Load(), tl.reset.Load(), tl.other.Load(),
				tl.during["reload"].Load(), tl.during["upgrade"].Load(), tl.during["restart"].Load(), tl.during[""].Load())
		}
	}
	b.WriteString("\nA UDP exchange that loses a datagram (UDP may) retries it; one that still fails counts as a failure.\n\n## Events\n\n")
	for _, e := range events {
		b.WriteString("- " + e + "\n")
	}
	b.WriteString("\n## The daemon's descriptors and memory\n\n| since start | open fds | VmRSS KiB |\n|---|---|---|\n")
	for _, s := range samples {
		b.WriteString(s + "\n")
	}
	return b.String()
}

// keptSection starts the part of the report file the soak does not write
// (the fault matrix, kept by hand): a new report replaces what comes
// before it and keeps it.
const keptSection = "\n## Fault matrix\n"

// writeReport writes out to path in place of the previous soak report,
// keeping the file's hand-kept sections.
func writeReport(path, out string) error {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if i := strings.Index(string(old), keptSection); i >= 0 {
		out = strings.TrimRight(out, "\n") + "\n" + string(old[i:])
	}
	if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
