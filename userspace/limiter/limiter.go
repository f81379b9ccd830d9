// Package limiter enforces GOST's limiters on the streams and sessions
// ebpfwd's userspace serves: concurrent connections (climiters), new
// connections per second (rlimiters) and bandwidth (limiters), each for the
// whole service, per client address (or address range) and, for bandwidth,
// per connection. The rules arrive parsed (config turns GOST's limit lines
// into them); this package keeps the counters and token buckets.
//
// Token buckets are golang.org/x/time/rate's. Per-client state lives only
// while a client holds something (a connection) or its bucket is not full
// again, so a scan of the whole Internet does not grow the tables without
// bound.
package limiter

import (
	"cmp"
	"math"
	"net/netip"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/ebpfwd/ebpfwd/datapath"
)

// Scope is who one rule applies to; see config.LimitScope.
type Scope int

const (
	Service Scope = iota // the whole service
	Each                 // each connection (bandwidth) or each client IP no prefix rule names
	Prefix               // each client address within the rule's prefix
)

// Rule is one limit line.
type Rule struct {
	Scope  Scope
	Prefix netip.Prefix
	// Bandwidth: bytes per second client -> node (In) and node -> client
	// (Out), 0 unlimited; Burst 0 takes the default (see bucketOf).
	In, Out, Burst int64
	// N: concurrent connections, or new connections per second.
	N float64
}

// perClient finds, for a client address, the value of the rule that
// applies to it: the longest prefix containing it, else the Each rule.
type perClient struct {
	prefixes []Rule // longest first
	each     *Rule
}

func newPerClient(rules []Rule) perClient {
	var p perClient
	for i, r := range rules {
		switch r.Scope {
		case Prefix:
			p.prefixes = append(p.prefixes, r)
		case Each:
			p.each = &rules[i]
		}
	}
	slices.SortStableFunc(p.prefixes, func(a, b Rule) int { return cmp.Compare(b.Prefix.Bits(), a.Prefix.Bits()) })
	return p
}

func (p perClient) rule(a netip.Addr) *Rule {
	a = a.Unmap()
	for i := range p.prefixes {
		if p.prefixes[i].Prefix.Contains(a) {
			return &p.prefixes[i]
		}
	}
	return p.each
}

func serviceRule(rules []Rule) *Rule {
	for i := range rules {
		if rules[i].Scope == Service {
			return &rules[i]
		}
	}
	return nil
}

// Refusal says why Admit refused a connection (a metric reason).
type Refusal string

const (
	// ConnLimit: a climiter's count is reached.
	ConnLimit Refusal = "conn_limit"
	// RateLimit: an rlimiter's rate is exceeded.
	RateLimit Refusal = "rate_limit"
)

// Admission decides whether a new connection (or UDP session) may start:
// concurrent connections and new connections per second.
type Admission struct {
	mu sync.Mutex

	conns       perClient
	connService *Rule
	held        int64                // the service's connections
	heldBy      map[netip.Addr]int64 // per client, while it holds any

	rates       perClient
	rateService *rate.Limiter
	rateBy      map[netip.Addr]*rate.Limiter
	now         func() time.Time
}

// maxRateClients bounds the per-client rate table; beyond it the buckets
// that are full again (the client has been quiet) are dropped.
const maxRateClients = 1 << 16

// NewAdmission returns the admission of a service with these climiter and
// rlimiter rules, or nil when there are none.
func NewAdmission(conns, rates []Rule) *Admission {
	if len(conns) == 0 && len(rates) == 0 {
		return nil
	}
	a := &Admission{
		conns: newPerClient(conns), connService: serviceRule(conns), heldBy: map[netip.Addr]int64{},
		rates: newPerClient(rates), rateBy: map[netip.Addr]*rate.Limiter{}, now: time.Now,
	}
	if r := serviceRule(rates); r != nil {
		a.rateService = newRateBucket(r.N)
	}
	return a
}

// newRateBucket admits n new connections per second, in bursts of up to
// n (at least one): a client allowed 10 a second may open 10 at once.
func newRateBucket(n float64) *rate.Limiter {
	return rate.NewLimiter(rate.Limit(n), max(int(math.Ceil(n)), 1))
}

// Admit reports whether a connection from client may start. When it may,
// release must be called exactly once when the connection ends.
func (a *Admission) Admit(client netip.Addr) (release func(), refused Refusal) {
	if a == nil {
		return func() {}, ""
	}
	client = client.Unmap()
	a.mu.Lock()
	defer a.mu.Unlock()
	perLimit := a.conns.rule(client)
	if a.connService != nil && float64(a.held+1) > a.connService.N {
		return nil, ConnLimit
	}
	if perLimit != nil && float64(a.heldBy[client]+1) > perLimit.N {
		return nil, ConnLimit
	}
	// Rate last: a connection the count refuses spends no token.
	now := a.now()
	var perRate *rate.Limiter
	if r := a.rates.rule(client); r != nil {
		perRate = a.rateBy[client]
		if perRate == nil {
			a.sweepRatesLocked(now)
			perRate = newRateBucket(r.N)
			a.rateBy[client] = perRate
		}
	}
	// Both buckets must have a token, and neither spends one unless both
	// do: reserve, and cancel what was reserved when the other refuses.
	var reserved []*rate.Reservation
	for _, b := range []*rate.Limiter{a.rateService, perRate} {
		if b == nil {
			continue
		}
		res := b.ReserveN(now, 1)
		if !res.OK() || res.DelayFrom(now) > 0 {
			res.CancelAt(now)
			for _, r := range reserved {
				r.CancelAt(now)
			}
			return nil, RateLimit
		}
		reserved = append(reserved, res)
	}
	a.held++
	a.heldBy[client]++
	var once sync.Once
	return func() { once.Do(func() { a.release(client) }) }, ""
}

