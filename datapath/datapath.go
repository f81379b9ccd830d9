// Package datapath is the contract every ebpfwd datapath implements, and
// nothing else: what a service is to a datapath (Service), what a datapath
// answers the planner (Datapath: does it apply, does the kernel allow it,
// how fast is it), what it returns once set up (Attachment), and the
// optional abilities an attachment may have (listing flows, forwarding
// packets, reporting BPF programs...).
//
// The daemon plans each service with a Set: the registered datapaths are
// asked in rank order (tc, sockmap, userspace) and the first that applies
// carries the service. Kernel datapaths never carry a socket themselves:
// a Set gives each of their attachments the relay's (WithRelay), which
// serves what the kernel leaves to a socket, so fallback to the userspace
// relay is one mechanism every kernel datapath gets. Adding a datapath is
// registering it in the Set; no daemon code changes.
package datapath

import (
	"context"
	"net"
	"net/netip"
	"time"

	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
)

// Kind names a datapath as it is written in configuration (`datapath:` metadata).
type Kind string

const (
	// Userspace is the splice(2)-based relay: always available.
	Userspace Kind = "userspace"
	// TC is eBPF NAT at tcx that moves packets between namespaces.
	TC Kind = "tc"
	// Sockmap splices accepted/dialed socket pairs in the kernel via sk_skb.
	Sockmap Kind = "sockmap"
	// Auto picks the fastest datapath that applies.
	Auto Kind = "auto"
)

// Service is what a datapath needs to know about one service: typed values,
// parsed once from configuration, free of any configuration syntax.
type Service struct {
	Name    string
	Network string // "tcp" or "udp"
	// Addr is the listen address as configured (host:port, the host
	// possibly empty); Listen is the same address when its host is an IP
	// literal, and the zero AddrPort otherwise.
	Addr     string
	Listen   netip.AddrPort
	ListenNS netns.NS // namespace the service listens in
	OutNS    netns.NS // namespace nodes (or the first hop) are dialed from
	Nodes    []Node   // forward targets (empty for proxy services)
	Strategy selector.Strategy
	// MaxFails is the selector's maxFails (at least 1): a datapath that
	// judges nodes itself (PassiveHealthReporter) may stop choosing a node
	// that failed this many new flows in a row before the daemon's next
	// look, so that no more than this many fail.
	MaxFails int
	// Chained: traffic leaves through a chain of proxy hops.
	Chained bool
	// Proxy: an HTTP proxy service; each client names its own target.
	Proxy bool
	// IdleTimeout closes a TCP stream (or forgets a kernel TCP flow) when
	// no byte moved either way for this long. 0 means never, on every
	// datapath.
	IdleTimeout time.Duration
	// PacketTTL expires a UDP session (or kernel UDP flow) after this
	// long without traffic.
	PacketTTL time.Duration
	// Limit bounds the UDP sessions a datapath opens sockets for (the
	// service's fd budget share); nil bounds nothing. TCP streams are
	// admitted by the daemon before they reach the datapath.
	Limit *Limit
	// Admit, when set, is asked before each new UDP session too, after
	// Limit: the service's GOST climiter and rlimiter. It returns the
	// release to call once when the session ends, or false (counted by
	// the daemon) when the session must not start. It must not block.
	Admit func(client netip.Addr) (release func(), ok bool)
	// Limiters names the GOST limiters the service has (limiter,
	// climiter, rlimiter), for a datapath that cannot enforce them to say
	// so in Applies: the userspace relay enforces them all.
	Limiters []string
	// PacketKeepAlive keeps a UDP session after it answered the client;
	// false ends a session with its first reply (GOST's default).
	PacketKeepAlive bool
	// PacketReadSize cuts client datagrams longer than this many bytes
	// (GOST's listener readBufferSize); 0 passes whole datagrams.
	PacketReadSize int
	// AcceptProxyHeader: every stream opens with a PROXY protocol header
	// naming the real client, which the service reads and strips.
	AcceptProxyHeader bool
	// SendProxyHeader is the PROXY protocol version (1, 2) sent to the node
	// or first hop before the client's bytes; 0 none.
	SendProxyHeader int
}

