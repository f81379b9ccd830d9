package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
)

// healthSyncInterval is how soon a change of a node's marking (a failure,
// or failTimeout running out) reaches a datapath that picks nodes itself.
const healthSyncInterval = 500 * time.Millisecond

// syncNodeHealth mirrors the selector's marking into the attachment until
// ctx is done. Polling, because failTimeout running out is no event.
func (s *service) syncNodeHealth(ctx context.Context, hs datapath.NodeHealthSetter) {
	nodes := s.nodes.Nodes()
	pushed := make([]bool, len(nodes))
	for i := range pushed {
		pushed[i] = true // Setup puts every node in healthy
	}
	t := time.NewTicker(healthSyncInterval)
	defer t.Stop()
	for {
		for i, n := range nodes {
			healthy := s.nodes.Healthy(n)
			if healthy == pushed[i] {
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

// Active probing of nodes for datapaths that pick nodes themselves (tc):
// connections the kernel carries never tell the daemon that a node is
// down, so without probes a dead node would keep getting its share of new
// flows until a listener connection happened to fail on it.
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
