package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// Counters are one service's figures summed over all CPUs. Packets count
// GSO segments; bytes count TCP/UDP payload.
type Counters struct {
	PacketsUp, BytesUp     uint64 // client -> node
	PacketsDown, BytesDown uint64 // node -> client
	NewFlows               uint64
	SNATFailures           uint64 // new flows without a free SNAT port (passed to the stack)
	// Packets passed to the stack, by reason.
	PassFragment, PassIPOptions, PassNoRoute, PassNoFlow, PassNoNode uint64
	// Packets dropped, by reason.
	DropTTL, DropRewrite, DropConntrack uint64
	// How translated packets left.
	RedirectPeer, RedirectNeigh uint64
}

// GlobalCounters is the ID under which packets that match no service are
// counted (IP fragments other than the first).
const GlobalCounters ServiceID = 0

// Counters reads the counters of a service (or GlobalCounters).
func (l *Loader) Counters(id ServiceID) (Counters, error) {
	if uint32(id) >= natLimits.Services {
		return Counters{}, fmt.Errorf("counters of service %d: id out of range", id)
	}
	n := uint32(bpf.NATCounterCOUNTER_MAX)
	vals := make([]uint64, n)
	var perCPU []uint64
	for c := range n {
		if err := l.objs.EbpfwdCounters.Lookup(uint32(id)*n+c, &perCPU); err != nil {
			return Counters{}, fmt.Errorf("counters of service %d: read counter %d: %w", id, c, err)
		}
		for _, v := range perCPU {
			vals[c] += v
		}
	}
	return Counters{
		PacketsUp:     vals[bpf.NATCounterCOUNTER_PACKETS_UP],
		BytesUp:       vals[bpf.NATCounterCOUNTER_BYTES_UP],
		PacketsDown:   vals[bpf.NATCounterCOUNTER_PACKETS_DOWN],
		BytesDown:     vals[bpf.NATCounterCOUNTER_BYTES_DOWN],
		NewFlows:      vals[bpf.NATCounterCOUNTER_NEW_FLOWS],
		SNATFailures:  vals[bpf.NATCounterCOUNTER_SNAT_FAILURES],
		PassFragment:  vals[bpf.NATCounterCOUNTER_PASS_FRAGMENT],
		PassIPOptions: vals[bpf.NATCounterCOUNTER_PASS_IP_OPTIONS],
		PassNoRoute:   vals[bpf.NATCounterCOUNTER_PASS_NO_ROUTE],
		PassNoFlow:    vals[bpf.NATCounterCOUNTER_PASS_NO_FLOW],
		PassNoNode:    vals[bpf.NATCounterCOUNTER_PASS_NO_NODE],
		DropTTL:       vals[bpf.NATCounterCOUNTER_DROP_TTL],
		DropRewrite:   vals[bpf.NATCounterCOUNTER_DROP_REWRITE],
		DropConntrack: vals[bpf.NATCounterCOUNTER_DROP_CONNTRACK],
		RedirectPeer:  vals[bpf.NATCounterCOUNTER_REDIRECT_PEER],
		RedirectNeigh: vals[bpf.NATCounterCOUNTER_REDIRECT_NEIGH],
	}, nil
}

// FlowState is a flow's conntrack state.
type FlowState uint8

const (
	TCPSynSent     = FlowState(bpf.NATCtStateCT_TCP_SYN_SENT)
	TCPEstablished = FlowState(bpf.NATCtStateCT_TCP_ESTABLISHED)
	TCPClosing     = FlowState(bpf.NATCtStateCT_TCP_CLOSING)
	TCPReset       = FlowState(bpf.NATCtStateCT_TCP_RESET)
	UDP            = FlowState(bpf.NATCtStateCT_UDP)
)

