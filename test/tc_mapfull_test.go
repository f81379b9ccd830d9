package test

import (
	"regexp"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/loader"
)

// TestTCSNATExhausted runs a tc service whose node has two SNAT ports
// (loader.SNATPortsEnv, a test knob): two held kernel flows take both, and
// further connections find none. They fall back to the service's
// listener, relayed byte-exact in userspace; the refusals are counted
// (snat_exhausted) and logged; the two kernel flows go on. Once one of
// them closes (and its port's short reuse grace has passed), new
// connections are kernel flows again.
func TestTCSNATExhausted(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newRestartTopo(t, "e2e-snat")
	client, gw := tp.client, tp.gw
	d := e2e.Start(t, "tc-snat-full", e2e.Config(`services:
- name: tc-full
  addr: "10.34.1.1:8000"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-0, addr: "10.34.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"GW": gw.Name}), e2e.Options{In: gw, Env: []string{loader.SNATPortsEnv + "=61000-61001"}})
	d.WaitLog(t, time.Second, "SNAT port range narrowed", "snat_ports=61000-61001")
	scrape := metricsIn(t, gw, "127.0.0.1:9100")
	const addr = "10.34.1.1:8000"
	userspaceFlow := func(local string) *regexp.Regexp {
		return regexp.MustCompile(`(?m)^tc-full\s+userspace\s+tcp\s+` + regexp.QuoteMeta(local) + `\s`)
	}
	var held []*heldConn
	for range 2 {
		h := holdConn(t, client, addr)
		if out := conns(t, d); !tcFlow("tc-full", h.c.LocalAddr().String()).MatchString(out) {
			t.Fatalf("conns does not list %s as a tc flow:\n%s", h.c.LocalAddr(), out)
		}
		held = append(held, h)
	}

	const overflow = 3
	for i := range overflow {
		h := holdConn(t, client, addr)
		if out := conns(t, d); !userspaceFlow(h.c.LocalAddr().String()).MatchString(out) {
			t.Fatalf("connection %d beyond the SNAT ports, %s, is not on the listener:\n%s", i, h.c.LocalAddr(), out)
		}
		h.roundTrip(t, "on the listener")
		h.c.Close()
	}
	if err := e2e.Exchange(t, client, addr, 1<<20, trafficTimeout); err != nil {
		t.Fatalf("a connection beyond the SNAT ports: %v", err)
	}
	waitCount(t, scrape, `ebpfwd_errors_total{service="tc-full",reason="snat_exhausted"}`, overflow+1)
	// Logged from the conntrack GC round (every 10s).
	d.WaitLog(t, 25*time.Second, "tc datapath refused new flows", "service=tc-full")
	for i, h := range held {
		h.roundTrip(t, "after the SNAT ports ran out")
		if i == 0 {
			h.c.Close()
		}
	}
	// The closed flow's port comes back after its reuse grace.
	deadline := time.Now().Add(settleTimeout)
	for {
		h := holdConn(t, client, addr)
		local := h.c.LocalAddr().String()
		out := conns(t, d)
		h.c.Close()
		if tcFlow("tc-full", local).MatchString(out) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new kernel flow %v after a held one closed:\n%s", settleTimeout, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	held[1].roundTrip(t, "at the end")
}
