package datapath

import (
	"log/slog"
	"math"
	"sync/atomic"
	"time"
)

// Limit bounds how many connections (TCP streams or UDP sessions) one
// service holds at once: its share of the daemon's file descriptor budget.
// It is two atomic counters, so taking and returning a slot costs no lock
// on the hot path. The daemon owns it, sets its maximum before the service
// serves (and again on a reload), and hands it to the datapath, which asks
// it before each UDP session; the daemon asks it before each TCP stream.
//
// A service's Limit outlives a reload: the new form of a changed service
// takes its previous form's Limit, so the connections still draining on
// the old form count against the same share.
type Limit struct {
	max     atomic.Int64
	active  atomic.Int64
	refused atomic.Uint64
	// lastLog is when a refusal was last logged (Unix nanoseconds), to log
	// at most once per refusalLogEvery whatever the refusal rate.
	lastLog atomic.Int64
}

// refusalLogEvery bounds how often refusals are logged: a flood refuses
// thousands a second, and the log must not become the next exhausted
// resource. The metric counts every one.
const refusalLogEvery = time.Second

// NewLimit returns a Limit without a maximum: everything is admitted until
// SetMax is called.
func NewLimit() *Limit {
	l := &Limit{}
	l.max.Store(math.MaxInt64)
	return l
}

// SetMax sets how many connections may be held at once. Connections held
// beyond a lowered maximum are not ended; new ones wait for them to go.
func (l *Limit) SetMax(n int64) { l.max.Store(max(n, 0)) }

// Max is the current maximum (math.MaxInt64 when none was set).
func (l *Limit) Max() int64 { return l.max.Load() }

// Acquire takes a slot and reports whether it got one; a false answer is
// counted as a refusal. Every true answer must be matched by one Release.
//
// The slot is taken first and given back when it was one too many, so two
// callers racing for the last slot may both be refused: conservative, and
// no lock.
func (l *Limit) Acquire() bool {
	if l.active.Add(1) > l.max.Load() {
		l.active.Add(-1)
		l.refused.Add(1)
		return false
	}
	return true
}

// Release gives back a slot Acquire granted.
func (l *Limit) Release() { l.active.Add(-1) }

// Active is how many slots are held now.
func (l *Limit) Active() int64 { return l.active.Load() }

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
	go log.Warn(what+" refused: the service holds its whole fd budget share (logged at most once a second)",
		"max", l.Max(), "active", l.Active(), "refused_total", l.Refused(), "reason", "fd_budget")
}
