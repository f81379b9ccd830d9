package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/loader"
)

// contender is one way of getting the client's traffic to the server.
type contender struct {
	name string
	// datapath is the ebpfwd datapath under test; "" for the kernel's own
	// paths. Targets are matched against it.
	datapath datapath.Kind
	// start readies the path on a fresh topology.
	start func(ctx context.Context, e *runEnv) (*path, error)
	// rival is the HAProxy contender of the same form, the one this
	// contender's figures are read beside and its HAProxy targets taken
	// against; "" for none.
	rival string
	// needsHAProxy: the contender is HAProxy itself and is left out where
	// haproxy is not installed.
	needsHAProxy bool
}

// path is a started contender.
type path struct {
	front   string     // address the client dials; the ports are the server's
	daemons []*process // forwarder processes (ebpfwd, HAProxy) whose CPU and memory are charged to the path
	// capacity says what bounds the number of concurrent flows, given the
	// descriptors per flow the idle-connection workload observed.
	capacity func(ctx context.Context, fdsPerFlow float64) string
	// kernelFlows: the flows never reach the daemons' sockets (tc), so
	// their idle connections cost the daemons nothing to wait for.
	kernelFlows bool
}

// stop stops the daemons; the topology's teardown removes the rest.
func (p *path) stop() error {
	var errs []error
	for i := len(p.daemons) - 1; i >= 0; i-- {
		errs = append(errs, p.daemons[i].stop())
	}
	return errors.Join(errs...)
}

// ebpfwdDatapath is a datapath ebpfwd has, with what it supports.
type ebpfwdDatapath struct {
	kind datapath.Kind
	// chains: the datapath can carry a service that dials through an HTTP
	// CONNECT hop.
	chains bool
	// gatewayOnly: the datapath has no cross-namespace contender.
	gatewayOnly bool
	// widePorts: the datapath translates ports in the gateway namespace,
	// so it gets a second gateway contender whose gateway has the
	// ip_local_port_range of a busy gateway (widePortRange), which
	// overlaps the SNAT ports: the figures must not depend on it.
	widePorts bool
	// vsHAProxy: the datapath is a userspace relay, so its gateway and
	// cross-namespace contenders each get an HAProxy column of the same
	// form beside them. At most one datapath sets it: the HAProxy columns
	// exist once.
	vsHAProxy bool
}

// ebpfwdDatapaths are the datapaths benchmarked. Adding one (tc, sockmap)
// is one line here: it then gets the gateway, cross-namespace and (if it
// chains) hop contenders and is checked against its targets.
var ebpfwdDatapaths = []ebpfwdDatapath{
	// tc's cross-namespace form is not benchmarked: across a splice link
	// only nodes in netns.out itself get replies back, and the benchmark's
	// server is one hop beyond it (docs/DATAPATHS.md).
	{kind: datapath.TC, gatewayOnly: true, widePorts: true},
	{kind: datapath.Userspace, chains: true, vsHAProxy: true},
}

// contenders lists every contender in the order of the table's columns;
// the direct path comes first because every ratio is taken against it.
func contenders() []contender {
	cs := []contender{
		{name: "direct (kernel routing)", start: startDirect},
		{name: "iptables DNAT+SNAT", start: startIptables},
	}
	// HAProxy's columns follow the ebpfwd column of their form, so each
	// figure of the relay sits next to HAProxy's.
	haproxy := contender{name: haproxyName, start: startHAProxyGateway, needsHAProxy: true}
	haproxyCrossNS := contender{name: haproxyCrossNSName, start: startHAProxyCrossNS, needsHAProxy: true}
	for _, dp := range ebpfwdDatapaths {
		kind := dp.kind
		// add appends c, and HAProxy's column of c's form after it.
		add := func(c, rival contender) {
			if !dp.vsHAProxy {
				cs = append(cs, c)
				return
			}
			c.rival = rival.name
			cs = append(cs, c, rival)
		}
		add(contender{name: "ebpfwd " + string(kind), datapath: kind,
			start: func(ctx context.Context, e *runEnv) (*path, error) { return startGatewayDaemon(ctx, e, kind) }}, haproxy)
		if dp.widePorts {
			add(contender{name: "ebpfwd " + string(kind) + " (gw ports " + strings.ReplaceAll(widePortRange, " ", "-") + ")", datapath: kind,
				start: func(ctx context.Context, e *runEnv) (*path, error) {
					if err := sysctl(e.topo.gateway, "net.ipv4.ip_local_port_range="+widePortRange); err != nil {
						return nil, err
					}
					return startGatewayDaemon(ctx, e, kind)
				}}, haproxy)
		}
		if !dp.gatewayOnly {
			add(contender{name: "ebpfwd " + string(kind) + " cross-ns", datapath: kind,
				start: func(ctx context.Context, e *runEnv) (*path, error) { return startCrossNSDaemon(ctx, e, kind) }}, haproxyCrossNS)
		}
		if dp.chains {
			cs = append(cs, contender{name: "ebpfwd " + string(kind) + " + HTTP hop", datapath: kind,
				start: func(ctx context.Context, e *runEnv) (*path, error) { return startChainedDaemon(ctx, e, kind) }})
		}
	}
	return cs
}

