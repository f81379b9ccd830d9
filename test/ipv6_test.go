package test

import (
	"context"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestIPv6 forwards TCP and UDP between namespaces over IPv6 only: the
// client reaches the service over one veth, the daemon dials the target
// over another, and the target sees the gateway's IPv6 address.
func TestIPv6(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-v6-c")
	gw := testutil.NewNS(t, "e2e-v6-g")
	server := testutil.NewNS(t, "e2e-v6-s")
	testutil.Veth(t, client, "c0", "fd00:10::2/64", gw, "g0", "fd00:10::1/64")
	testutil.Veth(t, gw, "g1", "fd00:20::1/64", server, "s0", "fd00:20::2/64")
	target := e2e.EchoIn(t, server, "[fd00:20::2]:9000")
	e2e.UDPEchoIn(t, server, "[fd00:20::2]:9001")

	yaml := e2e.Config(`services:
- name: v6-tcp
  addr: "[fd00:10::1]:8000"
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "[fd00:20::2]:9000"}
  metadata: {netns: $GW, netns.out: $GW}
- name: v6-udp
  addr: "[fd00:10::1]:8001"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}} # so tc can carry it
  forwarder:
    nodes:
    - {name: target-0, addr: "[fd00:20::2]:9001"}
  metadata: {netns: $GW, netns.out: $GW}
`, map[string]string{"GW": gw.Name})
	e2e.Start(t, "v6", yaml, e2e.Options{})

	if err := e2e.Exchange(t, client, "[fd00:10::1]:8000", 1<<20, 15*time.Second); err != nil {
		t.Fatalf("tcp over IPv6: %v", err)
	}
	for _, src := range target.Sources() {
		if src != "fd00:20::1" {
			t.Fatalf("target saw a connection from %s, want the gateway's fd00:20::1", src)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := e2e.DialFrom(ctx, t, client, "udp", "[fd00:10::1]:8001")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := peer.UDPExchange(ctx, c, 100, 1200); err != nil {
		t.Fatalf("udp over IPv6: %v", err)
	}
}
