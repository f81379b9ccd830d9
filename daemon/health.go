package daemon

import (
	"context"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
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

// probeNodes dials every forward node (a TCP connect, closed at once)
// each probeInterval and feeds the result into the selector's marking,
// from where syncNodeHealth mirrors it into the datapath.
func (s *service) probeNodes(ctx context.Context) {
	t := time.NewTicker(probeInterval)
	defer t.Stop()
	for {
		for _, n := range s.nodes.Nodes() {
			pctx, cancel := context.WithTimeout(ctx, probeTimeout)
			conn, err := s.outNS.Dial(pctx, "tcp", n.Value)
			cancel()
			switch {
			case ctx.Err() != nil:
				return
			case err != nil:
				if s.nodes.Healthy(n) {
					s.log.Warn("node probe failed", "node", n.Name, "addr", n.Value, "err", err)
				}
				s.errs.Add(reasonOf(err))
				s.nodes.MarkFailed(n)
			default:
				conn.Close()
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