// instancePrefix is where the instance names of a contender's daemons
// start: "bench-" and the contender's name in lower case with every run of
// other characters made one '-' ("ebpfwd userspace + HTTP hop" →
// "bench-ebpfwd-userspace-http-hop"). Contender names differ in letters
// and digits, so the prefixes differ too (a test checks it).
func instancePrefix(contenderName string) string {
	var b strings.Builder
	b.WriteString("bench")
	dash := true
	for _, r := range strings.ToLower(contenderName) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			if dash {
				b.WriteByte('-')
				dash = false
			}
			b.WriteRune(r)
			continue
		}
		dash = true
	}
	return b.String()
}

// widePortRange is the ip_local_port_range busy gateways are tuned to
// (and the side-by-side harness used): it overlaps the tc
// datapath's SNAT ports (1024-32767), which ebpfwd then reserves.
const widePortRange = "1024 65000"

// directName is the column every ratio is taken against.
const directName = "direct (kernel routing)"

// iptablesName is the baseline of tc's connection-rate target.
const iptablesName = "iptables DNAT+SNAT"

// startDirect: the client talks to the server's own address and the
// gateway routes. The ceiling: nothing but forwarding in between.
func startDirect(context.Context, *runEnv) (*path, error) {
	return &path{front: serverIP, capacity: func(context.Context, float64) string {
		return "no per-flow state (plain routing)"
	}}, nil
}

// startIptables: DNAT the gateway's address to the server and SNAT to the
// gateway's server-side address, as a port forward on a router is set up.
func startIptables(ctx context.Context, e *runEnv) (*path, error) {
	gw := e.topo.gateway
	ports := make([]string, len(allPorts))
	for i, p := range allPorts {
		ports[i] = strconv.Itoa(p)
	}
	rules := [][]string{
		{"-t", "nat", "-A", "PREROUTING", "-d", gatewayIP, "-p", "tcp", "-m", "multiport",
			"--dports", strings.Join(ports, ","), "-j", "DNAT", "--to-destination", serverIP},
		{"-t", "nat", "-A", "POSTROUTING", "-o", "g1", "-d", serverIP, "-p", "tcp", "-j", "SNAT", "--to-source", gatewaySide},
	}
	for _, r := range rules {
		if err := runIn(ctx, gw, "iptables", r...); err != nil {
			return nil, fmt.Errorf("iptables rule: %w", err)
		}
	}
	return &path{front: gatewayIP, capacity: func(ctx context.Context, _ float64) string {
		maxEntries, err := readIn(ctx, gw, "cat", "/proc/sys/net/netfilter/nf_conntrack_max")
		if err != nil {
			return "nf_conntrack_max unreadable: " + err.Error()
		}
		count, err := readIn(ctx, gw, "cat", "/proc/sys/net/netfilter/nf_conntrack_count")
		if err != nil {
			count = "?"
		}
		return fmt.Sprintf("nf_conntrack_max %s (gateway ns; %s entries in use at the end)", maxEntries, count)
	}}, nil
}

// serviceSpec is one forwarding service of a generated ebpfwd config.
type serviceSpec struct {
	listenNS, outNS string // "" = the daemon's own namespace
	target          string // host the server is reached at
	chain           string // "" = dial directly
}

// forwardConfig writes one tcp service per benchmark port. The daemon
// gets no log section: the benchmark measures the defaults.
func forwardConfig(kind datapath.Kind, s serviceSpec) string {
	var b strings.Builder
	b.WriteString("services:\n")
	for _, port := range allPorts {
		fmt.Fprintf(&b, "- name: bench-%d\n  addr: %q\n", port, hostPort(gatewayIP, port))
		if s.chain != "" {
			fmt.Fprintf(&b, "  handler: {type: tcp, chain: %s}\n", s.chain)
		} else {
			b.WriteString("  handler: {type: tcp}\n")
		}
		b.WriteString("  listener: {type: tcp}\n")
		fmt.Fprintf(&b, "  forwarder:\n    nodes:\n    - {name: server, addr: %q}\n", hostPort(s.target, port))
		fmt.Fprintf(&b, "  metadata:\n    datapath: %s\n", kind)
		if s.listenNS != "" {
			fmt.Fprintf(&b, "    netns: %s\n", s.listenNS)
		}
		if s.outNS != "" {
			fmt.Fprintf(&b, "    netns.out: %s\n", s.outNS)
		}
	}
	return b.String()
}

// hopAddr is where the chain's hop proxy listens: the gateway's
// server-facing side, so the client cannot reach it directly.
var hopAddr = hostPort(gatewaySide, 8080)

const hopProxyConfig = `services:
- name: hop-proxy
  addr: "%s"
  handler: {type: http, auth: {username: bench, password: bench}}
  listener: {type: tcp}
`

