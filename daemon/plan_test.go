package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

func TestPlanDatapath(t *testing.T) {
	notHere := errors.New("netns.out differs")
	noHelper := errors.New("no bpf_redirect_peer")
	tests := []struct {
		name       string
		datapath   string
		handler    string
		chained    bool
		applicable error // what tc.Applicable says
		probe      error // what tc.Probe says
		want       datapath.Kind
		reasonHas  string
		from       datapath.Kind
		wantErrHas string
	}{
		{name: "default is auto: tc", handler: "tcp", want: datapath.TC, reasonHas: "direct forward"},
		{name: "auto tc for udp", datapath: "auto", handler: "udp", want: datapath.TC, reasonHas: "direct forward"},
		{name: "auto, tc not applicable", handler: "tcp", applicable: notHere, want: datapath.Userspace,
			reasonHas: "tc does not apply: netns.out differs", from: datapath.TC},
		{name: "auto, probe fails", handler: "tcp", probe: noHelper, want: datapath.Userspace,
			reasonHas: "tc is unavailable: no bpf_redirect_peer", from: datapath.TC},
		{name: "auto chained", handler: "tcp", chained: true, want: datapath.Userspace, reasonHas: "proxy hops"},
		{name: "auto http", handler: "http", want: datapath.Userspace, reasonHas: "http proxy"},
		{name: "explicit userspace", datapath: "userspace", handler: "udp", want: datapath.Userspace, reasonHas: "configured"},
		{name: "explicit tc", datapath: "tc", handler: "tcp", want: datapath.TC, reasonHas: "configured"},
		{name: "explicit tc not applicable", datapath: "tc", handler: "tcp", applicable: notHere,
			wantErrHas: "datapath tc cannot carry this service: netns.out differs"},
		{name: "explicit tc probe fails", datapath: "tc", handler: "tcp", probe: noHelper,
			wantErrHas: "datapath tc is unavailable: no bpf_redirect_peer"},
		{name: "sockmap not built", datapath: "sockmap", handler: "tcp", wantErrHas: `"sockmap" is not available`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := kernel{
				tcApplicable: func(datapath.Service) error { return tt.applicable },
				tcProbe:      func() error { return tt.probe },
			}
			sc := &config.Service{Name: "s", Datapath: tt.datapath, Handler: config.Handler{Type: tt.handler}}
			p, err := k.planDatapath(sc, datapath.Service{Name: "s", Chained: tt.chained})
			if tt.wantErrHas != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErrHas) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErrHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.Datapath != tt.want || !strings.Contains(p.Reason, tt.reasonHas) || p.From != tt.from {
				t.Fatalf("plan = %+v, want %s from %q with a reason containing %q", p, tt.want, tt.from, tt.reasonHas)
			}
		})
	}
}

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
		{wrap(relay.ErrIdleTimeout), ReasonIdle},
		{wrap(&httpconnect.StatusError{Code: 407, Status: "407 Proxy Authentication Required"}), ReasonHopAuth},
		{wrap(&httpconnect.StatusError{Code: 502, Status: "502 Bad Gateway"}), ReasonHopGateway},
		{wrap(&httpconnect.StatusError{Code: 403, Status: "403 Forbidden"}), ReasonHopStatus},
		{wrap(httpconnect.ErrMalformedResponse), ReasonHopProtocol},
		{wrap(io.ErrUnexpectedEOF), ReasonHopClosed},
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
