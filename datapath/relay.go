package datapath

import (
	"context"
	"errors"
	"net"
	"sync"
)

// WithRelay joins a kernel datapath's attachment with the relay's
// attachment for the same service: streams go to the kernel attachment
// when it splices streams itself (sockmap) and to the relay when it does
// not, or hands one back (ErrFallback); datagrams reaching the service's
// socket go to the relay; counters, flows and flow tables are the sum of
// both; the kernel's own abilities (node health, reasons, flow listing)
// stay reachable. Close closes both.
func WithRelay(kernel, relay Attachment) Attachment {
	return &relayed{kernel: kernel, relay: relay}
}

type relayed struct {
	kernel, relay Attachment
	closeKernel   sync.Once
	kernelErr     error
}

// CloseKernel closes the kernel datapath's attachment only: the relay's
// keeps carrying its streams (an upgrade hands the kernel state to a new
// process while the old one finishes its connections). Close later closes
// the relay's; the kernel's is closed once.
func (r *relayed) CloseKernel() error {
	r.closeKernel.Do(func() { r.kernelErr = r.kernel.Close() })
	return r.kernelErr
}

var (
	_ Splicer           = (*relayed)(nil)
	_ PacketForwarder   = (*relayed)(nil)
	_ PacketReadStopper = (*relayed)(nil)
	_ FlowLister        = (*relayed)(nil)
	_ FlowTabler        = (*relayed)(nil)
	_ NodeHealthSetter  = (*relayed)(nil)
	_ KernelReasoner    = (*relayed)(nil)
)

// Kernel returns the kernel datapath's own attachment.
func (r *relayed) Kernel() Attachment { return r.kernel }

func (r *relayed) Splice(ctx context.Context, s Stream) error {
	if sp, ok := r.kernel.(Splicer); ok {
		err := sp.Splice(ctx, s)
		if !errors.Is(err, ErrFallback) {
			return err
		}
	}
	sp, ok := r.relay.(Splicer)
	if !ok {
		s.Client.Close()
		s.Upstream.Close()
		return errors.New("the relay cannot splice streams")
	}
	return sp.Splice(ctx, s)
}

func (r *relayed) ServePackets(ctx context.Context, pc net.PacketConn, dial PacketDialer) error {
	pf, ok := r.relay.(PacketForwarder)
	if !ok {
		return errors.New("the relay cannot forward packets")
	}
	return pf.ServePackets(ctx, pc, dial)
}

func (r *relayed) StopReadingPackets() {
	if st, ok := r.relay.(PacketReadStopper); ok {
		st.StopReadingPackets()
	}
}

func (r *relayed) Counters() Counters {
	k, u := r.kernel.Counters(), r.relay.Counters()
	return Counters{
		Opened: k.Opened + u.Opened, Active: k.Active + u.Active,
		BytesUp: k.BytesUp + u.BytesUp, BytesDown: k.BytesDown + u.BytesDown,
		Errors: k.Errors + u.Errors, Dropped: k.Dropped + u.Dropped,
		PacketsUp: k.PacketsUp + u.PacketsUp, PacketsDown: k.PacketsDown + u.PacketsDown,
	}
}

func (r *relayed) Flows() []Flow {
	var out []Flow
	for _, a := range []Attachment{r.relay, r.kernel} {
		if fl, ok := a.(FlowLister); ok {
			out = append(out, fl.Flows()...)
		}
	}
	return out
}

func (r *relayed) FlowTables() []FlowTable {
	var out []FlowTable
	for _, a := range []Attachment{r.relay, r.kernel} {
		if ft, ok := a.(FlowTabler); ok {
			out = append(out, ft.FlowTables()...)
		}
	}
	return out
}

// errNoKernelAbility is what SetNodeHealthy answers when the kernel side
// does not pick nodes; callers ask PicksNodes first.
var errNoKernelAbility = errors.New("the kernel datapath does not pick nodes")

func (r *relayed) SetNodeHealthy(index int, healthy bool) error {
	if hs, ok := r.kernel.(NodeHealthSetter); ok {
		return hs.SetNodeHealthy(index, healthy)
	}
	return errNoKernelAbility
}

func (r *relayed) KernelReasons() (KernelReasons, error) {
	if kr, ok := r.kernel.(KernelReasoner); ok {
		return kr.KernelReasons()
	}
	return KernelReasons{}, nil // nothing counted, nothing wrong
}

// PicksNodes reports whether the attachment's kernel side chooses nodes
// itself (and so needs the daemon's health marking pushed to it).
func PicksNodes(a Attachment) bool {
	if r, ok := a.(*relayed); ok {
		a = r.kernel
	}
	_, ok := a.(NodeHealthSetter)
	return ok
}

// NodeJudge returns the attachment's kernel side when it judges nodes by
// their flows, nil otherwise.
func NodeJudge(a Attachment) PassiveHealthReporter {
	if r, ok := a.(*relayed); ok {
		a = r.kernel
	}
	ph, _ := a.(PassiveHealthReporter)
	return ph
}

func (r *relayed) Close() error {
	return errors.Join(r.CloseKernel(), r.relay.Close())
}
