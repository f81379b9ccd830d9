package datapath

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
)

// fakeDatapath answers the planner as told and sets up fakeAttachments.
type fakeDatapath struct {
	kind     Kind
	rank     int
	applies  error
	probe    error
	setupErr error
	setups   int
}

func (f *fakeDatapath) Kind() Kind            { return f.kind }
func (f *fakeDatapath) Rank() int             { return f.rank }
func (f *fakeDatapath) Applies(Service) error { return f.applies }
func (f *fakeDatapath) Probe() error          { return f.probe }
func (f *fakeDatapath) Setup(context.Context, Service) (Attachment, error) {
	f.setups++
	if f.setupErr != nil {
		return nil, f.setupErr
	}
	return &fakeAttachment{kind: f.kind, counters: Counters{Opened: 1, BytesUp: 10}}, nil
}

type fakeAttachment struct {
	kind     Kind
	counters Counters
	closed   int
	spliced  int
	fallback bool // as a kernel Splicer: hand every stream back
}

func (a *fakeAttachment) Counters() Counters { return a.counters }
func (a *fakeAttachment) Close() error       { a.closed++; return nil }
func (a *fakeAttachment) Flows() []Flow      { return []Flow{{Datapath: a.kind}} }

// splicingAttachment is a kernel attachment that takes streams itself.
type splicingAttachment struct{ fakeAttachment }

func (a *splicingAttachment) Splice(_ context.Context, s Stream) error {
	if a.fallback {
		return ErrFallback
	}
	a.spliced++
	s.Client.Close()
	s.Upstream.Close()
	return nil
}

type relayAttachment struct{ fakeAttachment }

func (a *relayAttachment) Splice(_ context.Context, s Stream) error {
	a.spliced++
	s.Client.Close()
	s.Upstream.Close()
	return nil
}

func TestPlan(t *testing.T) {
	notHere := errors.New("netns.out differs")
	noHelper := errors.New("no bpf_redirect_peer")
	tests := []struct {
		name       string
		want       Kind
		applies    error // what the kernel datapath's Applies says
		probe      error // what its Probe says
		got        Kind
		reasonHas  string
		from       Kind
		fallback   string
		wantErrHas string
	}{
		{name: "auto takes the kernel datapath", want: Auto, got: TC, reasonHas: "fastest datapath that applies (tc)"},
		{name: "empty is auto", want: "", got: TC},
		{name: "auto, tc not applicable", want: Auto, applies: notHere, got: Userspace,
			reasonHas: "tc does not apply: netns.out differs", from: TC, fallback: FallbackNotApplicable},
		{name: "auto, probe fails", want: Auto, probe: noHelper, got: Userspace,
			reasonHas: "tc is unavailable: no bpf_redirect_peer", from: TC, fallback: FallbackProbeFailed},
		{name: "auto, a shape tc never carries: no fallback", want: Auto, applies: NeverApplies("a chain"), got: Userspace,
			reasonHas: "tc does not apply: a chain"},
		{name: "explicit userspace", want: Userspace, applies: notHere, got: Userspace, reasonHas: "configured"},
		{name: "explicit tc", want: TC, got: TC, reasonHas: "configured"},
		{name: "explicit tc not applicable", want: TC, applies: notHere,
			wantErrHas: "datapath tc cannot carry this service: netns.out differs"},
		{name: "explicit tc probe fails", want: TC, probe: noHelper,
			wantErrHas: "datapath tc is unavailable: no bpf_redirect_peer"},
		{name: "unregistered datapath", want: Sockmap, wantErrHas: `"sockmap" is not available in this version (available: auto, tc, userspace)`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Registration order does not matter: rank does.
			set := NewSet(&fakeDatapath{kind: Userspace, rank: 100},
				&fakeDatapath{kind: TC, rank: 10, applies: tt.applies, probe: tt.probe})
			p, err := set.Plan(Service{Name: "s"}, tt.want)
			if tt.wantErrHas != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErrHas) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErrHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.Datapath != tt.got || !strings.Contains(p.Reason, tt.reasonHas) || p.From != tt.from || p.FallbackReason != tt.fallback {
				t.Fatalf("plan = %+v, want %s from %q (%q) with a reason containing %q", p, tt.got, tt.from, tt.fallback, tt.reasonHas)
			}
		})
	}
}

