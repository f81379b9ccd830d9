package chain

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/selector"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/httpproxy"
	"github.com/ebpfwd/ebpfwd/userspace/proxyproto"
)

// relayBoth copies both ways with half-close, like the userspace datapath.
func relayBoth(_ context.Context, a, b net.Conn) error {
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}
	wg.Add(2)
	go pipe(a, b)
	go pipe(b, a)
	wg.Wait()
	a.Close()
	b.Close()
	return nil
}

// startProxy runs ebpfwd's HTTP proxy on loopback and returns its address.
func startProxy(t *testing.T, auth *httpconnect.Auth) string {
	t.Helper()
	var d net.Dialer
	srv := &httpproxy.Server{Auth: auth, Dial: d.DialContext, Relay: relayBoth, Logger: slog.New(slog.DiscardHandler)}
	return testutil.ServeLoopback(t, srv.ServeConn)
}

func startEcho(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(peer.ServeEcho(l))
	return l.Addr().String()
}

type nodeSpec struct {
	addr string
	auth *httpconnect.Auth
}

func buildChain(hops ...[]nodeSpec) *Chain {
	c := &Chain{Name: "chain-0"}
	for i, specs := range hops {
		var nodes []*selector.Node[*Node]
		for j, s := range specs {
			name := []string{"node-0", "node-1", "node-2"}[j]
			nodes = append(nodes, &selector.Node[*Node]{Name: name, Value: &Node{Name: name, Addr: s.addr, Auth: s.auth}})
		}
		c.Hops = append(c.Hops, &Hop{
			Name:     []string{"hop-0", "hop-1", "hop-2"}[i],
			Selector: selector.New(selector.Options{Strategy: "fifo", MaxFails: 1, FailTimeout: time.Minute}, nodes...),
		})
	}
	return c
}

func TestChainDial(t *testing.T) {
	authA := &httpconnect.Auth{Username: "alice", Password: "a-secret"}
	authB := &httpconnect.Auth{Username: "bob", Password: "b-secret"}
	proxyA := startProxy(t, authA)
	proxyB := startProxy(t, authB)
	target := startEcho(t)

	tests := []struct {
		name  string
		chain *Chain
		// target overrides the echo server.
		target string
		// wantHop names the hop an error must be attributed to ("" = success).
		wantHop    string
		wantIs     error
		wantFinal  bool
		unhealthy  [2]int // hop, node index expected to be marked failed; {-1,-1} none
		checkDeath bool
	}{
		{
			name:  "two hops with auth",
			chain: buildChain([]nodeSpec{{proxyA, authA}}, []nodeSpec{{proxyB, authB}}),
		},
		{
			name:      "first node of hop 0 is down: next node",
			chain:     buildChain([]nodeSpec{{testutil.FreeLoopbackAddr(t), authA}, {proxyA, authA}}, []nodeSpec{{proxyB, authB}}),
			unhealthy: [2]int{0, 0}, checkDeath: true,
		},
		{
			name:      "wrong password on hop 1",
			chain:     buildChain([]nodeSpec{{proxyA, authA}}, []nodeSpec{{proxyB, &httpconnect.Auth{Username: "bob", Password: "wrong"}}}),
			wantHop:   "hop-1",
			wantIs:    httpconnect.ErrProxyAuthRequired,
			wantFinal: true,
			unhealthy: [2]int{1, 0}, checkDeath: true,
		},
		{
			name:      "hop 0 cannot reach hop 1: hop 1's node is blamed",
			chain:     buildChain([]nodeSpec{{proxyA, authA}}, []nodeSpec{{testutil.FreeLoopbackAddr(t), authB}}),
			wantHop:   "hop-0",
			unhealthy: [2]int{1, 0}, checkDeath: true,
		},
		{
			name:      "target unreachable: the chain is fine",
			chain:     buildChain([]nodeSpec{{proxyA, authA}}, []nodeSpec{{proxyB, authB}}),
			target:    testutil.FreeLoopbackAddr(t),
			wantHop:   "hop-1",
			wantFinal: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			to := target
			if tt.target != "" {
				to = tt.target
			}
			conn, err := tt.chain.Dial(ctx, Request{Target: to})
			if tt.wantHop == "" {
				if err != nil {
					t.Fatalf("dial: %v", err)
				}
				if err := peer.Exchange(ctx, conn, 1<<20); err != nil {
					t.Fatalf("exchange through the chain: %v", err)
				}
			} else {
				var he *HopError
				if !errors.As(err, &he) {
					t.Fatalf("err = %v, want a HopError", err)
				}
				if he.Hop != tt.wantHop || he.Final != tt.wantFinal {
					t.Fatalf("error attributed to hop %s (final %v), want %s (final %v): %v", he.Hop, he.Final, tt.wantHop, tt.wantFinal, err)
				}
				if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Fatalf("err = %v, want errors.Is %v", err, tt.wantIs)
				}
				if got := TargetUnreachable(err); got != (tt.target != "") {
					t.Fatalf("TargetUnreachable = %v for %v", got, err)
				}
			}
			for hi, h := range tt.chain.Hops {
				for ni, n := range h.Selector.Nodes() {
					want := !(tt.checkDeath && hi == tt.unhealthy[0] && ni == tt.unhealthy[1])
					if got := h.Selector.Healthy(n); got != want {
						t.Errorf("hop %s node %s healthy = %v, want %v", h.Name, n.Name, got, want)
					}
				}
			}
		})
	}
}

