package test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// twoHopProxies are the chain's hops: ebpfwd HTTP proxies with auth, each
// listening and dialing in its own namespace.
const twoHopProxies = `services:
- name: proxy-0
  addr: "10.0.10.1:8080"
  handler:
    type: http
    auth: {username: user0, password: pass0}
  listener: {type: tcp}
  metadata:
    netns: $H0
    netns.out: $H0
- name: proxy-1
  addr: "10.0.11.1:8080"
  handler:
    type: http
    auth: {username: user1, password: pass1}
  listener: {type: tcp}
  metadata:
    netns: $H1
    netns.out: $H1
`

// twoHopChains has one service per chain: chain-good with the right
// credentials and chain-bad with a wrong password for hop-1. Hop 0 is
// dialed from the client namespace; hop 1 is reached through hop 0.
const twoHopChains = `services:
- name: svc-good
  addr: 127.0.0.1:8000
  handler: {type: tcp, chain: chain-good}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.0.12.2:9000"}
  metadata: {netns: $C}
- name: svc-bad
  addr: 127.0.0.1:8001
  handler: {type: tcp, chain: chain-bad}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "10.0.12.2:9000"}
  metadata: {netns: $C}
chains:
- name: chain-good
  hops:
  - name: good-hop-0
    metadata: {netns: $C}
    nodes:
    - name: proxy-0
      addr: 10.0.10.1:8080
      connector: {type: http, auth: {username: user0, password: pass0}}
      dialer: {type: tcp}
  - name: good-hop-1
    nodes:
    - name: proxy-1
      addr: 10.0.11.1:8080
      connector: {type: http, auth: {username: user1, password: pass1}}
      dialer: {type: tcp}
- name: chain-bad
  hops:
  - name: hop-0
    metadata: {netns: $C}
    nodes:
    - name: proxy-0
      addr: 10.0.10.1:8080
      connector: {type: http, auth: {username: user0, password: pass0}}
      dialer: {type: tcp}
  - name: hop-1
    nodes:
    - name: proxy-1
      addr: 10.0.11.1:8080
      connector: {type: http, auth: {username: user1, password: wrong}}
      dialer: {type: tcp}
`

// TestTwoHopChainWithAuth tunnels through two authenticating HTTP proxies
// (the second reached via CONNECT through the first) to a target only the
// second can reach; with a wrong password for hop-1 the client gets
// nothing and the daemon says why, and it keeps serving other services.
func TestTwoHopChainWithAuth(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-chain-c")
	h0 := testutil.NewNS(t, "e2e-chain-h0")
	h1 := testutil.NewNS(t, "e2e-chain-h1")
	tg := testutil.NewNS(t, "e2e-chain-t")
	testutil.Veth(t, c, "veth-c", "10.0.10.2/24", h0, "veth-h0c", "10.0.10.1/24")
	testutil.Veth(t, h0, "veth-h0n", "10.0.11.2/24", h1, "veth-h1p", "10.0.11.1/24")
	testutil.Veth(t, h1, "veth-h1n", "10.0.12.1/24", tg, "veth-t", "10.0.12.2/24")
	target := e2e.EchoIn(t, tg, "10.0.12.2:9000")

	e2e.Start(t, "proxies", e2e.Config(twoHopProxies, map[string]string{"H0": h0.Name, "H1": h1.Name}), e2e.Options{})
	d := e2e.Start(t, "chains", e2e.Config(twoHopChains, map[string]string{"C": c.Name}), e2e.Options{})

	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 1<<20, 30*time.Second); err != nil {
		t.Fatalf("through chain-good: %v", err)
	}
	if got := target.Sources(); !slices.Equal(got, []string{"10.0.12.1"}) {
		t.Fatalf("target saw connections from %v, want only proxy-1's 10.0.12.1", got)
	}

	e2e.ExpectClosedNoData(t, c, "127.0.0.1:8001")
	line := d.WaitLog(t, 5*time.Second, "hop-1", "407")
	if strings.Contains(line, "good-hop-1") {
		t.Errorf("the 407 was logged for the good chain: %s", line)
	}

	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 256<<10, 30*time.Second); err != nil {
		t.Fatalf("chain-good after chain-bad failed: %v", err)
	}
	if !d.Running() {
		t.Fatal("the daemon exited after a hop refused authentication")
	}
}
