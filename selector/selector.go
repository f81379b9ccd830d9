// Package selector picks the order in which a service tries its nodes.
//
// It reproduces GOST's node selection so configurations behave the same under
// ebpfwd: a strategy (round, rand, fifo, hash) chooses among the healthy nodes,
// and fail marking takes a node out of rotation for failTimeout once it has
// failed maxFails times in a row. The same selector serves forwarder nodes and
// chain hop nodes; the tc datapath reads Healthy to mirror node health into a
// BPF map.
package selector

import (
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"time"
)

// Strategy names a node selection strategy as written in configuration
// (`selector.strategy`).
type Strategy string

const (
	// Round hands out healthy nodes in turn. It is GOST's default.
	Round Strategy = "round"
	// Rand picks a healthy node uniformly at random.
	Rand Strategy = "rand"
	// FIFO always picks the first healthy node in configuration order, so
	// traffic sticks to a primary and moves to the next node only while the
	// primary is marked dead (primary/backup).
	FIFO Strategy = "fifo"
	// Hash picks a healthy node by hashing a key (the client IP), so one
	// client keeps reaching the same node while the healthy set is stable.
	Hash Strategy = "hash"
)

const (
	// DefaultMaxFails is GOST's default number of consecutive failures that
	// mark a node dead.
	DefaultMaxFails = 1
	// DefaultFailTimeout is GOST's default time a dead node stays out of
	// rotation.
	DefaultFailTimeout = 10 * time.Second
)

// Options configure a Selector. Zero values take GOST's defaults.
type Options struct {
	Strategy    Strategy
	MaxFails    int
	FailTimeout time.Duration
	// Now replaces time.Now so tests can move time past FailTimeout.
	Now func() time.Time
}

// Node is one selectable target carrying the caller's Value (an address, a
// hop, ...). Its health is shared by every connection that uses the selector.
type Node[T any] struct {
	Name  string
	Value T

	// fails counts consecutive failures; lastFail is the time of the most
	// recent one in Unix nanoseconds. Both are atomics so connections can mark
	// results without a lock on the hot path.
	fails    atomic.Int64
	lastFail atomic.Int64
}

// Selector orders nodes for each new connection. It is safe for concurrent use.
type Selector[T any] struct {
	strategy    Strategy
	maxFails    int64
	failTimeout time.Duration
	now         func() time.Time
	nodes       []*Node[T]
	next        atomic.Uint64 // round-robin position
}

// New returns a selector over nodes in configuration order. An unknown
// strategy behaves as Round, matching GOST.
func New[T any](opts Options, nodes ...*Node[T]) *Selector[T] {
	s := &Selector[T]{
		strategy:    opts.Strategy,
		maxFails:    int64(opts.MaxFails),
		failTimeout: opts.FailTimeout,
		now:         opts.Now,
		nodes:       slices.Clone(nodes),
	}
	switch s.strategy {
	case Round, Rand, FIFO, Hash:
	default:
		s.strategy = Round
	}
	if s.maxFails <= 0 {
		s.maxFails = DefaultMaxFails
	}
	if s.failTimeout <= 0 {
		s.failTimeout = DefaultFailTimeout
	}
	if s.now == nil {
		s.now = time.Now
	}
	return s
}

// Nodes returns every node in configuration order.
func (s *Selector[T]) Nodes() []*Node[T] { return slices.Clone(s.nodes) }

// MaxFails is the number of consecutive failures that mark a node dead
// (GOST's default where none was configured).
func (s *Selector[T]) MaxFails() int { return int(s.maxFails) }

// Len is how many nodes the selector has.
func (s *Selector[T]) Len() int { return len(s.nodes) }

// Healthy reports whether n is currently a candidate: it has fewer than
// maxFails consecutive failures, or its last failure is at least failTimeout
// old. As in GOST, a node coming back after failTimeout keeps its fail count,
// so a single further failure takes it out again until a success resets it.
func (s *Selector[T]) Healthy(n *Node[T]) bool {
	if n.fails.Load() < s.maxFails {
		return true
	}
	return s.now().UnixNano()-n.lastFail.Load() >= int64(s.failTimeout)
}

// MarkFailed records a failed attempt on n (dial error, handshake failure).
func (s *Selector[T]) MarkFailed(n *Node[T]) {
	// Store the time before bumping the count so a concurrent Healthy never
	// sees the count at maxFails paired with a stale failure time.
	n.lastFail.Store(s.now().UnixNano())
	n.fails.Add(1)
}

// MarkOK records a successful attempt on n, clearing its failures.
func (s *Selector[T]) MarkOK(n *Node[T]) {
	n.fails.Store(0)
}

// Order returns the nodes to try for one connection, best first: the
// strategy's pick, then the other healthy nodes in configuration order
// starting after the pick, so retries fan out the same way the strategy does.
// Dead nodes are left out unless no node is healthy: then all nodes are
// returned (ordered the same way), because GOST prefers trying a node that
// may have recovered over refusing service. key is the hash key (the client
// IP) and may be empty, in which case Hash picks at random.
//
// Order allocates exactly one slice: the result.
func (s *Selector[T]) Order(key string) []*Node[T] {
	out := make([]*Node[T], 0, len(s.nodes))
	// Take one health snapshot per call so the pick and the tail agree even
	// while other connections mark results.
	for _, n := range s.nodes {
		if s.Healthy(n) {
			out = append(out, n)
		}
	}
	if len(out) == 0 {
		out = append(out, s.nodes...)
	}
	if len(out) <= 1 {
		return out
	}
	rotateLeft(out, s.pick(len(out), key))
	return out
}

// pick returns the index of the strategy's choice among n candidates.
func (s *Selector[T]) pick(n int, key string) int {
	switch s.strategy {
	case FIFO:
		return 0
	case Rand:
		return rand.IntN(n)
	case Hash:
		if key == "" {
			return rand.IntN(n)
		}
		return int(hashKey(key) % uint32(n))
	default:
		return int((s.next.Add(1) - 1) % uint64(n))
	}
}

// FNV-1a 32-bit parameters (http://www.isthe.com/chongo/tech/comp/fnv/).
const (
	fnvOffset32 = 2166136261
	fnvPrime32  = 16777619
)

// hashKey is 32-bit FNV-1a of key, identical to hash/fnv's New32a. It is
// written out so Order stays allocation-free apart from its result, and
// FNV-1a is chosen over crc32 because it is a few lines of BPF C, letting the
// tc datapath reproduce the same choice in the kernel.
func hashKey(key string) uint32 {
	h := uint32(fnvOffset32)
	for i := 0; i < len(key); i++ {
		h ^= uint32(key[i])
		h *= fnvPrime32
	}
	return h
}

// rotateLeft moves s[k] to the front while keeping cyclic order, in place.
func rotateLeft[E any](s []E, k int) {
	if k == 0 {
		return
	}
	slices.Reverse(s[:k])
	slices.Reverse(s[k:])
	slices.Reverse(s)
}
