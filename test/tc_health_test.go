package test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestTCDeadNodeGetsNoFlows: with probes on (healthCheck: probe) and one
// of two nodes down, the kernel must stop sending new flows to it once a
// probe has marked it, so every connection (TCP) or session (UDP)
// succeeds, the first included. Without probes, round robin would send
// flows to the dead node until they failed there.
func TestTCDeadNodeGetsNoFlows(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-tch-c")
	gw := testutil.NewNS(t, "e2e-tch-g")
	server := testutil.NewNS(t, "e2e-tch-s")
	testutil.Veth(t, client, "c0", "10.35.1.2/24", gw, "g0", "10.35.1.1/24")
	testutil.Veth(t, gw, "g1", "10.35.2.1/24", server, "s0", "10.35.2.2/24")
	// Nothing listens on :9001 (TCP) or :9011 (UDP).
	e2e.EchoIn(t, server, "10.35.2.2:9000")
	e2e.UDPEchoIn(t, server, "10.35.2.2:9010")
	yaml := e2e.Config(`services:
- name: tc-two-nodes
  addr: "10.35.1.1:8000"
  handler: {type: tcp}
  forwarder:
    selector: {strategy: round, maxFails: 1, failTimeout: 1m}
    nodes:
    - {name: dead, addr: "10.35.2.2:9001"}
    - {name: live, addr: "10.35.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc, healthCheck: probe}
- name: tc-two-udp-nodes
  addr: "10.35.1.1:8010"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}} # tc keeps a flow: sessions kept alive
  forwarder:
    selector: {strategy: round, maxFails: 1, failTimeout: 1m}
    nodes:
    - {name: dead-udp, addr: "10.35.2.2:9011"}
    - {name: live-udp, addr: "10.35.2.2:9010"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc, healthCheck: probe}
`, map[string]string{"GW": gw.Name})
	d := e2e.Start(t, "tc-health", yaml, e2e.Options{})

	const flows = 20
	for _, tt := range []struct {
		network, deadNode, addr string
		flow                    func() error
	}{
		{"tcp", "dead", "10.35.1.1:8000", func() error {
			return e2e.Exchange(t, client, "10.35.1.1:8000", 32<<10, 15*time.Second)
		}},
		{"udp", "dead-udp", "10.35.1.1:8010", func() error {
			// A session is one client socket: it sticks to the node
			// its first datagram was given.
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			defer cancel()
			c, err := e2e.DialFrom(ctx, t, client, "udp", "10.35.1.1:8010")
			if err != nil {
				return err
			}
			defer c.Close()
			return peer.UDPExchange(ctx, c, 4, 512)
		}},
	} {
		t.Run(tt.network, func(t *testing.T) {
			d.WaitLog(t, 10*time.Second, "node health pushed to datapath", "node="+tt.deadNode+" healthy=false")
			var wg sync.WaitGroup
			errs := make(chan error, flows)
			for i := range flows {
				wg.Go(func() {
					if err := tt.flow(); err != nil {
						errs <- fmt.Errorf("%s flow %d: %w", tt.network, i, err)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}
