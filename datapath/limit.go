package datapath

import (
	"log/slog"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Pool is the file descriptors the services of one daemon share, and
// Limit is one service's hold on it: how many connections (TCP streams or
// UDP sessions) the service may keep at once.
//
// Each Limit has a guaranteed part, which no other service can take, and
// may borrow beyond it from the pool's shared part, which belongs to
// nobody. A service under load therefore gets what the idle ones do not
// use, while each of the others can still open as many connections as its
// guarantee whenever it needs them: a flood on one service never starves
// another, and neither is held to an even split it does not need.
//
// A Limit counts in descriptors: each connection costs Cost of them (two
// sockets for a TCP stream, one for a UDP session), so the services'
// different kinds of connection share one pool.
type Pool struct {
	mu       sync.Mutex
	shared   int64 // descriptors beyond every guarantee
	borrowed int64 // of shared, held by services beyond their guarantee
	// limits is every Limit of the pool that holds descriptors or was
	// handed a guarantee, so a rebalance can take back the guarantee of
	// a service that left while its connections drain.
	limits map[*Limit]struct{}
}

// unbounded is the shared part of a pool that bounds nothing (no
// descriptor limit known): large, and far from overflowing when a few
// stream costs are added to it.
const unbounded = math.MaxInt64 / 4

// NewPool returns a pool that bounds nothing until Rebalance is called.
func NewPool() *Pool {
	return &Pool{shared: unbounded, limits: map[*Limit]struct{}{}}
}

// Share is what Rebalance hands one Limit: a guarantee, and a cap on what
// it may hold with borrowing (both in connections, not descriptors).
type Share struct {
	Guaranteed int64
	Max        int64 // 0: no cap beyond what the pool holds
}

// Rebalance sets the shared part of the pool to shared descriptors and
// each Limit's share. Limits of the pool missing from shares (services a
// reload removed, draining) lose their guarantee: what they still hold
// counts as borrowed until it is released. Connections held beyond a new,
// smaller share are not ended; new ones wait for them to go.
func (p *Pool) Rebalance(shared int64, shares map[*Limit]Share) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for l := range p.limits {
		if _, ok := shares[l]; !ok {
			p.borrowed -= l.overLocked(l.used)
			l.guaranteed, l.retired = 0, true
			p.borrowed += l.overLocked(l.used)
		}
	}
	for l, s := range shares {
		p.limits[l] = struct{}{}
		l.retired = false
		p.setShareLocked(l, s)
	}
	p.shared = max(shared, 0)
	p.forgetIdleLocked()
}

// setShareLocked changes l's share, keeping the pool's count of borrowed
// descriptors right for what l holds now.
func (p *Pool) setShareLocked(l *Limit, s Share) {
	p.borrowed -= l.overLocked(l.used)
	l.guaranteed = max(s.Guaranteed, 0) * l.cost
	l.maxFDs = math.MaxInt64
	if s.Max > 0 {
		l.maxFDs = s.Max * l.cost
	}
	p.borrowed += l.overLocked(l.used)
}

// forgetIdleLocked drops limits that hold nothing and have no guarantee:
// removed services whose connections are all gone.
func (p *Pool) forgetIdleLocked() {
	for l := range p.limits {
		if l.used == 0 && l.guaranteed == 0 && l.retired {
			delete(p.limits, l)
		}
	}
}

// Shared returns the pool's shared part and how much of it is borrowed.
func (p *Pool) Shared() (shared, borrowed int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.shared, p.borrowed
}

// Limit is one service's hold on a Pool; see Pool. The daemon asks it
// before each TCP stream, the datapath before each UDP session.
//
// A service's Limit outlives a reload: the new form of a changed service
// takes its previous form's Limit, so the connections still draining on
// the old form count against the same share.
type Limit struct {
	pool *Pool
	cost int64 // descriptors one connection holds

	// Guarded by pool.mu. All in descriptors.
	guaranteed int64
	maxFDs     int64
	used       int64
	// retired: the service left in a reload; the pool may forget the
	// Limit once it holds nothing.
	retired bool

	refused atomic.Uint64
	// lastLog is when a refusal was last logged (Unix nanoseconds), to log
	// at most once per refusalLogEvery whatever the refusal rate.
	lastLog atomic.Int64
}

