package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
)

// healthSyncInterval is how soon a change of a node's marking (a failure,
// or failTimeout running out) reaches a datapath that picks nodes itself.
const healthSyncInterval = 500 * time.Millisecond

// syncNodeHealth mirrors the selector's marking into the attachment until
// ctx is done, first feeding it what judge (nil: none) saw of the nodes'
// flows. Polling, because failTimeout running out is no event.
func (s *service) syncNodeHealth(ctx context.Context, hs datapath.NodeHealthSetter, judge datapath.PassiveHealthReporter) {
	nodes := s.nodes.Nodes()
	pushed := make([]bool, len(nodes))
	for i := range pushed {
		pushed[i] = true // Setup puts every node in healthy
	}
	var seen []datapath.NodeOutcomes // the judge's counts at the last look
	if judge != nil {
		// What the program counted before (a previous form of the
		// service, a previous run) is not news: it is the baseline.
		var err error
		if seen, err = judge.NodeOutcomes(); err != nil {
			s.log.Warn("read node outcomes from datapath", "err", err)
		}
	}
	t := time.NewTicker(healthSyncInterval)
	defer t.Stop()
	for {
		if judge != nil {
			if now, err := judge.NodeOutcomes(); err != nil {
				s.log.Warn("read node outcomes from datapath", "err", err)
			} else {
				if len(seen) == len(now) && len(now) == len(nodes) {
					for i, n := range nodes {
						s.markPassive(n, seen[i], now[i])
					}
				}
				seen = now
			}
		}
		for i, n := range nodes {
			healthy := s.nodes.Healthy(n)
			// The datapath took a node out on its own (a run of
			// maxFails failures) that the marking holds alive: a
			// failure it saw slipped past the counts (read between
			// them). Pushing healthy puts it back one failure short.
			stale := healthy && pushed[i] && len(seen) == len(nodes) && seen[i].Streak >= uint64(s.nodes.MaxFails())
			if healthy == pushed[i] && !stale {
				continue
			}
			if err := hs.SetNodeHealthy(i, healthy); err != nil {
				s.log.Warn("update node health in datapath", "node", n.Name, "healthy", healthy, "err", err)
				continue
			}
			pushed[i] = healthy
			s.log.Info("node health pushed to datapath", "node", n.Name, "healthy", healthy)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// markPassive feeds the selector what a datapath saw of node n's new flows
// between two looks (was, now): GOST's marking counts failures in a row and
// clears them on a success. The order of events between two looks is lost;
// the node's current streak tells how many failures came after the last
// success, so a node that answered and then failed is marked failed, and
// one that failed and then answered is clear.
func (s *service) markPassive(n *selector.Node[string], was, now datapath.NodeOutcomes) {
	answered := since(was.Answered, now.Answered)
	failed := make(map[string]uint64, len(now.Failed))
	var failures uint64
	for reason, v := range now.Failed {
		failed[reason] = since(was.Failed[reason], v)
		failures += failed[reason]
	}
	if answered == 0 && failures == 0 {
		return
	}
	trailing := failures
	if answered > 0 {
		s.nodes.MarkOK(n)
		trailing = min(failures, now.Streak)
	}
	if trailing == 0 {
		return
	}
	wasHealthy := s.nodes.Healthy(n)
	// Failures beyond maxFails change nothing the marking keeps.
	for range min(trailing, uint64(s.nodes.MaxFails())) {
		s.nodes.MarkFailed(n)
	}
	attrs := []any{"node", n.Name, "addr", n.Value, datapath.FailRefused, failed[datapath.FailRefused],
		datapath.FailUnreachable, failed[datapath.FailUnreachable], datapath.FailSYNTimeout, failed[datapath.FailSYNTimeout],
		"answered", answered}
	if wasHealthy && !s.nodes.Healthy(n) {
		s.log.Warn("node marked failed by its flows", attrs...)
	} else {
		s.log.Debug("node failed flows", attrs...)
	}
}

// since is how much a counter grew from was to now; a counter that went
// down started over (its node was replaced at the index), so all of now is
// new.
func since(was, now uint64) uint64 {
	if now < was {
		return now
	}
	return now - was
}

// Active probing of nodes for datapaths that pick nodes themselves (tc),
// with healthCheck: probe: for nodes that fail in ways their flows do not
// show the program (a node that accepts and then hangs).
const (
	// probeInterval is how often every node is probed; with maxFails 1 a
	// dead node stops getting new flows within about this long.
	probeInterval = 2 * time.Second
	// probeTimeout bounds one probe: a node slower than this to accept a
	// connection counts as failing.
	probeTimeout = 2 * time.Second
)

// probeNodes probes every forward node each probeInterval (probeNode) and
// feeds the result into the selector's marking, from where syncNodeHealth
// mirrors it into the datapath.
func (s *service) probeNodes(ctx context.Context, network string) {
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		for _, n := range s.nodes.Nodes() {
			pctx, cancel := context.WithTimeout(ctx, probeTimeout)
			err := probeNode(pctx, s.outNS, network, n.Value)
			cancel()
			switch {
			case ctx.Err() != nil:
				return
			case err != nil && !probeFault(err):
				// This host's trouble, not the node's: the node keeps
				// its marking.
				s.log.Warn("node probe could not run", "node", n.Name, "reason", reasonOf(err), "err", err)
			case err != nil:
				if s.nodes.Healthy(n) {
					s.log.Warn("node probe failed", "node", n.Name, "addr", n.Value, "network", network, "err", err)
				}
				// A probe is no connection of the service: it counts in
				// the node's marking, not in the service's errors.
				s.nodes.MarkFailed(n)
			default:
				s.nodes.MarkOK(n)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// probeFault reports whether a failed probe marks its node down. As for
// a dial (nodesFault), the host's own trouble does not; a netns.out that
// is gone does, unlike for a dial: the kernel keeps sending new flows to
// every node it holds healthy, and with the namespace (and the splice
// link into it) gone those flows vanish, so clients hang until their
// connect times out. With its nodes down the program passes new flows to
// the stack, where the listener's dial fails the same way and closes the
// client at once, as the userspace datapath does; once the namespace is
// back, the next probe marks the node up again.
func probeFault(err error) bool {
	return nodesFault(err) || reasonOf(err) == ReasonNetnsGone
}

// udpProbeWait is how long a UDP probe waits for the ICMP error that says
// the node is not there. Such errors come back within a round trip; a node
// that stays silent for longer may well be serving (UDP servers do not
// answer an empty datagram), so silence counts as healthy.
const udpProbeWait = 250 * time.Millisecond

// probeNode checks that a node takes connections from dialer ns. TCP: a
// connect, closed at once. UDP has no handshake: an empty datagram is sent
// on a connected socket, and an ICMP port or host unreachable coming back
// (ECONNREFUSED, EHOSTUNREACH on the next read) marks the node down; an
// answer or silence leaves it up. The empty datagram is the least a
// service can be sent: a DNS or syslog server drops it as malformed.
func probeNode(ctx context.Context, ns netns.NS, network, addr string) error {
	conn, err := ns.Dial(ctx, network, addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if network != "udp" {
		return nil
	}
	if _, err := conn.Write(nil); err != nil {
		return fmt.Errorf("probe %s: send: %w", addr, err)
	}
	wait := time.Now().Add(udpProbeWait)
	if d, ok := ctx.Deadline(); ok && d.Before(wait) {
		wait = d
	}
	_ = conn.SetReadDeadline(wait)
	_, err = conn.Read(make([]byte, 1))
	var nerr net.Error
	if err == nil || errors.As(err, &nerr) && nerr.Timeout() {
		return nil
	}
	return fmt.Errorf("probe %s: %w", addr, err)
}