const chainConfig = `chains:
- name: bench-chain
  hops:
  - name: hop-0
    nodes:
    - name: hop-proxy
      addr: "%s"
      connector: {type: http, auth: {username: bench, password: bench}}
      dialer: {type: tcp}
`

// startGatewayDaemon: ebpfwd lives in the gateway namespace, like a
// port-forwarding router would run it.
func startGatewayDaemon(ctx context.Context, e *runEnv, kind datapath.Kind) (*path, error) {
	cfg := forwardConfig(kind, serviceSpec{target: serverIP})
	d, err := startDaemon(ctx, e.topo.gateway, e, "gateway", cfg)
	if err != nil {
		return nil, err
	}
	if kind == datapath.TC {
		return kernelPath(d), nil
	}
	return daemonPath(d), nil
}

// kernelPath is a daemon whose flows live in the kernel (tc): capacity is
// the conntrack maps', and idle flows hold nothing in the daemon.
func kernelPath(d *process) *path {
	return &path{front: gatewayIP, daemons: []*process{d}, kernelFlows: true,
		capacity: func(context.Context, float64) string {
			return fmt.Sprintf("conntrack maps: %d flows (LRU)", loader.FlowCapacity)
		}}
}

// startCrossNSDaemon: ebpfwd lives in a control namespace of its own,
// listens in the gateway namespace and dials the server from "out", a
// namespace the gateway has no route through. Both of its sockets of every
// stream are made in namespaces it does not run in.
func startCrossNSDaemon(ctx context.Context, e *runEnv, kind datapath.Kind) (*path, error) {
	cfg := forwardConfig(kind, serviceSpec{listenNS: e.topo.gateway.Name, outNS: e.topo.out.Name, target: serverOutIP})
	d, err := startDaemon(ctx, e.topo.control, e, "cross-ns", cfg)
	if err != nil {
		return nil, err
	}
	return daemonPath(d), nil
}

// startChainedDaemon: the gateway's ebpfwd reaches the server through a
// one-hop chain whose hop is a second ebpfwd running the `http` proxy
// handler. Both daemons are charged to the path.
func startChainedDaemon(ctx context.Context, e *runEnv, kind datapath.Kind) (*path, error) {
	hop, err := startDaemon(ctx, e.topo.gateway, e, "hop-proxy", fmt.Sprintf(hopProxyConfig, hopAddr))
	if err != nil {
		return nil, err
	}
	cfg := forwardConfig(kind, serviceSpec{target: serverIP, chain: "bench-chain"}) + fmt.Sprintf(chainConfig, hopAddr)
	d, err := startDaemon(ctx, e.topo.gateway, e, "chained", cfg)
	if err != nil {
		_ = hop.stop()
		return nil, err
	}
	p := daemonPath(hop, d)
	return p, nil
}

// daemonPath describes a path made of ebpfwd daemons. What bounds the
// flows a daemon holds is its fd budget: RLIMIT_NOFILE, less a reserve,
// divided by the descriptors the budget counts per stream (the worst
// case; the idle-connection workload shows what an idle one holds).
func daemonPath(daemons ...*process) *path {
	return &path{front: gatewayIP, daemons: daemons, capacity: func(_ context.Context, fdsPerFlow float64) string {
		limit := int64(-1)
		for _, d := range daemons {
			l, err := openFileLimit(d.pid())
			if err != nil {
				return err.Error()
			}
			if l >= 0 && (limit < 0 || l < limit) {
				limit = l
			}
		}
		return daemonCapacity(limit, fdsPerFlow)
	}}
}

// daemonCapacity words the flow bound of a daemon with the open-file limit
// limit (-1: unlimited).
func daemonCapacity(limit int64, fdsPerFlow float64) string {
	switch {
	case limit < 0:
		return "no limit configured; RLIMIT_NOFILE unlimited"
	case fdsPerFlow <= 0:
		return fmt.Sprintf("fd budget: one service's guarantee and the shared half of RLIMIT_NOFILE %d less its reserve, %d fds per stream ≈ %d flows (descriptors per idle flow not measured)",
			limit, budgetFDsPerStream, budgetFlows(limit))
	default:
		return fmt.Sprintf("fd budget: one service's guarantee and the shared half of RLIMIT_NOFILE %d less its reserve, %d fds per stream ≈ %d flows (%.1f held per idle flow)",
			limit, budgetFDsPerStream, budgetFlows(limit), fdsPerFlow)
	}
}

// budgetFlows is at least how many streams the idle service of a daemon
// can hold under limit (daemon/budget.go): its guarantee, an even part of
// half the pool between the daemon's len(allPorts) services, and the whole
// shared half, when the other services hold nothing. The reserve bounds
// the pool from below.
func budgetFlows(limit int64) int64 {
	pool := max(limit-budgetReserve, 0)
	half := pool / 2
	return (half/int64(len(allPorts)) + half) / budgetFDsPerStream
}