func (s FlowState) String() string {
	switch s {
	case TCPSynSent:
		return "syn-sent"
	case TCPEstablished:
		return "established"
	case TCPClosing:
		return "closing"
	case TCPReset:
		return "reset"
	case UDP:
		return "udp"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Conn is one translated flow.
type Conn struct {
	Service ServiceID
	Network string         // "tcp" or "udp"
	Client  netip.AddrPort // as the client sees it: Client -> VIP
	VIP     netip.AddrPort
	SNAT    netip.AddrPort // as the node sees it: SNAT -> Node
	Node    netip.AddrPort
	State   FlowState
	Idle    time.Duration // since the last packet
	Age     time.Duration // since the first packet
	// Started is when the first packet passed, in wall-clock time: the
	// program's CLOCK_MONOTONIC stamp moved by the offset between that
	// clock and the wall clock, both read when the table was listed (no
	// assumption about boot time; a wall clock set since then moves it).
	Started time.Time
	Expired bool // past its timeout, waiting for garbage collection
	// L4 payload moved client -> node and back, as the program counted it
	// (a segment TCP retransmits counts again), and the packets (GSO
	// segments) that carried it.
	BytesUp, BytesDown     uint64
	PacketsUp, PacketsDown uint64
}

// Conns lists the conntrack table. The program keeps running while it is
// read, so a flow may appear or vanish meanwhile.
func (l *Loader) Conns() ([]Conn, error) {
	wall := time.Now()
	now, err := monotonicNow()
	if err != nil {
		return nil, err
	}
	var (
		conns []Conn
		key   bpf.NATTuple
		ct    bpf.NATCtEntry
	)
	it := l.objs.EbpfwdConntrack.Iterate()
	for it.Next(&key, &ct) {
		c := l.conn(key, ct, now)
		c.Started = wall.Add(-c.Age)
		conns = append(conns, c)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("list conntrack: %w", err)
	}
	return conns, nil
}

func (l *Loader) conn(key bpf.NATTuple, ct bpf.NATCtEntry, now uint64) Conn {
	network := "udp"
	if key.Proto == protoTCP {
		network = "tcp"
	}
	c := Conn{
		Service:     ServiceID(ct.ServiceId),
		Network:     network,
		Client:      netip.AddrPortFrom(bpf.AddrFrom(key.Src, key.Family), bpf.PortFrom(key.Sport)),
		VIP:         netip.AddrPortFrom(bpf.AddrFrom(key.Dst, key.Family), bpf.PortFrom(key.Dport)),
		SNAT:        netip.AddrPortFrom(bpf.AddrFrom(ct.Reply.Dst, key.Family), bpf.PortFrom(ct.Reply.Dport)),
		Node:        netip.AddrPortFrom(bpf.AddrFrom(ct.Reply.Src, key.Family), bpf.PortFrom(ct.Reply.Sport)),
		State:       FlowState(ct.State),
		BytesUp:     ct.BytesUp,
		BytesDown:   ct.BytesDown,
		PacketsUp:   ct.PacketsUp,
		PacketsDown: ct.PacketsDown,
	}
	if now > ct.LastSeenNs {
		c.Idle = time.Duration(now - ct.LastSeenNs)
	}
	if now > ct.CreatedNs {
		c.Age = time.Duration(now - ct.CreatedNs)
	}
	c.Expired = c.Idle > l.timeout(ct)
	return c
}

// timeout mirrors ct_timeout in bpf/lib/conntrack.h.
func (l *Loader) timeout(ct bpf.NATCtEntry) time.Duration {
	switch FlowState(ct.State) {
	case TCPSynSent:
		return l.cfg.TCPSynTimeout
	case TCPClosing:
		return l.cfg.TCPClosingTimeout
	case TCPReset:
		return l.cfg.TCPResetTimeout
	}
	return time.Duration(ct.IdleTimeoutNs)
}

// CollectGarbage deletes expired flows from both conntrack maps, and reverse
// entries whose flow is gone (LRU eviction, lost races), and returns how many
// flows it removed. The program ignores expired entries on its own; this
// keeps their SNAT ports and map slots from waiting for eviction.
func (l *Loader) CollectGarbage() (int, error) {
	now, err := monotonicNow()
	if err != nil {
		return 0, err
	}
	var (
		key     bpf.NATTuple
		ct      bpf.NATCtEntry
		expired []bpf.NATTuple
	)
	it := l.objs.EbpfwdConntrack.Iterate()
	for it.Next(&key, &ct) {
		if l.conn(key, ct, now).Expired {
			expired = append(expired, key)
		}
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("collect garbage: walk conntrack: %w", err)
	}
	var errs []error
	removed := 0
	for _, k := range expired {
		gone, err := l.deleteExpired(k, now)
		if err != nil {
			errs = append(errs, err)
		}
		if gone {
			removed++
		}
	}

	var reply, orig bpf.NATTuple
	var orphans []bpf.NATTuple
	rit := l.objs.EbpfwdReverse.Iterate()
	for rit.Next(&reply, &orig) {
		if err := l.objs.EbpfwdConntrack.Lookup(orig, &ct); err != nil || ct.Reply != reply {
			orphans = append(orphans, reply)
		}
	}
	if err := rit.Err(); err != nil {
		errs = append(errs, fmt.Errorf("walk reverse conntrack: %w", err))
	}
	for _, r := range orphans {
		// new_flow reserves the reply tuple just before it records the
		// flow: look again so that such a flow is not cut in half.
		if err := l.objs.EbpfwdReverse.Lookup(r, &orig); err != nil {
			continue
		}
		if err := l.objs.EbpfwdConntrack.Lookup(orig, &ct); err == nil && ct.Reply == r {
			continue
		}
		if err := l.objs.EbpfwdReverse.Delete(r); err != nil && !isNotExist(err) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("collect garbage: %w", err)
	}
	return removed, nil
}

// deleteExpired deletes the flow key if it is still expired, and its
// reverse entry if that still belongs to it. The walk that found the flow
// expired may be long over: meanwhile the program may have replaced it (its
// client reused the tuple) or given its SNAT port to a new flow
// (reclaim_if_stale). Deleting blindly what the walk saw would then cut
// the new flow: its node's replies would find no reverse entry. Each entry
// is therefore checked right before it goes, which leaves a window of one
// syscall instead of the whole walk.
func (l *Loader) deleteExpired(key bpf.NATTuple, now uint64) (bool, error) {
	var ct bpf.NATCtEntry
	if err := l.objs.EbpfwdConntrack.Lookup(key, &ct); err != nil {
		if isNotExist(err) {
			return false, nil
		}
		return false, fmt.Errorf("look up expired flow: %w", err)
	}
	if !l.conn(key, ct, now).Expired {
		return false, nil // a new flow on the same tuple
	}
	if err := l.objs.EbpfwdConntrack.Delete(key); err != nil {
		if isNotExist(err) {
			return false, nil
		}
		return false, fmt.Errorf("delete expired flow: %w", err)
	}
	// An orphan reverse entry is harmless (the program reclaims it), so
	// a failed check below only delays freeing the port.
	var orig bpf.NATTuple
	if err := l.objs.EbpfwdReverse.Lookup(ct.Reply, &orig); err == nil && orig == key {
		if err := l.objs.EbpfwdReverse.Delete(ct.Reply); err != nil && !isNotExist(err) {
			return true, fmt.Errorf("delete reverse entry of expired flow: %w", err)
		}
	}
	return true, nil
}

func isNotExist(err error) bool { return errors.Is(err, ebpf.ErrKeyNotExist) }

// monotonicNow is bpf_ktime_get_ns as userspace sees it.
func monotonicNow() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("read CLOCK_MONOTONIC: %w", err)
	}
	return uint64(ts.Nano()), nil
}

// ProgramStats is the kernel's accounting of the NAT program: run time and
// run count, which it keeps only while BPF statistics are enabled
// (kernel.bpf_stats_enabled, or a process holding ebpf.EnableStats).
func (l *Loader) ProgramStats() (name string, runTime time.Duration, runs uint64, err error) {
	st, err := l.objs.EbpfwdNat.Stats()
	if err != nil {
		return "", 0, 0, fmt.Errorf("read NAT program stats: %w", err)
	}
	return bpf.NATProgEbpfwdNat, st.Runtime, st.RunCount, nil
}
