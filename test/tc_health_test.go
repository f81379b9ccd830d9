package test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"
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

// TestTCPassiveHealth: with passive health (the default), a node whose
// listener closes under a stream of new connections refuses at most
// maxFails of them before the program stops choosing it, and no node ever
// sees a connection that no client made: every connection a node accepted
// carried a client's bytes. A UDP node that goes away costs no session:
// its ICMP port unreachable takes it out and the client's resent datagram
// finds the other node. A service with healthCheck: probe beside them
// shows that the nodes' counters would see probes.
func TestTCPassiveHealth(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-tcp-c")
	gw := testutil.NewNS(t, "e2e-tcp-g")
	server := testutil.NewNS(t, "e2e-tcp-s")
	testutil.Veth(t, client, "c0", "10.53.1.2/24", gw, "g0", "10.53.1.1/24")
	testutil.Veth(t, gw, "g1", "10.53.2.1/24", server, "s0", "10.53.2.2/24")
	listen := func(network, addr string) (*e2e.AcceptLog, func()) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv := e2e.Handle(t, server)
		if network == "udp" {
			pc, err := srv.ListenPacket(ctx, "udp", addr)
			if err != nil {
				t.Fatal(err)
			}
			stop := peer.ServeUDPEcho(pc)
			t.Cleanup(stop)
			return nil, stop
		}
		ln, err := srv.Listen(ctx, "tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		al := &e2e.AcceptLog{Listener: ln}
		stop := peer.ServeEcho(al)
		t.Cleanup(stop)
		return al, stop
	}
	live, _ := listen("tcp", "10.53.2.2:9000")
	doomed, killTCP := listen("tcp", "10.53.2.2:9001")
	probed, _ := listen("tcp", "10.53.2.2:9002")
	listen("udp", "10.53.2.2:9010")
	_, killUDP := listen("udp", "10.53.2.2:9011")
	const maxFails = 2
	d := e2e.Start(t, "tc-passive", e2e.Config(`services:
- name: passive-tcp
  addr: "10.53.1.1:8000"
  handler: {type: tcp}
  forwarder:
    selector: {strategy: round, maxFails: $MAXFAILS, failTimeout: 10m}
    nodes:
    - {name: live, addr: "10.53.2.2:9000"}
    - {name: doomed, addr: "10.53.2.2:9001"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: passive-udp
  addr: "10.53.1.1:8010"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}}
  forwarder:
    selector: {strategy: round, maxFails: 1, failTimeout: 10m}
    nodes:
    - {name: live-udp, addr: "10.53.2.2:9010"}
    - {name: doomed-udp, addr: "10.53.2.2:9011"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: probed-tcp
  addr: "10.53.1.1:8020"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: probed, addr: "10.53.2.2:9002"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc, healthCheck: probe}
`, map[string]string{"GW": gw.Name, "MAXFAILS": fmt.Sprint(maxFails)}), e2e.Options{})

	// A stream of new connections, one after another: n of them, each
	// 4 KiB each way checked end to end, or refused.
	stream := func(n int) (ok, refused int) {
		t.Helper()
		for i := range n {
			err := e2e.Exchange(t, client, "10.53.1.1:8000", 4<<10, 15*time.Second)
			switch {
			case err == nil:
				ok++
			case errors.Is(err, syscall.ECONNREFUSED):
				refused++
			default:
				t.Fatalf("connection %d: %v", i, err)
			}
		}
		return ok, refused
	}
	if ok, refused := stream(10); ok != 10 || refused != 0 {
		t.Fatalf("with both nodes up: %d connections served, %d refused; want 10 and 0", ok, refused)
	}
	if live.Count() == 0 || doomed.Count() == 0 {
		t.Fatalf("round robin served live %d, doomed %d connections: want both", live.Count(), doomed.Count())
	}

	killTCP()
	ok, refused := stream(30)
	t.Logf("after the node's listener closed: %d connections served, %d refused", ok, refused)
	if refused > maxFails {
		t.Errorf("%d connections refused, want at most maxFails (%d)", refused, maxFails)
	}
	if refused == 0 {
		t.Errorf("no connection refused: the stream never reached the closed node (round robin should have)")
	}
	d.WaitLog(t, 10*time.Second, "node marked failed by its flows", "node=doomed")
	d.WaitLog(t, 10*time.Second, "node health pushed to datapath", "node=doomed", "healthy=false")

	// UDP: sessions from new client ports; half would go to the doomed
	// node by round robin.
	killUDP()
	for i := range 6 {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		c, err := e2e.DialFrom(ctx, t, client, "udp", "10.53.1.1:8010")
		if err == nil {
			err = peer.UDPExchange(ctx, c, 3, 256)
		}
		cancel()
		if err != nil {
			t.Errorf("udp session %d after its node went away: %v", i, err)
		}
	}
	d.WaitLog(t, 10*time.Second, "node marked failed by its flows", "node=doomed-udp")

	// No probe reached a passive service's node: each connection it
	// accepted carried a client's bytes. The probed node gets connections
	// no client made (bounded wait: one probe round is 2s).
	if got, data := live.Accepted(), live.Count(); got != data {
		t.Errorf("node live accepted %d connections, %d of them a client's: probes reached it", got, data)
	}
	if got, data := doomed.Accepted(), doomed.Count(); got != data {
		t.Errorf("node doomed accepted %d connections, %d of them a client's: probes reached it", got, data)
	}
	for deadline := time.Now().Add(10 * time.Second); probed.Accepted() == 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the probed service's node saw no probe")
		}
	}
	if probed.Count() != 0 {
		t.Errorf("the probed node got %d connections with data, want none (no client used it)", probed.Count())
	}
}