// Node is one forward target of a service.
type Node struct {
	Name string
	// Addr is host:port as configured, what userspace dials (the host may
	// be a name, resolved in the dialing namespace); IP is the same
	// address when its host is an IP literal, the zero AddrPort otherwise.
	Addr string
	IP   netip.AddrPort
}

// Datapath is the interface tc, sockmap and userspace implement: what the
// planner asks, and how a service is set up.
type Datapath interface {
	// Kind names the datapath.
	Kind() Kind
	// Rank orders datapaths for `auto`: lower is faster, tried first.
	Rank() int
	// Applies says why the datapath cannot carry svc, or nil when it can.
	// It may look into the service's namespaces but changes nothing.
	Applies(svc Service) error
	// Probe says why this kernel (or these privileges) cannot run the
	// datapath at all, or nil.
	Probe() error
	// Setup prepares the datapath for one service. It returns an Attachment
	// that owns everything set up for it.
	Setup(ctx context.Context, svc Service) (Attachment, error)
}

// Attachment is a datapath prepared for one service.
type Attachment interface {
	// Counters returns the service's figures so far.
	Counters() Counters
	// Close removes whatever Setup attached. Streams in flight end.
	Close() error
}

// Splicer is an attachment that moves the bytes of accepted-and-dialed
// stream pairs: the relay always, a kernel datapath that takes sockets
// (sockmap) when it can.
type Splicer interface {
	// Splice takes ownership of both connections of s and moves bytes
	// between them until both directions are done, propagating half-close.
	// It closes both connections before it returns. The returned error is
	// nil for a clean end. A kernel attachment that cannot take s returns
	// an error wrapping ErrFallback before it touched either connection,
	// and the relay carries s instead.
	Splice(ctx context.Context, s Stream) error
}

// Counters are cumulative figures for one service on one datapath.
type Counters struct {
	Opened    uint64 // streams, flows or datagram sessions started
	Active    int64  // streams, flows or sessions open now
	BytesUp   uint64 // client -> node
	BytesDown uint64 // node -> client
	Errors    uint64 // streams that ended in an error
	Dropped   uint64 // datagrams dropped (session limit, dial failure)
	// Packets moved in the kernel (tc); 0 for datapaths that move bytes
	// through sockets.
	PacketsUp, PacketsDown uint64
}

// Stream describes one accepted-and-dialed connection pair.
type Stream struct {
	Client   net.Conn       // accepted from the client
	Upstream net.Conn       // dialed to the node (possibly through hops)
	Peer     netip.AddrPort // the client's address, for logs
	Node     string         // the node name, for logs
	// Up and Down are the bandwidth limits of the stream (GOST's
	// limiter): client -> node and node -> client. A Splicer that cannot
	// hold a stream to them returns ErrFallback.
	Up, Down []Bucket
}

// Bucket is a token bucket of bytes (golang.org/x/time/rate's Limiter):
// a direction that moved n bytes waits for n tokens.
type Bucket interface {
	WaitN(ctx context.Context, n int) error
	Burst() int
}

// PacketDialer opens the upstream socket of a new datagram session for the
// client at addr: it picks the node and dials it in the right namespace,
// and returns the node's name with the socket (for listing the session).
type PacketDialer func(ctx context.Context, client net.Addr) (conn net.Conn, node string, err error)

// PacketForwarder is implemented by attachments that forward datagrams of a
// UDP service from its listening socket themselves.
type PacketForwarder interface {
	// ServePackets forwards datagrams arriving on pc, one session per
	// client address, until ctx is done or pc is closed.
	ServePackets(ctx context.Context, pc net.PacketConn, dial PacketDialer) error
}