func TestChainPendingBytesAfterResponse(t *testing.T) {
	// A proxy that answers 200 and the target's first bytes in one write:
	// the tunnel must deliver those bytes.
	proxy, _ := testutil.StartScriptedProxy(t, testutil.ProxyReply{
		Chunks: [][]byte{[]byte("HTTP/1.1 200 Connection established\r\n\r\nhello from the target")},
		Close:  true,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := buildChain([]nodeSpec{{proxy, nil}}).Dial(ctx, Request{Target: "10.9.9.9:1"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.ReadAll(conn)
	if string(got) != "hello from the target" {
		t.Fatalf("tunnel delivered %q", got)
	}
}

// TestChainSendsProxyHeaderToFirstHop: a first-hop node with ProxyProtocol
// gets a PROXY header naming the client before the CONNECT; the tunnel
// then works as without.
func TestChainSendsProxyHeaderToFirstHop(t *testing.T) {
	echo := startEcho(t)
	var d net.Dialer
	srv := &httpproxy.Server{Dial: d.DialContext, Relay: relayBoth, Logger: slog.New(slog.DiscardHandler)}
	headers := make(chan proxyproto.Header, 1)
	hop := testutil.ServeLoopback(t, func(ctx context.Context, c net.Conn) {
		pc, err := proxyproto.Read(c, 5*time.Second)
		if err != nil {
			t.Errorf("hop: %v", err)
			c.Close()
			return
		}
		headers <- pc.Header
		srv.ServeConn(ctx, pc)
	})
	for _, version := range []int{1, 2} {
		c := buildChain([]nodeSpec{{hop, nil}})
		c.Hops[0].Selector.Nodes()[0].Value.ProxyProtocol = version
		src, dst := netip.MustParseAddrPort("192.0.2.44:5555"), netip.MustParseAddrPort("10.0.0.1:8000")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := c.Dial(ctx, Request{Target: echo, Source: src, Destination: dst})
		cancel()
		if err != nil {
			t.Fatalf("v%d: %v", version, err)
		}
		h := <-headers
		if h.Version != version || h.Source != src || h.Destination != dst {
			t.Fatalf("the hop read %+v, want version %d from %v to %v", h, version, src, dst)
		}
		if err := peer.Exchange(t.Context(), conn, 1<<16); err != nil {
			t.Fatalf("v%d: through the tunnel: %v", version, err)
		}
	}
}
