package test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestConnsListsLiveFlows holds a TCP connection and a UDP session open
// through a running daemon and asks `ebpfwd conns` for them.
func TestConnsListsLiveFlows(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-conns-c")
	target := testutil.NewNS(t, "e2e-conns-t")
	e2e.EchoIn(t, target, "127.0.0.1:9000")
	e2e.UDPEchoIn(t, target, "127.0.0.1:9001")
	yaml := e2e.Config(`services:
- name: tcp-svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $T}
- name: udp-svc
  addr: 127.0.0.1:8001
  handler: {type: udp}
  listener: {type: udp, metadata: {ttl: 30s, keepAlive: true}}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9001"}
  metadata: {netns: $C, netns.out: $T}
`, map[string]string{"C": c.Name, "T": target.Name})
	d := e2e.Start(t, "conns", yaml, e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	tcp, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
	if err != nil {
		t.Fatal(err)
	}
	defer tcp.Close()
	// Round trip 5 bytes so the stream is up and counted both ways.
	tcp.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := tcp.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(tcp, make([]byte, 5)); err != nil {
		t.Fatal(err)
	}
	udp, err := e2e.DialFrom(ctx, t, c, "udp", "127.0.0.1:8001")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	udp.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := udp.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if _, err := udp.Read(make([]byte, 16)); err != nil {
		t.Fatal(err)
	}

	wants := []*regexp.Regexp{
		regexp.MustCompile(`(?m)^tcp-svc\s+userspace\s+tcp\s+` + regexp.QuoteMeta(tcp.LocalAddr().String()) + `\s+target-0\s+127\.0\.0\.1:9000\s+established\s+\S+\s+5\s+5$`),
		regexp.MustCompile(`(?m)^udp-svc\s+userspace\s+udp\s+` + regexp.QuoteMeta(udp.LocalAddr().String()) + `\s+target-0\s+127\.0\.0\.1:9001\s+idle\s+\S+\s+\S+\s+4\s+4$`),
		regexp.MustCompile(`(?m)^2 flows$`),
	}
	// Byte counts of a connection that moves little are refreshed about
	// once a second: ask until they show (bounded).
	var out string
	for deadline := time.Now().Add(5 * time.Second); ; {
		var stdout, stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, e2e.Bin, "conns", "--instance", d.Instance)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if err := cmd.Run(); err != nil {
			t.Fatalf("ebpfwd conns: %v\n%s", err, &stderr)
		}
		out = stdout.String()
		if matchAll(out, wants) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	for _, want := range wants {
		if !want.MatchString(out) {
			t.Errorf("conns output lacks %s:\n%s", want, out)
		}
	}

	// The same flows for scripts.
	jsonOut, err := exec.CommandContext(ctx, e2e.Bin, "conns", "--json", "--instance", d.Instance).Output()
	if err != nil {
		t.Fatalf("ebpfwd conns --json: %v", err)
	}
	var flows []struct {
		Service, Datapath, Network, Client string
		BytesUp                            uint64 `json:"bytes_up"`
	}
	if err := json.Unmarshal(jsonOut, &flows); err != nil || len(flows) == 0 {
		t.Fatalf("ebpfwd conns --json: %v, %d flows:\n%s", err, len(flows), jsonOut)
	}
	for _, f := range flows {
		if f.Service == "" || f.Datapath == "" || f.Network == "" || f.Client == "" {
			t.Errorf("flow without its service, datapath, network or client: %+v", f)
		}
	}

	// An instance that is not running is a clear error.
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, e2e.Bin, "conns", "--instance", "e2e-not-running")
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || !bytes.Contains(stderr.Bytes(), []byte("instance e2e-not-running is not running")) {
		t.Errorf("conns for a stopped instance: %v, stderr %q", err, &stderr)
	}
}

func matchAll(s string, res []*regexp.Regexp) bool {
	for _, re := range res {
		if !re.MatchString(s) {
			return false
		}
	}
	return true
}

