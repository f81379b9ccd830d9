package test

import (
	"context"
	"fmt"
	"regexp"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// tcRecreate: two tc services in one gateway, each to a server behind its
// own interface (g1, g3); the clients come in over g0.
const tcRecreate = `services:
- name: tc-a
  addr: "10.38.1.1:8000"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-a, addr: "10.38.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: tc-b
  addr: "10.38.1.1:8001"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-b, addr: "10.38.3.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
metrics:
  addr: 127.0.0.1:9100
`

// TestTCInterfaceRecreated removes the interface that leads to a tc
// service's node and creates it again under the same name (so with a new
// ifindex), as a CNI plugin or a link flap does, in a gateway that
// forwards and in one that does not (where the program routes on the
// node's route hint, an ifindex). While it is gone, new connections to
// that service are closed without a byte, logged and counted, and its
// node is marked down; the other tc service's flow goes on. Once it is
// back the program is on the new interface, the node is up again and new
// connections are kernel flows again, byte-exact.
func TestTCInterfaceRecreated(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	for _, forwarding := range []bool{true, false} {
		t.Run(fmt.Sprintf("forwarding=%v", forwarding), func(t *testing.T) {
			t.Parallel()
			tcInterfaceRecreated(t, forwarding)
		})
	}
}

func tcInterfaceRecreated(t *testing.T, forwarding bool) {
	client := testutil.NewNS(t, "e2e-recr-c")
	gw := testutil.NewNS(t, "e2e-recr-g")
	serverA := testutil.NewNS(t, "e2e-recr-a")
	serverB := testutil.NewNS(t, "e2e-recr-b")
	testutil.Veth(t, client, "c0", "10.38.1.2/24", gw, "g0", "10.38.1.1/24")
	testutil.Veth(t, gw, "g1", "10.38.2.1/24", serverA, "s0", "10.38.2.2/24")
	testutil.Veth(t, gw, "g3", "10.38.3.1/24", serverB, "s0", "10.38.3.2/24")
	if forwarding {
		if err := gw.EnableForwarding(); err != nil {
			t.Fatal(err)
		}
	}
	e2e.EchoIn(t, serverA, "10.38.2.2:9000")
	e2e.EchoIn(t, serverB, "10.38.3.2:9000")
	d := e2e.Start(t, "tc-recreate", e2e.Config(tcRecreate, map[string]string{"GW": gw.Name}), e2e.Options{In: gw})
	scrape := metricsIn(t, gw, "127.0.0.1:9100")
	gwNS := e2e.Handle(t, gw)
	waitNodeUp := func(node string, want float64) {
		t.Helper()
		sel := `ebpfwd_node_up{node="` + node + `"}`
		deadline := time.Now().Add(hotplugWait)
		for {
			samples, err := scrape()
			v, ok := sumMatching(samples, sel)
			if err == nil && ok && v == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s = %v (scrape error %v) after %v, want %v", sel, v, err, hotplugWait, want)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	// newKernelFlow moves 1 MiB byte-exact over a new connection and
	// checks that it was a kernel flow.
	newKernelFlow := func(service, addr, when string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
		defer cancel()
		conn, err := e2e.DialFrom(ctx, t, client, "tcp", addr)
		if err != nil {
			t.Fatalf("a new connection to %s %s: %v", service, when, err)
		}
		local := conn.LocalAddr().String()
		if err := peer.Exchange(ctx, conn, 1<<20); err != nil {
			t.Fatalf("a new connection to %s %s: %v", service, when, err)
		}
		if out := conns(t, d); !regexp.MustCompile(`(?m)^` + service + `\s+tc\s+tcp\s+` + regexp.QuoteMeta(local) + `\s`).MatchString(out) {
			t.Fatalf("conns does not list the connection %s to %s %s as a tc flow:\n%s", local, service, when, out)
		}
	}
	newKernelFlow("tc-a", "10.38.1.1:8000", "at start")
	heldB := holdConn(t, client, "10.38.1.1:8001")
	if out := conns(t, d); !tcFlow("tc-b", heldB.c.LocalAddr().String()).MatchString(out) {
		t.Fatalf("conns does not list the held connection %s as a tc flow:\n%s", heldB.c.LocalAddr(), out)
	}

	if err := gw.IP("link", "del", "g1"); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, hotplugWait, "tc datapath detached from interface", "interface=g1")
	heldB.roundTrip(t, "while the other service's interface is gone")
	// Whether the program already knows the node is down or not, a new
	// connection has no way to it: it must be closed, not black-holed.
	before := waitCount(t, scrape, `ebpfwd_errors_total{service="tc-a"}`, 0)
	e2e.ExpectClosedNoData(t, client, "10.38.1.1:8000")
	waitCount(t, scrape, `ebpfwd_errors_total{service="tc-a"}`, before+1)
	d.WaitLog(t, settleTimeout, "service=tc-a", "no node reachable")
	waitNodeUp("server-a", 0)

	testutil.Veth(t, gw, "g1", "10.38.2.1/24", serverA, "s0", "10.38.2.2/24")
	d.WaitLog(t, hotplugWait, "tc datapath attached to new interface", "interface=g1")
	waitTCXPrograms(t, gwNS, "g1", 1)
	waitNodeUp("server-a", 1)
	newKernelFlow("tc-a", "10.38.1.1:8000", "after the interface was created again")
	heldB.roundTrip(t, "after the other service's interface came back")
	newKernelFlow("tc-b", "10.38.1.1:8001", "after the other service's interface came back")
	if !d.Running() {
		t.Fatal("the daemon exited")
	}
}
