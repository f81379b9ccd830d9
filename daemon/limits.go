package daemon

import (
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/userspace/limiter"
)

// limiterRules turns a configured limiter's lines into the enforcer's
// rules (nil for none).
func limiterRules(l *config.Limiter) []limiter.Rule {
	if l == nil {
		return nil
	}
	rules := make([]limiter.Rule, 0, len(l.Rules))
	for _, r := range l.Rules {
		scope := limiter.Service
		switch r.Scope {
		case config.ScopeEach:
			scope = limiter.Each
		case config.ScopePrefix:
			scope = limiter.Prefix
		}
		rules = append(rules, limiter.Rule{Scope: scope, Prefix: r.Prefix, In: r.In, Out: r.Out, Burst: r.Burst, N: r.N})
	}
	return rules
}

// limits are a service's GOST limiters as the daemon enforces them: the
// admission of new connections and sessions (climiter, rlimiter) and the
// bandwidth buckets of its streams (limiter).
type limits struct {
	admission *limiter.Admission // nil: none
	traffic   *limiter.Traffic   // nil: none
	errs      *Errors
	log       *slog.Logger
	// lastLog throttles the refusal log line (Unix nanoseconds).
	lastLog atomic.Int64
}

func newLimits(l config.Limits, errs *Errors, log *slog.Logger) *limits {
	return &limits{
		admission: limiter.NewAdmission(limiterRules(l.Conns), limiterRules(l.Rate)),
		traffic:   limiter.NewTraffic(limiterRules(l.Traffic)),
		errs:      errs,
		log:       log,
	}
}

// admit asks the admission about a new connection or session of client,
// counting and (at most once a second) logging a refusal. It returns the
// release to call when the connection ends.
func (l *limits) admit(client netip.Addr, what string) (func(), bool) {
	release, refused := l.admission.Admit(client)
	if refused == "" {
		return release, true
	}
	reason := ReasonConnLimit
	if refused == limiter.RateLimit {
		reason = ReasonRateLimit
	}
	l.errs.Add(reason)
	now := time.Now().UnixNano()
	if last := l.lastLog.Load(); now-last >= int64(time.Second) && l.lastLog.CompareAndSwap(last, now) {
		// A goroutine of its own: the UDP relay asks under its table's
		// lock, and a refusal storm must not wait on the log.
		go l.log.Warn(what+" refused by the service's limiter (logged at most once a second)",
			"client", client, "reason", reason)
	}
	return nil, false
}
