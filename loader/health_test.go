package loader

import (
	"context"
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestNodeHealthCountsRefusals: a connection the node refuses is counted
// against it, the program takes it out at MaxFails, SetNodeHealthy puts it
// back one failure short, and a node put at another node's index starts
// with no events.
func TestNodeHealthCountsRefusals(t *testing.T) {
	testutil.RequireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	tp, l := attachedGateway(t, Config{})
	vip := netip.MustParseAddrPort("10.20.1.1:8000")
	closed := netip.MustParseAddrPort("10.20.2.2:9001") // nothing listens: the node's kernel resets the SYN
	live := netip.MustParseAddrPort("10.20.2.2:9000")
	ln, err := tp.server.Listen(ctx, "tcp", live.String())
	if err != nil {
		t.Fatal(err)
	}
	defer peer.ServeEcho(ln)()
	svc := Service{Network: "tcp", VIP: vip, Nodes: []Node{{Addr: closed}, {Addr: live}}, MaxFails: 1}
	id, err := l.PutService(svc)
	if err != nil {
		t.Fatal(err)
	}
	dial := func() error {
		c, err := tp.client.Dial(ctx, "tcp", vip.String())
		if err != nil {
			return err
		}
		return peer.Exchange(ctx, c, 1024)
	}
	health := func() []NodeHealth {
		t.Helper()
		h, err := l.NodeHealth(id)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}

	// Round robin starts at node 0: refused, which takes it out at once.
	if err := dial(); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("first connection: %v, want refused by the closed node", err)
	}
	for i := range 3 {
		if err := dial(); err != nil {
			t.Fatalf("connection %d after the refusal: %v", i, err)
		}
	}
	h := health()
	if want := (NodeHealth{Refused: 1, Streak: 1}); h[0] != want {
		t.Errorf("closed node: %+v, want %+v", h[0], want)
	}
	if h[1].Answered != 3 || h[1].Failed() != 0 || h[1].Streak != 0 {
		t.Errorf("live node: %+v, want 3 answered, no failure", h[1])
	}

	// Back in (failTimeout over): one failure short of MaxFails, so its
	// next refusal takes it out again.
	if err := l.SetNodeHealthy(id, 0, true); err != nil {
		t.Fatal(err)
	}
	if s := health()[0].Streak; s != 0 {
		t.Errorf("streak after SetNodeHealthy(true) = %d, want MaxFails-1 = 0", s)
	}

	// Another node at index 0: its counts start over.
	svc.Nodes[0].Addr = netip.MustParseAddrPort("10.20.2.2:9002")
	if _, err := l.PutService(svc); err != nil {
		t.Fatal(err)
	}
	if h := health()[0]; h != (NodeHealth{}) {
		t.Errorf("a new node at index 0 starts with %+v, want nothing", h)
	}
	if h := health()[1]; h.Answered != 3 {
		t.Errorf("the unchanged node lost its counts: %+v", h)
	}
}
