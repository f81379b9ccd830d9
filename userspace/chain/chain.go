// Package chain dials a target through a chain of HTTP CONNECT proxy hops,
// as GOST does: hop 1 is dialed directly (inside its namespace), and every
// later hop and then the target are reached by a CONNECT tunnelled through
// the hops before it.
package chain

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/proxyproto"
)

// Node is one proxy of a hop.
type Node struct {
	Name string
	Addr string
	// NS is the namespace this node is dialed from when it is the first
	// hop; unset (own) means: the hop's, else the caller's default.
	NS   netns.NS
	Auth *httpconnect.Auth
	// ProxyProtocol is the PROXY protocol version (1, 2) sent to this node
	// right after dialing it, when its hop is the first; 0 none.
	ProxyProtocol int
}

// Hop is one level of a chain with its node group.
type Hop struct {
	Name     string
	NS       netns.NS // namespace for dialing this hop's nodes when first
	Selector *selector.Selector[*Node]
}

// Chain is an ordered list of hops.
type Chain struct {
	Name string
	Hops []*Hop
}

// Request is one dial through the chain.
type Request struct {
	Target    string   // host:port the last hop CONNECTs to
	Key       string   // hash-strategy key (the client's IP)
	DefaultNS netns.NS // namespace for hop 1 when neither hop nor node sets one
	// Observe, when set, is told how long reaching each hop's node took:
	// the TCP dial for hop 1, the CONNECT through the hop before for the
	// rest.
	Observe func(hop, node string, took time.Duration, err error)
	// Source and Destination are the client's address and the address it
	// connected to, for the PROXY header of a first-hop node that wants
	// one (zero: a header without addresses).
	Source, Destination netip.AddrPort
}

// HopError is a failure attributed to one hop's node.
type HopError struct {
	Chain, Hop, Node, Addr string
	// Target is what this hop was asked to reach (next hop or final target).
	Target string
	// Final reports that the hop was asked for the final target: a 502 here
	// means the target is unreachable, not that the hop is broken.
	Final bool
	Err   error
}

func (e *HopError) Error() string {
	if e.Target == "" {
		return fmt.Sprintf("chain %s hop %s node %s (%s): %v", e.Chain, e.Hop, e.Node, e.Addr, e.Err)
	}
	return fmt.Sprintf("chain %s hop %s node %s (%s): CONNECT %s: %v", e.Chain, e.Hop, e.Node, e.Addr, e.Target, e.Err)
}

func (e *HopError) Unwrap() error { return e.Err }

// TargetUnreachable reports whether err says the last hop could not reach
// the final target (so the caller should try another target, not blame the
// chain).
func TargetUnreachable(err error) bool {
	var he *HopError
	if !errors.As(err, &he) || !he.Final {
		return false
	}
	var se *httpconnect.StatusError
	return errors.As(err, &se) && (se.Code == 502 || se.Code == 503 || se.Code == 504)
}

// maxAttempts bounds how many whole-chain attempts one dial makes: every
// failure marks a node, so later attempts take other nodes where a hop has
// them; more attempts than this only repeat dead nodes.
const maxAttempts = 4

// Dial returns a connection whose bytes reach req.Target through every hop.
func (c *Chain) Dial(ctx context.Context, req Request) (net.Conn, error) {
	if len(c.Hops) == 0 {
		return nil, fmt.Errorf("chain %s has no hops", c.Name)
	}
	attempts := 1
	for _, h := range c.Hops {
		attempts = max(attempts, h.Selector.Len())
	}
	attempts = min(attempts, maxAttempts)
	var errs []error
	for range attempts {
		conn, err := c.dialOnce(ctx, req)
		if err == nil {
			return conn, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil || TargetUnreachable(err) {
			break
		}
	}
	if len(errs) == 1 {
		return nil, errs[0]
	}
	return nil, fmt.Errorf("%d attempts failed: %w", len(errs), errors.Join(errs...))
}

// dialOnce picks one node per hop and builds the tunnel, marking the node
// at fault when a step fails.
func (c *Chain) dialOnce(ctx context.Context, req Request) (net.Conn, error) {
	path := make([]*selector.Node[*Node], len(c.Hops))
	for i, h := range c.Hops {
		order := h.Selector.Order(req.Key)
		if len(order) == 0 {
			return nil, fmt.Errorf("chain %s hop %s has no nodes", c.Name, h.Name)
		}
		path[i] = order[0]
	}

	first, hop := path[0], c.Hops[0]
	ns := first.Value.NS
	if ns.IsOwn() {
		ns = hop.NS
	}
	if ns.IsOwn() {
		ns = req.DefaultNS
	}
	start := time.Now()
	conn, err := ns.Dial(ctx, "tcp", first.Value.Addr)
	req.observe(hop.Name, first.Name, start, err)
	if err == nil && first.Value.ProxyProtocol > 0 {
		if err = proxyproto.Write(conn, first.Value.ProxyProtocol, req.Source, req.Destination); err != nil {
			conn.Close()
		}
	}
	if err != nil {
		hop.Selector.MarkFailed(first)
		return nil, &HopError{Chain: c.Name, Hop: hop.Name, Node: first.Name, Addr: first.Value.Addr, Err: err}
	}

	for i, h := range c.Hops {
		node := path[i]
		target, final := req.Target, i == len(c.Hops)-1
		if !final {
			target = path[i+1].Value.Addr
		}
		start := time.Now()
		tunnel, err := httpconnect.Handshake(ctx, conn, target, node.Value.Auth)
		if !final {
			req.observe(c.Hops[i+1].Name, path[i+1].Name, start, err)
		}
		if err != nil {
			conn.Close()
			he := &HopError{Chain: c.Name, Hop: h.Name, Node: node.Name, Addr: node.Value.Addr, Target: target, Final: final, Err: err}
			c.blame(i, path, he)
			return nil, he
		}
		conn = tunnel
		h.Selector.MarkOK(node)
	}
	return conn, nil
}

func (r *Request) observe(hop, node string, start time.Time, err error) {
	if r.Observe != nil {
		r.Observe(hop, node, time.Since(start), err)
	}
}

// blame marks the node a failed handshake at hop i points to: a hop that
// answers 502/503/504 for the next hop says that next node is unreachable;
// any other failure (407, garbage, timeout, closed) is the answering hop's.
func (c *Chain) blame(i int, path []*selector.Node[*Node], he *HopError) {
	var se *httpconnect.StatusError
	gateway := errors.As(he.Err, &se) && (se.Code == 502 || se.Code == 503 || se.Code == 504)
	switch {
	case gateway && he.Final:
		// The target is the caller's to mark: the chain worked.
	case gateway:
		c.Hops[i+1].Selector.MarkFailed(path[i+1])
	default:
		c.Hops[i].Selector.MarkFailed(path[i])
	}
}