// TestConnsCountsBytes sends known amounts through a tc TCP service, a tc
// UDP service and a userspace UDP service, each checked end to end
// (SHA-256 for TCP, every datagram compared for UDP), and expects
// `ebpfwd conns --json` to list each flow with exactly those payload bytes
// each way, its node, and an age between 0 and the test's own duration.
func TestConnsCountsBytes(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	begin := time.Now()
	client := testutil.NewNS(t, "e2e-cnb-c")
	gw := testutil.NewNS(t, "e2e-cnb-g")
	server := testutil.NewNS(t, "e2e-cnb-s")
	testutil.Veth(t, client, "c0", "10.52.1.2/24", gw, "g0", "10.52.1.1/24")
	testutil.Veth(t, gw, "g1", "10.52.2.1/24", server, "s0", "10.52.2.2/24")
	e2e.EchoIn(t, server, "10.52.2.2:9000")
	e2e.UDPEchoIn(t, server, "10.52.2.2:9001")
	d := e2e.Start(t, "conns-bytes", e2e.Config(`services:
- name: tc-tcp
  addr: "10.52.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: tcp-node, addr: "10.52.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: tc-udp
  addr: "10.52.1.1:8001"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true, ttl: 1m}}
  forwarder:
    nodes:
    - {name: udp-node, addr: "10.52.2.2:9001"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: relay-udp
  addr: "10.52.1.1:8002"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true, ttl: 1m}}
  forwarder:
    nodes:
    - {name: relay-node, addr: "10.52.2.2:9001"}
  metadata: {netns: $GW, netns.out: $GW, datapath: userspace}
`, map[string]string{"GW": gw.Name}), e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type want struct {
		service, datapath, node string
		up, down                uint64
		datagrams               uint64 // UDP: packets each way; 0: not checked
	}
	wants := map[string]want{} // by client address

	// TCP: the echo returns every byte and then its 32-byte SHA-256.
	const tcpBytes = 300_000
	c, err := e2e.DialFrom(ctx, t, client, "tcp", "10.52.1.1:8000")
	if err != nil {
		t.Fatal(err)
	}
	tcpClient := c.LocalAddr().String()
	wants[tcpClient] = want{"tc-tcp", "tc", "tcp-node", tcpBytes, tcpBytes + peer.TrailerSize, 0}
	if err := peer.Exchange(ctx, c, tcpBytes); err != nil {
		t.Fatalf("tcp exchange: %v", err)
	}
	// The program counts the payload of every segment it translates, so a
	// segment TCP sent again counts again (docs/DATAPATHS.md): the client's
	// own retransmitted bytes bound the excess up exactly; the echo
	// server's are not visible here, so down may exceed by a bounded part.
	var upRetrans uint64
	if raw, err := c.(*net.TCPConn).SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				upRetrans = info.Bytes_retrans
			}
		})
	}

	// UDP: each datagram echoed once, sizes as peer.DatagramSize says.
	const datagrams, maxSize = 25, 1200
	var udpBytes uint64
	for seq := range uint32(datagrams) {
		udpBytes += uint64(peer.DatagramSize(seq, maxSize))
	}
	for _, svc := range []struct{ service, datapath, addr, node string }{
		{"tc-udp", "tc", "10.52.1.1:8001", "udp-node"},
		{"relay-udp", "userspace", "10.52.1.1:8002", "relay-node"},
	} {
		u, err := e2e.DialFrom(ctx, t, client, "udp", svc.addr)
		if err != nil {
			t.Fatal(err)
		}
		wants[u.LocalAddr().String()] = want{svc.service, svc.datapath, svc.node, udpBytes, udpBytes, datagrams}
		if err := peer.UDPExchange(ctx, u, datagrams, maxSize); err != nil {
			t.Fatalf("%s: %v", svc.service, err)
		}
	}

	type flow struct {
		Service, Datapath, Network, Client, Node string
		Started                                  time.Time
		BytesUp                                  uint64 `json:"bytes_up"`
		BytesDown                                uint64 `json:"bytes_down"`
		PacketsUp                                uint64 `json:"packets_up"`
		PacketsDown                              uint64 `json:"packets_down"`
	}
	// The relay's counts are exact once its session has relayed the last
	// reply, which the client has seen: no waiting. The kernel's are
	// exact the moment the packet passed.
	raw, err := exec.CommandContext(ctx, e2e.Bin, "conns", "--json", "--instance", d.Instance).Output()
	if err != nil {
		t.Fatalf("ebpfwd conns --json: %v", err)
	}
	var flows []flow
	if err := json.Unmarshal(raw, &flows); err != nil {
		t.Fatalf("ebpfwd conns --json: %v:\n%s", err, raw)
	}
	listed := time.Now()
	seen := map[string]bool{}
	for _, f := range flows {
		w, ok := wants[f.Client]
		if !ok {
			continue
		}
		seen[f.Client] = true
		got := want{f.Service, f.Datapath, f.Node, f.BytesUp, f.BytesDown, 0}
		if w.datagrams != 0 {
			got.datagrams = f.PacketsUp
			if f.PacketsDown != f.PacketsUp {
				t.Errorf("%s flow of %s: %d packets up, %d down, want %d each", w.service, f.Client, f.PacketsUp, f.PacketsDown, w.datagrams)
			}
		} else if f.PacketsUp == 0 || f.PacketsDown == 0 {
			t.Errorf("%s flow of %s: %d packets up, %d down", w.service, f.Client, f.PacketsUp, f.PacketsDown)
		}
		if f.Client == tcpClient {
			// Retransmitted segments: up by at most the client's count,
			// down by less than half the stream.
			if got.up >= w.up && got.up <= w.up+upRetrans {
				got.up = w.up
			}
			if got.down >= w.down && got.down < w.down+tcpBytes/2 {
				got.down = w.down
			}
		}
		if got != w {
			t.Errorf("flow of %s: got %+v, want %+v (client retransmitted %d bytes)", f.Client, got, w, upRetrans)
		}
		if age := listed.Sub(f.Started); age <= 0 || age > listed.Sub(begin) {
			t.Errorf("%s flow of %s: age %v (started %v), want within the test's %v", w.service, f.Client, age, f.Started, listed.Sub(begin))
		}
	}
	for client, w := range wants {
		if !seen[client] {
			t.Errorf("conns --json lists no %s flow of %s:\n%s", w.service, client, raw)
		}
	}
}
