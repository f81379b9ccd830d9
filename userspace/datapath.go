// Package userspace is the always-available datapath: accepted and dialed
// sockets are joined by a splice(2) relay (see relay), and UDP services get
// per-client sessions. It is the fallback when BPF is not available and the
// datapath for services whose traffic goes through proxy hops.
package userspace

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

// Datapath implements datapath.Datapath with the userspace relay.
type Datapath struct {
	Logger *slog.Logger
}

var _ datapath.Datapath = Datapath{}

// Kind reports datapath.Userspace.
func (Datapath) Kind() datapath.Kind { return datapath.Userspace }

// Rank puts the relay last: it always applies, so `auto` takes it only when
// no kernel datapath does.
func (Datapath) Rank() int { return 100 }

// Applies: the relay carries every service.
func (Datapath) Applies(datapath.Service) error { return nil }

// Probe: the relay needs nothing from the kernel beyond sockets.
func (Datapath) Probe() error { return nil }

// Setup needs nothing from the kernel: it only prepares the counters.
func (d Datapath) Setup(_ context.Context, svc datapath.Service) (datapath.Attachment, error) {
	logger := d.Logger
	if logger == nil {
		logger = slog.Default()
	}
	return &attachment{svc: svc, logger: logger.With("service", svc.Name, "datapath", datapath.Userspace)}, nil
}

type attachment struct {
	svc    datapath.Service
	logger *slog.Logger
	counts relay.Counts

	opened, errors atomic.Uint64
	active         atomic.Int64
	udp            atomic.Pointer[relay.UDP]

	// streams holds the live TCP streams for listing (ebpfwd conns): one
	// map insert and delete per connection, nothing per byte.
	streams  sync.Map // uint64 -> *stream
	streamID atomic.Uint64
}

// stream is one live TCP stream.
type stream struct {
	s       datapath.Stream
	started time.Time
	counts  relay.Counts
}

var (
	_ datapath.PacketForwarder = (*attachment)(nil)
	_ datapath.FlowLister      = (*attachment)(nil)
	_ datapath.FlowTabler      = (*attachment)(nil)
)

// Splice relays one stream and logs its own byte counts when it ends: at
// debug level for a clean end, at info level with the error otherwise.
func (a *attachment) Splice(ctx context.Context, s datapath.Stream) error {
	a.opened.Add(1)
	a.active.Add(1)
	defer a.active.Add(-1)
	st := &stream{s: s, started: time.Now()}
	st.counts.Total = &a.counts
	id := a.streamID.Add(1)
	a.streams.Store(id, st)
	defer a.streams.Delete(id)
	err := relay.TCPWith(ctx, s.Client, s.Upstream, relay.Options{Idle: a.svc.IdleTimeout, Counts: &st.counts, Up: s.Up, Down: s.Down})
	attrs := []any{"client", s.Peer, "node", s.Node, "up_bytes", st.counts.Up.Load(), "down_bytes", st.counts.Down.Load(),
		"duration", time.Since(st.started).Round(time.Millisecond)}
	switch {
	case err == nil:
		a.logger.Debug("connection closed", attrs...)
	case errors.Is(err, context.Canceled):
		a.logger.Info("connection closed at shutdown", attrs...)
	default:
		a.errors.Add(1)
		a.logger.Info("connection ended with error", append(attrs, "err", err)...)
	}
	return err
}

func (a *attachment) ServePackets(ctx context.Context, pc net.PacketConn, dial datapath.PacketDialer) error {
	u := &relay.UDP{
		Conn: pc,
		Dial: dial,
		TTL:  a.svc.PacketTTL,
		// GOST's udp listener without keepAlive answers once per session.
		OneReply: !a.svc.PacketKeepAlive,
		ReadSize: a.svc.PacketReadSize,
		Counts:   &a.counts,
		Logger:   a.logger,
		OnSession: func(opened bool) {
			if opened {
				a.opened.Add(1)
				a.active.Add(1)
			} else {
				a.active.Add(-1)
			}
		},
		OnError: func(error) { a.errors.Add(1) },
	}
	if l, admit := a.svc.Limit, a.svc.Admit; l != nil || admit != nil {
		u.Admit = func(client netip.AddrPort) (func(), bool) {
			// Each session holds one socket: beyond the service's fd
			// budget a new client's datagram is dropped, so a flood of
			// source ports cannot take the descriptors other services
			// and the daemon itself need.
			if l != nil && !l.Acquire() {
				l.LogRefusal(a.logger, "udp session")
				return nil, false
			}
			release := func() {}
			if admit != nil {
				var ok bool
				if release, ok = admit(client.Addr()); !ok {
					if l != nil {
						l.Release()
					}
					return nil, false
				}
			}
			return func() {
				release()
				if l != nil {
					l.Release()
				}
			}, true
		}
	}
	a.udp.Store(u)
	return u.Serve(ctx)
}

// FlowTables reports the UDP session table of a UDP service.
// StopReadingPackets stops the running UDP relay's reads (relay.UDP's
// StopReading); its sessions answer until they expire.
func (a *attachment) StopReadingPackets() {
	if u := a.udp.Load(); u != nil {
		u.StopReading()
	}
}

func (a *attachment) FlowTables() []datapath.FlowTable {
	if a.svc.Network != "udp" {
		return nil
	}
	// OnSession keeps active equal to the session table's size.
	n := uint64(max(a.active.Load(), 0))
	capacity := uint64(relay.DefaultMaxUDPSessions)
	if l := a.svc.Limit; l != nil {
		capacity = min(capacity, uint64(max(l.Capacity(), 0)))
	}
	return []datapath.FlowTable{{Name: "udp_sessions", Entries: n, Capacity: capacity}}
}

// Flows lists the live TCP streams and UDP sessions.
func (a *attachment) Flows() []datapath.Flow {
	var out []datapath.Flow
	a.streams.Range(func(_, v any) bool {
		st := v.(*stream)
		out = append(out, datapath.Flow{
			Service: a.svc.Name, Datapath: datapath.Userspace, Network: "tcp",
			Client: st.s.Peer.String(), Node: st.s.Node, Upstream: st.s.Upstream.RemoteAddr().String(),
			State: "established", Started: st.started,
			BytesUp: st.counts.Up.Load(), BytesDown: st.counts.Down.Load(),
		})
		return true
	})
	if u := a.udp.Load(); u != nil {
		for _, ss := range u.Sessions() {
			out = append(out, datapath.Flow{
				Service: a.svc.Name, Datapath: datapath.Userspace, Network: "udp",
				Client: ss.Client.String(), Node: ss.Node, Upstream: ss.Upstream,
				State: "idle " + ss.Idle.Round(time.Millisecond).String(), Started: ss.Started,
				BytesUp: ss.BytesUp, BytesDown: ss.BytesDown, PacketsUp: ss.DatagramsUp, PacketsDown: ss.DatagramsDown,
			})
		}
	}
	return out
}

func (a *attachment) Counters() datapath.Counters {
	c := datapath.Counters{
		Opened:    a.opened.Load(),
		Active:    a.active.Load(),
		BytesUp:   a.counts.Up.Load(),
		BytesDown: a.counts.Down.Load(),
		Errors:    a.errors.Load(),
	}
	if u := a.udp.Load(); u != nil {
		c.Dropped = u.Dropped()
	}
	return c
}

// Close has nothing to detach: streams end when the daemon cancels their
// context.
func (a *attachment) Close() error { return nil }