// TestPlanRanks: `auto` tries every kernel datapath in rank order and says
// why it passed over the faster ones.
func TestPlanRanks(t *testing.T) {
	set := NewSet(&fakeDatapath{kind: Userspace, rank: 100},
		&fakeDatapath{kind: Sockmap, rank: 20},
		&fakeDatapath{kind: TC, rank: 10, applies: errors.New("a chain")})
	p, err := set.Plan(Service{Name: "s"}, Auto)
	if err != nil {
		t.Fatal(err)
	}
	if p.Datapath != Sockmap || !strings.Contains(p.Reason, "tc does not apply: a chain") || p.From != "" {
		t.Fatalf("plan = %+v, want sockmap, saying why not tc", p)
	}
	var kinds []Kind
	for _, dp := range set.Datapaths() {
		kinds = append(kinds, dp.Kind())
	}
	if strings.Join([]string{string(kinds[0]), string(kinds[1]), string(kinds[2])}, ",") != "tc,sockmap,userspace" {
		t.Fatalf("datapaths in order %v, want tc, sockmap, userspace", kinds)
	}
}

// TestSetupFallback: a kernel datapath that `auto` chose but the kernel
// refused falls back to the relay, and the plan says so; one configured by
// name is an error, and nothing stays set up.
func TestSetupFallback(t *testing.T) {
	refused := errors.New("BPF program refused")
	for _, configured := range []bool{false, true} {
		relay := &fakeDatapath{kind: Userspace, rank: 100}
		kernel := &fakeDatapath{kind: TC, rank: 10, setupErr: refused}
		set := NewSet(relay, kernel)
		plan := Plan{Service: "s", Datapath: TC, Reason: "fastest"}
		att, got, err := set.Setup(context.Background(), plan, configured, Service{Name: "s"}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		if configured {
			if err == nil || !errors.Is(err, refused) {
				t.Fatalf("configured: err = %v, want the refusal", err)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if got.Datapath != Userspace || got.From != TC || got.FallbackReason != FallbackSetupFailed || !strings.Contains(got.Reason, "BPF program refused") {
			t.Fatalf("plan after fallback = %+v", got)
		}
		if fa, ok := att.(*fakeAttachment); !ok || fa.kind != Userspace {
			t.Fatalf("attachment %T %+v, want the relay's", att, att)
		}
	}
}

func pipePair() Stream {
	c1, c2 := net.Pipe()
	u1, u2 := net.Pipe()
	c2.Close()
	u2.Close()
	return Stream{Client: c1, Upstream: u1}
}

// TestWithRelay: streams go to a splicing kernel attachment unless it hands
// them back; figures and flows are both sides'; Close closes both.
func TestWithRelay(t *testing.T) {
	tests := []struct {
		name                  string
		kernelSplices         bool
		fallback              bool
		wantKernel, wantRelay int
		wantPicksNodes        bool
	}{
		{name: "kernel that moves no streams (tc)", wantRelay: 1},
		{name: "kernel that splices (sockmap)", kernelSplices: true, wantKernel: 1},
		{name: "kernel hands the stream back", kernelSplices: true, fallback: true, wantRelay: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			relay := &relayAttachment{fakeAttachment{kind: Userspace, counters: Counters{Opened: 2, BytesUp: 5, Active: 1}}}
			var kernel Attachment
			sk := &splicingAttachment{fakeAttachment{kind: TC, counters: Counters{Opened: 3, BytesUp: 7, PacketsUp: 9}, fallback: tt.fallback}}
			if tt.kernelSplices {
				kernel = sk
			} else {
				kernel = &sk.fakeAttachment
			}
			a := WithRelay(kernel, relay)
			if err := a.(Splicer).Splice(context.Background(), pipePair()); err != nil {
				t.Fatal(err)
			}
			if sk.spliced != tt.wantKernel || relay.spliced != tt.wantRelay {
				t.Fatalf("kernel spliced %d, relay %d; want %d, %d", sk.spliced, relay.spliced, tt.wantKernel, tt.wantRelay)
			}
			c := a.Counters()
			if c.Opened != 5 || c.BytesUp != 12 || c.Active != 1 || c.PacketsUp != 9 {
				t.Fatalf("counters %+v, want both sides' sums", c)
			}
			if n := len(a.(FlowLister).Flows()); n != 2 {
				t.Fatalf("%d flows, want one from each side", n)
			}
			if PicksNodes(a) {
				t.Fatal("PicksNodes: the kernel side does not pick nodes")
			}
			if reasons, err := a.(KernelReasoner).KernelReasons(); err != nil || reasons.Errors != nil {
				t.Fatalf("KernelReasons = %+v, %v; want none, nil", reasons, err)
			}
			a.Close()
			if sk.closed != 1 || relay.closed != 1 {
				t.Fatalf("closed kernel %d, relay %d times; want 1 each", sk.closed, relay.closed)
			}
		})
	}
}
