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
