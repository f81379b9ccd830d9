package datapath

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
)

// ErrFallback is wrapped by a kernel attachment's Splice error when it left
// the stream to the relay.
var ErrFallback = errors.New("left to the userspace relay")

// ErrNeverApplies is wrapped by Applies errors that hold for every service
// of that shape (a chain or an HTTP proxy, for tc): a service planned on a
// slower datapath for such a reason is no fallback, so it gets no fallback
// metric. Make one with NeverApplies.
var ErrNeverApplies = errors.New("this datapath never carries services of this shape")

// NeverApplies is an Applies error for a shape the datapath never carries;
// its text is reason alone.
func NeverApplies(reason string) error { return neverApplies(reason) }

type neverApplies string

func (e neverApplies) Error() string        { return string(e) }
func (e neverApplies) Is(target error) bool { return target == ErrNeverApplies }

// Plan is the datapath chosen for one service and the reason for it.
type Plan struct {
	Service  string
	Datapath Kind
	Reason   string
	// From is the faster datapath this service would have had, when the
	// plan is a fallback ("" otherwise), and FallbackReason a short code
	// for why (a metric label: not_applicable, probe_failed, setup_failed).
	From           Kind
	FallbackReason string
}

// Fallback reasons, the values of Plan.FallbackReason.
const (
	FallbackNotApplicable = "not_applicable"
	FallbackProbeFailed   = "probe_failed"
	FallbackSetupFailed   = "setup_failed"
)

// Set is the datapaths a daemon may use. Its relay is the datapath that
// always applies (userspace); it also serves, for every kernel datapath's
// attachment, whatever reaches a socket.
type Set struct {
	relay  Datapath
	ranked []Datapath // every datapath, relay included, fastest first
}

// NewSet registers relay and the kernel datapaths. Their order does not
// matter: Rank decides.
func NewSet(relay Datapath, kernel ...Datapath) *Set {
	ranked := append([]Datapath{relay}, kernel...)
	slices.SortStableFunc(ranked, func(a, b Datapath) int { return a.Rank() - b.Rank() })
	return &Set{relay: relay, ranked: ranked}
}

// Datapaths lists the registered datapaths, fastest first.
func (s *Set) Datapaths() []Datapath { return s.ranked }

func (s *Set) byKind(k Kind) Datapath {
	for _, dp := range s.ranked {
		if dp.Kind() == k {
			return dp
		}
	}
	return nil
}

func (s *Set) kinds() string {
	names := []string{string(Auto)}
	for _, dp := range s.ranked {
		names = append(names, string(dp.Kind()))
	}
	return strings.Join(names, ", ")
}

// Plan chooses svc's datapath. want is the service's `datapath` setting:
// Auto ("" too) takes the fastest datapath that applies and whose probe
// passes, saying why each faster one was passed over; a datapath asked for
// by name that cannot carry the service is an error, because the operator
// asked for something specific.
func (s *Set) Plan(svc Service, want Kind) (Plan, error) {
	p := Plan{Service: svc.Name}
	if want != Auto && want != "" {
		dp := s.byKind(want)
		if dp == nil {
			return p, fmt.Errorf("datapath %q is not available in this version (available: %s)", want, s.kinds())
		}
		if dp != s.relay {
			if err := dp.Applies(svc); err != nil {
				return p, fmt.Errorf("datapath %s cannot carry this service: %w", want, err)
			}
			if err := dp.Probe(); err != nil {
				return p, fmt.Errorf("datapath %s is unavailable: %w", want, err)
			}
		}
		p.Datapath, p.Reason = want, "configured"
		return p, nil
	}
	var passed []string
	for _, dp := range s.ranked {
		if dp == s.relay {
			break
		}
		kind := dp.Kind()
		if err := dp.Applies(svc); err != nil {
			passed = append(passed, fmt.Sprintf("%s does not apply: %v", kind, err))
			if p.From == "" && !errors.Is(err, ErrNeverApplies) {
				p.From, p.FallbackReason = kind, FallbackNotApplicable
			}
			continue
		}
		if err := dp.Probe(); err != nil {
			passed = append(passed, fmt.Sprintf("%s is unavailable: %v", kind, err))
			if p.From == "" {
				p.From, p.FallbackReason = kind, FallbackProbeFailed
			}
			continue
		}
		p.Datapath, p.Reason, p.From, p.FallbackReason = kind, fmt.Sprintf("fastest datapath that applies (%s)", kind), "", ""
		if len(passed) > 0 {
			p.Reason += "; " + strings.Join(passed, "; ")
		}
		return p, nil
	}
	p.Datapath = s.relay.Kind()
	p.Reason = "always applies"
	if len(passed) > 0 {
		p.Reason = strings.Join(passed, "; ")
	}
	return p, nil
}

// Setup sets svc up on the datapath p chose. A kernel datapath's attachment
// comes joined with the relay's (WithRelay). When a kernel datapath that
// `auto` chose fails to set up (the kernel refused the program, say), the
// service falls back to the relay: the returned plan says so and why, and
// the failure is logged to log, which carries the service's attributes
// (its name and planned datapath). A datapath configured by name that
// fails is an error.
func (s *Set) Setup(ctx context.Context, p Plan, configured bool, svc Service, log *slog.Logger) (Attachment, Plan, error) {
	relay, err := s.relay.Setup(ctx, svc)
	if err != nil {
		return nil, p, fmt.Errorf("set up datapath %s: %w", s.relay.Kind(), err)
	}
	if p.Datapath == s.relay.Kind() {
		return relay, p, nil
	}
	dp := s.byKind(p.Datapath)
	if dp == nil {
		relay.Close()
		return nil, p, fmt.Errorf("datapath %q is not registered", p.Datapath)
	}
	kernel, err := dp.Setup(ctx, svc)
	if err == nil {
		return WithRelay(kernel, relay), p, nil
	}
	if configured {
		relay.Close()
		return nil, p, fmt.Errorf("set up datapath %s: %w", p.Datapath, err)
	}
	log.Warn("kernel datapath could not be set up: falling back to the userspace relay", "err", err)
	fallback := Plan{Service: p.Service, Datapath: s.relay.Kind(), From: p.Datapath, FallbackReason: FallbackSetupFailed,
		Reason: fmt.Sprintf("%s could not be set up: %v", p.Datapath, err)}
	return relay, fallback, nil
}