// refusalLogEvery bounds how often refusals are logged: a flood refuses
// thousands a second, and the log must not become the next exhausted
// resource. The metric counts every one.
const refusalLogEvery = time.Second

// NewLimit returns a Limit on pool for connections of cost descriptors
// each (at least 1). Until the pool is rebalanced with a share for it,
// it has no guarantee and borrows from the shared part.
func (p *Pool) NewLimit(cost int64) *Limit {
	return &Limit{pool: p, cost: max(cost, 1), maxFDs: math.MaxInt64}
}

// overLocked is how many of used descriptors lie beyond l's guarantee.
func (l *Limit) overLocked(used int64) int64 { return max(used-l.guaranteed, 0) }

// Acquire takes a connection's descriptors and reports whether it got
// them; a false answer is counted as a refusal. Every true answer must be
// matched by one Release. It takes the pool's lock for a few additions:
// the pool is one number every service draws on, and a connection costs
// far more than an uncontended lock.
func (l *Limit) Acquire() bool {
	p := l.pool
	p.mu.Lock()
	next := l.used + l.cost
	borrow := l.overLocked(next) - l.overLocked(l.used)
	// Within the guarantee nothing is borrowed: it is granted even while
	// the shared part is overdrawn (a removed service still draining).
	ok := next <= l.maxFDs && (borrow == 0 || p.borrowed+borrow <= p.shared)
	if ok {
		l.used = next
		p.borrowed += borrow
		p.limits[l] = struct{}{}
	}
	p.mu.Unlock()
	if !ok {
		l.refused.Add(1)
	}
	return ok
}

// Release gives back what one granted Acquire took.
func (l *Limit) Release() {
	p := l.pool
	p.mu.Lock()
	next := max(l.used-l.cost, 0)
	p.borrowed -= l.overLocked(l.used) - l.overLocked(next)
	l.used = next
	if l.used == 0 && l.retired && l.guaranteed == 0 {
		delete(p.limits, l)
	}
	p.mu.Unlock()
}

// Cost is how many descriptors one connection holds.
func (l *Limit) Cost() int64 { return l.cost }

// Active is how many connections are held now.
func (l *Limit) Active() int64 {
	l.pool.mu.Lock()
	defer l.pool.mu.Unlock()
	return l.used / l.cost
}

// Guaranteed is how many connections the service can always hold.
func (l *Limit) Guaranteed() int64 {
	l.pool.mu.Lock()
	defer l.pool.mu.Unlock()
	return l.guaranteed / l.cost
}

// Reach is how many connections the service could hold now: its
// guarantee and what of the shared part the other services leave, within
// its own cap; what it holds is counted in.
func (l *Limit) Reach() int64 {
	p := l.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	others := p.borrowed - l.overLocked(l.used)
	return min(l.guaranteed+p.shared-others, l.maxFDs) / l.cost
}

// Capacity is the most connections the service can ever hold under the
// current shares: its guarantee and all of the shared part, within its own
// cap (about math.MaxInt64 / cost for a Limit that bounds nothing).
func (l *Limit) Capacity() int64 {
	p := l.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	return min(l.guaranteed+p.shared, l.maxFDs) / l.cost
}

// Refused is how many times Acquire said no.
func (l *Limit) Refused() uint64 { return l.refused.Load() }

// LogRefusal logs, at most once per second, that connections are being
// refused; what is refused ("connection", "udp session") is for the
// message. Callers call it after each failed Acquire: it costs a clock
// read and an atomic load when there is nothing to log, and it never
// blocks (the UDP relay calls it under its session table's lock): the
// line is written by a goroutine of its own.
func (l *Limit) LogRefusal(log *slog.Logger, what string) {
	now := time.Now().UnixNano()
	last := l.lastLog.Load()
	if now-last < int64(refusalLogEvery) || !l.lastLog.CompareAndSwap(last, now) {
		return
	}
	active, guaranteed, reach := l.Active(), l.Guaranteed(), l.Reach()
	go log.Warn(what+" refused: the service holds its fd budget guarantee and the shared descriptors are taken (logged at most once a second)",
		"active", active, "guaranteed", guaranteed, "reach", reach, "refused_total", l.Refused(), "reason", "fd_budget")
}