func (a *Admission) release(client netip.Addr) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.held--
	if a.heldBy[client]--; a.heldBy[client] <= 0 {
		delete(a.heldBy, client)
	}
}

// sweepRatesLocked drops per-client buckets that are full again, once the
// table is at its bound: forgetting such a client changes nothing, since
// it would start from a full bucket anyway.
func (a *Admission) sweepRatesLocked(now time.Time) {
	if len(a.rateBy) < maxRateClients {
		return
	}
	for addr, b := range a.rateBy {
		if b.TokensAt(now) >= float64(b.Burst()) {
			delete(a.rateBy, addr)
		}
	}
}

// Held is how many connections the admission counts now.
func (a *Admission) Held() int64 {
	if a == nil {
		return 0
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.held
}

// Traffic hands out the bandwidth buckets of a service's streams: the
// service's own (shared by all its streams), each client's (shared by its
// streams), and a fresh pair per stream.
type Traffic struct {
	service [2]*rate.Limiter // up, down; nil: unlimited
	each    *Rule
	clients perClient

	mu     sync.Mutex
	byAddr map[netip.Addr]*clientBuckets
}

type clientBuckets struct {
	buckets [2]*rate.Limiter
	streams int
}

// NewTraffic returns the bandwidth limits of a service with these limiter
// rules, or nil when there are none.
func NewTraffic(rules []Rule) *Traffic {
	if len(rules) == 0 {
		return nil
	}
	t := &Traffic{byAddr: map[netip.Addr]*clientBuckets{}}
	if r := serviceRule(rules); r != nil {
		t.service = bucketsOf(*r)
	}
	var prefixes []Rule
	for i, r := range rules {
		switch r.Scope {
		case Each:
			t.each = &rules[i]
		case Prefix:
			prefixes = append(prefixes, r)
		}
	}
	// The per-connection rule ($$) is not a per-client one for
	// bandwidth: only prefixes choose a client's buckets.
	t.clients = newPerClient(prefixes)
	return t
}

// defaultBurstPerSecond sets a bucket's default burst to a tenth of a
// second of its rate: small enough that a stream never runs ahead of its
// limit by much (a limit holds within a few percent over seconds), large
// enough that a copy moves a useful amount at once.
const defaultBurstPerSecond = 10

// minBurst keeps a very low rate's chunks from shrinking to a few bytes.
const minBurst = 4 << 10

func bucketsOf(r Rule) [2]*rate.Limiter {
	var out [2]*rate.Limiter
	for i, bps := range []int64{r.In, r.Out} {
		if bps <= 0 {
			continue
		}
		burst := r.Burst
		if burst <= 0 {
			burst = max(bps/defaultBurstPerSecond, minBurst)
		}
		l := rate.NewLimiter(rate.Limit(bps), int(min(burst, math.MaxInt32)))
		// Start empty: a full bucket would let the first burst of every
		// stream through on top of the rate.
		l.AllowN(time.Now(), l.Burst())
		out[i] = l
	}
	return out
}

// Stream returns the buckets one stream from client waits on, up (client
// -> node) and down, and a release to call once when the stream ends.
func (t *Traffic) Stream(client netip.Addr) (up, down []datapath.Bucket, release func()) {
	if t == nil {
		return nil, nil, func() {}
	}
	client = client.Unmap()
	add := func(pair [2]*rate.Limiter) {
		if pair[0] != nil {
			up = append(up, pair[0])
		}
		if pair[1] != nil {
			down = append(down, pair[1])
		}
	}
	add(t.service)
	if t.each != nil {
		add(bucketsOf(*t.each))
	}
	release = func() {}
	if r := t.clients.rule(client); r != nil {
		t.mu.Lock()
		cb := t.byAddr[client]
		if cb == nil {
			cb = &clientBuckets{buckets: bucketsOf(*r)}
			t.byAddr[client] = cb
		}
		cb.streams++
		t.mu.Unlock()
		add(cb.buckets)
		var once sync.Once
		release = func() {
			once.Do(func() {
				t.mu.Lock()
				defer t.mu.Unlock()
				if cb.streams--; cb.streams == 0 {
					delete(t.byAddr, client)
				}
			})
		}
	}
	return up, down, release
}
