package daemon

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/proxyproto"
	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

// Reason classifies a failed connection for logs and metrics. The set is
// small and fixed so that it can be a metric label.
type Reason string

const (
	ReasonRefused     Reason = "dial_refused"
	ReasonTimeout     Reason = "timeout"
	ReasonUnreachable Reason = "unreachable"
	ReasonResolve     Reason = "resolve"
	ReasonNetnsGone   Reason = "netns_gone"
	ReasonHopAuth     Reason = "hop_407"
	ReasonHopGateway  Reason = "hop_502"
	ReasonHopStatus   Reason = "hop_status"
	ReasonHopProtocol Reason = "hop_protocol"
	ReasonHopClosed   Reason = "hop_closed"
	ReasonReset       Reason = "reset"
	ReasonIdle        Reason = "idle_timeout"
	ReasonAccept      Reason = "accept"
	// ReasonLocal is a failure of this host, not of the node: out of file
	// descriptors (EMFILE, ENFILE), buffers or memory (ENOBUFS, ENOMEM).
	ReasonLocal Reason = "local_resources"
	// ReasonFDBudget is a connection (TCP) or a new client's datagram
	// (UDP) refused because the service holds its whole share of the fd
	// budget (see budget.go).
	ReasonFDBudget Reason = "fd_budget"
	// ReasonConnLimit and ReasonRateLimit are connections (or new UDP
	// sessions) the service's GOST climiter or rlimiter refused.
	ReasonConnLimit Reason = "conn_limit"
	ReasonRateLimit Reason = "rate_limit"
	// A service with proxyProtocol closed a connection that did not open
	// with a PROXY header, opened with a broken one, or sent none in time.
	ReasonProxyMissing   Reason = "proxy_header_missing"
	ReasonProxyMalformed Reason = "proxy_header_malformed"
	ReasonProxyTimeout   Reason = "proxy_header_timeout"
	ReasonOther          Reason = "other"
)

// Reasons lists every Reason, so that metrics can show each at zero before
// it first happens (a rate() over a series that appears with its first
// event misses that event).
var Reasons = []Reason{ReasonRefused, ReasonTimeout, ReasonUnreachable, ReasonResolve, ReasonNetnsGone,
	ReasonHopAuth, ReasonHopGateway, ReasonHopStatus, ReasonHopProtocol, ReasonHopClosed, ReasonReset,
	ReasonIdle, ReasonAccept, ReasonLocal, ReasonFDBudget, ReasonConnLimit, ReasonRateLimit,
	ReasonProxyMissing, ReasonProxyMalformed, ReasonProxyTimeout, ReasonOther}

// reasonOf maps an error from dialing or relaying to its Reason.
func reasonOf(err error) Reason {
	var se *httpconnect.StatusError
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, netns.ErrGone):
		return ReasonNetnsGone
	case errors.Is(err, proxyproto.ErrNoHeader):
		return ReasonProxyMissing
	case errors.Is(err, proxyproto.ErrMalformed):
		return ReasonProxyMalformed
	case errors.Is(err, proxyproto.ErrTimeout):
		return ReasonProxyTimeout
	case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE),
		errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.ENOMEM):
		return ReasonLocal
	case errors.Is(err, relay.ErrIdleTimeout):
		return ReasonIdle
	case errors.Is(err, httpconnect.ErrProxyAuthRequired):
		return ReasonHopAuth
	case errors.As(err, &se):
		if se.Code == 502 || se.Code == 503 || se.Code == 504 {
			return ReasonHopGateway
		}
		return ReasonHopStatus
	case errors.Is(err, httpconnect.ErrMalformedResponse):
		return ReasonHopProtocol
	case errors.Is(err, io.ErrUnexpectedEOF):
		return ReasonHopClosed
	case errors.Is(err, syscall.ECONNREFUSED):
		return ReasonRefused
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return ReasonReset
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return ReasonUnreachable
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded):
		return ReasonTimeout
	case errors.As(err, &dnsErr):
		return ReasonResolve
	}
	return ReasonOther
}

// nodesFault reports whether a failed dial or probe says something about
// the node. A host out of descriptors or memory, or a namespace that is
// gone, fails every node alike: marking them dead would send their new
// flows to a listener that is out of the same resources, and keep them
// away after the host recovered.
func nodesFault(err error) bool {
	switch reasonOf(err) {
	case ReasonLocal, ReasonNetnsGone:
		return false
	}
	return true
}

// Errors counts failures of one service by reason.
type Errors struct {
	m sync.Map // Reason -> *atomic.Uint64
}

// Add counts one failure.
func (e *Errors) Add(r Reason) {
	v, ok := e.m.Load(r)
	if !ok {
		v, _ = e.m.LoadOrStore(r, new(atomic.Uint64))
	}
	v.(*atomic.Uint64).Add(1)
}

// Snapshot returns the counts so far.
func (e *Errors) Snapshot() map[Reason]uint64 {
	out := map[Reason]uint64{}
	e.m.Range(func(k, v any) bool {
		out[k.(Reason)] = v.(*atomic.Uint64).Load()
		return true
	})
	return out
}