// PacketReadStopper is a PacketForwarder that can stop reading its socket
// while the sessions it has open go on answering through it, until they
// expire and ServePackets returns: what an upgrade needs, since the new
// process shares the socket and reads from then on.
type PacketReadStopper interface {
	StopReadingPackets()
}

// Flow is one connection or flow as a datapath sees it, for listing.
type Flow struct {
	Service   string    `json:"service"`
	Datapath  Kind      `json:"datapath"`
	Network   string    `json:"network"`            // "tcp" or "udp"
	Client    string    `json:"client"`             // client address:port
	Node      string    `json:"node,omitempty"`     // node name ("" when unknown, e.g. proxy targets)
	Upstream  string    `json:"upstream,omitempty"` // address the datapath reaches the node at
	State     string    `json:"state,omitempty"`    // e.g. "established"; datapath-specific
	Started   time.Time `json:"started"`
	BytesUp   uint64    `json:"bytes_up"`   // L4 payload client -> node
	BytesDown uint64    `json:"bytes_down"` // L4 payload node -> client
	// Packets each way where the datapath counts them: tc flows (GSO
	// segments) and UDP sessions (datagrams); absent for relayed streams.
	PacketsUp   uint64 `json:"packets_up,omitempty"`
	PacketsDown uint64 `json:"packets_down,omitempty"`
}

// FlowLister is implemented by attachments that can list their flows.
type FlowLister interface {
	Flows() []Flow
}

// FlowTable is a datapath's state table for one service: UDP sessions for
// userspace, conntrack for tc.
type FlowTable struct {
	Name     string
	Entries  uint64
	Capacity uint64
}

// FlowTabler is implemented by attachments that keep a flow table.
type FlowTabler interface {
	FlowTables() []FlowTable
}

// ProgramStats is the kernel's accounting of one BPF program.
type ProgramStats struct {
	Program  string // the program's name
	Netns    string // where it is attached
	RunTime  time.Duration
	RunCount uint64
}

// ProgramReporter is implemented by datapaths that load BPF programs.
type ProgramReporter interface {
	Programs() []ProgramStats
}

// NodeHealthSetter is implemented by attachments that choose nodes
// themselves (tc, in BPF): the daemon tells them which nodes its
// maxFails/failTimeout marking considers dead. index is the node's position
// in Service.Nodes.
type NodeHealthSetter interface {
	SetNodeHealthy(index int, healthy bool) error
}

// NodeOutcomes are what a datapath that picks nodes itself saw of one
// node's new flows, counted since the node took its place in the service.
type NodeOutcomes struct {
	// Failed counts failed new flows by reason (Fail*, a metric label).
	Failed map[string]uint64
	// Answered counts new flows the node took.
	Answered uint64
	// Streak is the node's run of failed flows now (0 after an answer).
	Streak uint64
}

// Reasons of NodeOutcomes.Failed.
const (
	FailRefused     = "refused"     // the node reset the connection's SYN
	FailUnreachable = "unreachable" // an ICMP destination unreachable came back
	FailSYNTimeout  = "syn_timeout" // the client sent its SYN again, unanswered
)

// PassiveHealthReporter is implemented by attachments whose datapath
// judges nodes by their flows (tc, in BPF), so that the daemon's
// maxFails/failTimeout marking learns of failures it never dialed. The
// slice is in Service.Nodes order.
type PassiveHealthReporter interface {
	NodeOutcomes() ([]NodeOutcomes, error)
}

// KernelReasons are a kernel datapath's per-service counts of what went
// wrong or was not its to handle, by a short reason (a metric label).
type KernelReasons struct {
	Errors  map[string]uint64 // new flows that failed (e.g. snat_exhausted, map_full)
	Passed  map[string]uint64 // packets left to the stack (e.g. fragment, no_route)
	Dropped map[string]uint64 // packets dropped (e.g. ttl_exceeded)
}

// KernelReasoner is implemented by attachments whose kernel side counts
// reasons.
type KernelReasoner interface {
	KernelReasons() (KernelReasons, error)
}
