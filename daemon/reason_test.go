package daemon

import (
	"context"
	"errors"
	"fmt"
	"github.com/ebpfwd/ebpfwd/config"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/proxyproto"
	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

func TestReasonOf(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("node n (1.2.3.4:5): %w", err) }
	tests := []struct {
		err  error
		want Reason
	}{
		{wrap(&net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}), ReasonRefused},
		{wrap(os.NewSyscallError("connect", syscall.EHOSTUNREACH)), ReasonUnreachable},
		{wrap(os.NewSyscallError("read", syscall.ECONNRESET)), ReasonReset},
		{wrap(context.DeadlineExceeded), ReasonTimeout},
		{wrap(os.ErrDeadlineExceeded), ReasonTimeout},
		{wrap(netns.ErrGone), ReasonNetnsGone},
		{wrap(&net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.EMFILE)}), ReasonLocal},
		{wrap(os.NewSyscallError("socket", syscall.ENFILE)), ReasonLocal},
		{wrap(os.NewSyscallError("sendmsg", syscall.ENOBUFS)), ReasonLocal},
		{wrap(relay.ErrIdleTimeout), ReasonIdle},
		{wrap(&httpconnect.StatusError{Code: 407, Status: "407 Proxy Authentication Required"}), ReasonHopAuth},
		{wrap(&httpconnect.StatusError{Code: 502, Status: "502 Bad Gateway"}), ReasonHopGateway},
		{wrap(&httpconnect.StatusError{Code: 403, Status: "403 Forbidden"}), ReasonHopStatus},
		{wrap(httpconnect.ErrMalformedResponse), ReasonHopProtocol},
		{wrap(io.ErrUnexpectedEOF), ReasonHopClosed},
		{fmt.Errorf("%w: the client closed without sending one", proxyproto.ErrNoHeader), ReasonProxyMissing},
		{fmt.Errorf("%w: bad port", proxyproto.ErrMalformed), ReasonProxyMalformed},
		{fmt.Errorf("%w (10s, 3 bytes received)", proxyproto.ErrTimeout), ReasonProxyTimeout},
		{wrap(&net.DNSError{Err: "no such host", Name: "x", IsNotFound: true}), ReasonResolve},
		{errors.New("something else"), ReasonOther},
	}
	for _, tt := range tests {
		if got := reasonOf(tt.err); got != tt.want {
			t.Errorf("reasonOf(%v) = %s, want %s", tt.err, got, tt.want)
		}
	}
}

func TestErrorsCount(t *testing.T) {
	var e Errors
	for range 3 {
		e.Add(ReasonRefused)
	}
	e.Add(ReasonTimeout)
	got := e.Snapshot()
	if got[ReasonRefused] != 3 || got[ReasonTimeout] != 1 || len(got) != 2 {
		t.Fatalf("snapshot = %v", got)
	}
}

// TestNodesFault: only failures that say something about the node mark it.
func TestNodesFault(t *testing.T) {
	yes := true
	tests := []struct {
		err  error
		want bool
		// probe is probeFault's answer where it differs from a dial's.
		probe *bool
	}{
		{os.NewSyscallError("connect", syscall.ECONNREFUSED), true, nil},
		{context.DeadlineExceeded, true, nil},
		{os.NewSyscallError("connect", syscall.EHOSTUNREACH), true, nil},
		{os.NewSyscallError("socket", syscall.EMFILE), false, nil},
		{os.NewSyscallError("socket", syscall.ENFILE), false, nil},
		{os.NewSyscallError("socket", syscall.ENOBUFS), false, nil},
		{os.NewSyscallError("socket", syscall.ENOMEM), false, nil},
		// A gone netns.out fails every node alike: not the node's fault
		// for a dial, but a probe marks it down so that the kernel stops
		// sending it new flows into the void.
		{fmt.Errorf("open netns: %w", netns.ErrGone), false, &yes},
	}
	for _, tt := range tests {
		if got := nodesFault(tt.err); got != tt.want {
			t.Errorf("nodesFault(%v) = %v, want %v", tt.err, got, tt.want)
		}
		want := tt.want
		if tt.probe != nil {
			want = *tt.probe
		}
		if got := probeFault(tt.err); got != want {
			t.Errorf("probeFault(%v) = %v, want %v", tt.err, got, want)
		}
	}
}

// TestMissingNamespaceAtItsKey: a namespace that cannot be opened is
// reported where it is written, not at the service's first line.
func TestMissingNamespaceAtItsKey(t *testing.T) {
	yaml := "services:\n- name: s\n  addr: :80\n  handler: {type: tcp}\n  forwarder: {nodes: [{addr: 10.0.0.2:80}]}\n  metadata:\n    netns: ebpfwd-no-such-namespace-here\n"
	cfg, _, err := config.Parse("ns.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	err = CheckNamespaces(cfg)
	if err == nil || !strings.HasPrefix(err.Error(), "ns.yaml:7:12: services[0].metadata.netns: ") {
		t.Fatalf("err = %v, want it at 7:12, the netns key's value", err)
	}
}
