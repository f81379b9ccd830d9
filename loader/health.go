package loader

import (
	"fmt"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// NodeHealth is what the program saw of one node's new flows (bpf/lib/health.h),
// counted since the node was put at its index.
type NodeHealth struct {
	// Failed flows by kind: an RST in reply to the SYN (Refused), an
	// ICMP destination unreachable (Unreachable: a new TCP flow's, or any
	// of a UDP flow's), the client's SYN sent again unanswered past the
	// program's bound (SYNTimeout).
	Refused, Unreachable, SYNTimeout uint64
	// Answered flows: a SYN-ACK, or a UDP flow's first reply.
	Answered uint64
	// Streak is the node's current run of failed flows, which took it out
	// of the program's choice at the service's MaxFails.
	Streak uint64
}

// Failed is the node's failed flows of every kind.
func (h NodeHealth) Failed() uint64 { return h.Refused + h.Unreachable + h.SYNTimeout }

// NodeHealth reads what the program saw of every node of a service, in
// node order. The streak is read before the counters, so that the counters
// include every failure of the streak.
func (l *Loader) NodeHealth(id ServiceID) ([]NodeHealth, error) {
	l.mu.Lock()
	st, ok := l.services[id]
	l.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("node health of service %d: no such service", id)
	}
	out := make([]NodeHealth, st.nodes)
	for i := range out {
		key := bpf.NATNodeKey{ServiceId: uint32(id), Index: uint32(i)}
		var n bpf.NATNode
		if err := l.objs.EbpfwdNodes.Lookup(key, &n); err != nil {
			return nil, fmt.Errorf("node health of node %d of service %d: %w", i, id, err)
		}
		out[i].Streak = uint64(n.Fails)
		var perCPU []bpf.NATNodeEvents
		switch err := l.objs.EbpfwdNodeEvents.Lookup(key, &perCPU); {
		case isNotExist(err):
			continue // no event yet: the program creates the entry with the first
		case err != nil:
			return nil, fmt.Errorf("node health of node %d of service %d: %w", i, id, err)
		}
		for _, c := range perCPU {
			out[i].Refused += c.N[bpf.NATNodeEventNODE_FAIL_REFUSED]
			out[i].Unreachable += c.N[bpf.NATNodeEventNODE_FAIL_UNREACHABLE]
			out[i].SYNTimeout += c.N[bpf.NATNodeEventNODE_FAIL_SYN_TIMEOUT]
			out[i].Answered += c.N[bpf.NATNodeEventNODE_ANSWERED]
		}
	}
	return out, nil
}

// deleteNodeEvents forgets a node slot's events. Failing to is harmless
// beyond the counts (the entry stays until the slot is deleted again), so
// it is not an error of the caller's.
func (l *Loader) deleteNodeEvents(key bpf.NATNodeKey) {
	if err := l.objs.EbpfwdNodeEvents.Delete(key); err != nil && !isNotExist(err) {
		l.cfg.logger().Debug("delete node events", "service", key.ServiceId, "node", key.Index, "err", err)
	}
}
