package test

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestTCDeadNodeGetsNoFlows: with one of two nodes down, the kernel must
// stop sending new flows to it once a probe has marked it, so every
// connection succeeds. Without probes, round robin would send every other
// flow to the dead node and those connections would be refused.
func TestTCDeadNodeGetsNoFlows(t *testing.T) {
	requireRoot(t)
	t.Parallel()
	client := newNS(t, "e2e-tch-c")
	gw := newNS(t, "e2e-tch-g")
	server := newNS(t, "e2e-tch-s")
	veth(t, client, "c0", "10.35.1.2/24", gw, "g0", "10.35.1.1/24")
	veth(t, gw, "g1", "10.35.2.1/24", server, "s0", "10.35.2.2/24")
	echoIn(t, server, "10.35.2.2:9000") // nothing listens on :9001
	yaml := config(`services:
- name: tc-two-nodes
  addr: "10.35.1.1:8000"
  handler: {type: tcp}
  forwarder:
    selector: {strategy: round, maxFails: 1, failTimeout: 1m}
    nodes:
    - {name: dead, addr: "10.35.2.2:9001"}
    - {name: live, addr: "10.35.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`, map[string]string{"GW": gw.Name})
	d := startDaemon(t, "tc-health", yaml, daemonOptions{})
	d.waitLog(t, 10*time.Second, "node health pushed to datapath", "node=dead", "healthy=false")

	const conns = 20
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		wg.Go(func() {
			if err := exchange(t, client, "10.35.1.1:8000", 32<<10, 15*time.Second); err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
