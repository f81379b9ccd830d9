package test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
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
		regexp.MustCompile(`(?m)^udp-svc\s+userspace\s+udp\s+` + regexp.QuoteMeta(udp.LocalAddr().String()) + `\s+-\s+127\.0\.0\.1:9001\s+idle`),
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
