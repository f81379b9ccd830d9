package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// nsPrefix starts the name of every namespace the benchmark creates, so
// that a crashed run's leftovers can be recognised and swept.
const nsPrefix = "ebpfwd-bench-"

// Addresses of the benchmark topology:
//
//	client 10.10.1.2 ── 10.10.1.1 gateway 10.10.2.1 ── 10.10.2.2 server 10.10.3.2 ── 10.10.3.1 out
//	                                                                        control (lo only)
//
// The gateway routes between client and server (ip_forward=1). "out" is a
// second way into the server: the cross-namespace ebpfwd runs in "control",
// listens in the gateway and dials the server from "out", so its upstream
// traffic really leaves through a namespace other than the one it accepts in.
const (
	clientIP    = "10.10.1.2"
	gatewayIP   = "10.10.1.1" // the gateway's client-facing address: where forwarders listen
	gatewaySide = "10.10.2.1" // the gateway's server-facing address
	serverIP    = "10.10.2.2"
	serverOutIP = "10.10.3.2" // the server as seen from the "out" namespace
	outIP       = "10.10.3.1"
)

// topology is one set of namespaces built for one contender run. Each run
// gets a fresh one, so no state (conntrack entries, TIME_WAIT sockets, a
// NAT table) leaks from one contender into the next.
type topology struct {
	client, gateway, server, out, control *topo.NS
	all                                   []*topo.NS
}

// buildTopology creates the namespaces and links. On error it removes what
// it created.
func buildTopology() (t *topology, err error) {
	id, err := randomID()
	if err != nil {
		return nil, err
	}
	t = &topology{}
	defer func() {
		if err != nil {
			t.teardown()
		}
	}()
	for _, ns := range []struct {
		role string
		dst  **topo.NS
	}{
		{"client", &t.client}, {"gw", &t.gateway}, {"server", &t.server}, {"out", &t.out}, {"ctl", &t.control},
	} {
		n, err := topo.Create(nsPrefix + id + "-" + ns.role)
		if err != nil {
			return nil, err
		}
		*ns.dst = n
		t.all = append(t.all, n)
	}
	links := []struct {
		a        *topo.NS
		aDev, aC string
		b        *topo.NS
		bDev, bC string
	}{
		{t.client, "c0", clientIP + "/24", t.gateway, "g0", gatewayIP + "/24"},
		{t.gateway, "g1", gatewaySide + "/24", t.server, "s0", serverIP + "/24"},
		{t.server, "s1", serverOutIP + "/24", t.out, "o0", outIP + "/24"},
	}
	for _, l := range links {
		if err := topo.Veth(l.a, l.aDev, l.aC, l.b, l.bDev, l.bC); err != nil {
			return nil, err
		}
	}
	if err := t.client.AddRoute("10.10.2.0/24", gatewayIP); err != nil {
		return nil, err
	}
	if err := t.server.AddRoute("10.10.1.0/24", gatewaySide); err != nil {
		return nil, err
	}
	if err := t.gateway.EnableForwarding(); err != nil {
		return nil, err
	}
	// Every namespace that opens connections gets the whole ephemeral port
	// range and TIME_WAIT reuse: the connection-rate workload opens tens of
	// thousands of connections in seconds, and running out of ports would
	// measure the port range instead of the path.
	for _, ns := range []*topo.NS{t.client, t.out} {
		if err := sysctl(ns, "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"); err != nil {
			return nil, err
		}
	}
	// The gateway's own connections (the userspace relay's dials) stay above
	// the tc datapath's SNAT ports (1024-32767), which its translated flows
	// use towards the same server; the server closes first, so the
	// gateway's side holds no TIME_WAIT and half the range is plenty.
	if err := sysctl(t.gateway, "net.ipv4.ip_local_port_range=32768 65535", "net.ipv4.tcp_tw_reuse=1"); err != nil {
		return nil, err
	}
	return t, nil
}

// teardown deletes every namespace; their veth links go with them.
func (t *topology) teardown() {
	for i := len(t.all) - 1; i >= 0; i-- {
		if err := t.all[i].Delete(); err != nil {
			slog.Error("remove namespace", "ns", t.all[i].Name, "err", err)
		}
	}
	t.all = nil
}

// sysctl sets per-namespace sysctls from inside ns.
func sysctl(ns *topo.NS, settings ...string) error {
	for _, s := range settings {
		if err := runIn(context.Background(), ns, "sysctl", "-q", "-w", s); err != nil {
			return fmt.Errorf("sysctl %s in namespace %s: %w", s, ns.Name, err)
		}
	}
	return nil
}

// inNS builds a command that runs inside ns. nsenter only switches the
// network namespace and then execs, so the command keeps the host's mounts
// and its PID is the program's own (which CPU and RSS accounting rely on).
func inNS(ctx context.Context, ns *topo.NS, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + ns.Path(), name}, args...)...)
}

// runIn runs a short command inside ns and returns its output in the error.
func runIn(ctx context.Context, ns *topo.NS, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := inNS(ctx, ns, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s in namespace %s: %w: %s", name, strings.Join(args, " "), ns.Name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// readIn returns the trimmed output of a short command run inside ns.
func readIn(ctx context.Context, ns *topo.NS, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := inNS(ctx, ns, name, args...).Output()
	if err != nil {
		return "", fmt.Errorf("%s %s in namespace %s: %w", name, strings.Join(args, " "), ns.Name, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// sweepStale removes namespaces a crashed earlier run left behind. A
// namespace that still has processes in it may belong to a run going on
// right now, so it is left alone and reported instead.
func sweepStale() {
	entries, err := os.ReadDir("/var/run/netns")
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			slog.Warn("cannot list namespaces for the stale sweep", "err", err)
		}
		return
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), nsPrefix) {
			continue
		}
		out, err := exec.Command("ip", "netns", "pids", e.Name()).Output()
		if err != nil {
			slog.Warn("cannot check stale namespace", "ns", e.Name(), "err", err)
			continue
		}
		if pids := strings.Fields(string(out)); len(pids) > 0 {
			slog.Warn("namespace from another benchmark run still has processes; leaving it",
				"ns", e.Name(), "pids", strings.Join(pids, ","), "remove_with", "ip netns del "+e.Name())
			continue
		}
		ns := &topo.NS{Name: e.Name()}
		if err := ns.Delete(); err != nil {
			slog.Warn("remove stale namespace", "ns", e.Name(), "err", err)
			continue
		}
		slog.Info("removed stale namespace from an earlier run", "ns", e.Name())
	}
}

func randomID() (string, error) {
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random namespace suffix: %w", err)
	}
	return hex.EncodeToString(b), nil
}
