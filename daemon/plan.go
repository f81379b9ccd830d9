package daemon

import (
	"fmt"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/tc"
)

// Plan is the datapath chosen for one service and the reason for it.
type Plan struct {
	Service  string
	Datapath datapath.Kind
	Reason   string
	// From is the faster datapath this service would have had, when the
	// plan is a fallback ("" otherwise), and FallbackReason a short code
	// for why (a metric label).
	From           datapath.Kind
	FallbackReason string
}

// kernel is what the planner asks about the kernel datapaths; tests
// replace it.
type kernel struct {
	tcApplicable func(datapath.Service) error
	tcProbe      func() error
}

var realKernel = kernel{
	tcApplicable: func(svc datapath.Service) error {
		if err := tc.Applicable(svc); err != nil {
			return err
		}
		return tc.NodesReachable(svc)
	},
	tcProbe: tc.Probe,
}

// planDatapath chooses a service's datapath from its `datapath` metadata:
// `auto` takes the fastest that applies and says why; a datapath asked for
// by name that cannot carry the service is an error, because the operator
// asked for something specific.
func (k kernel) planDatapath(sc *config.Service, spec datapath.Service) (Plan, error) {
	p := Plan{Service: sc.Name}
	switch kind := datapath.Kind(sc.Datapath); kind {
	case datapath.Userspace:
		p.Datapath, p.Reason = datapath.Userspace, "configured"
	case datapath.TC:
		if err := k.tcApplicable(spec); err != nil {
			return p, fmt.Errorf("datapath tc cannot carry this service: %w", err)
		}
		if err := k.tcProbe(); err != nil {
			return p, fmt.Errorf("datapath tc is unavailable: %w", err)
		}
		p.Datapath, p.Reason = datapath.TC, "configured"
	case datapath.Auto, "":
		p.Datapath = datapath.Userspace
		switch {
		case sc.Handler.Type == "http":
			p.Reason = "http proxy services terminate connections in userspace"
		case spec.Chained:
			p.Reason = "traffic goes through proxy hops"
		default:
			if err := k.tcApplicable(spec); err != nil {
				p.Reason, p.From, p.FallbackReason = "tc does not apply: "+err.Error(), datapath.TC, "not_applicable"
			} else if err := k.tcProbe(); err != nil {
				p.Reason, p.From, p.FallbackReason = "tc is unavailable: "+err.Error(), datapath.TC, "probe_failed"
			} else {
				p.Datapath, p.Reason = datapath.TC, "direct forward to IP addresses; the kernel supports tc redirects"
			}
		}
	default:
		return p, fmt.Errorf("datapath %q is not available in this version (available: auto, tc, userspace)", kind)
	}
	return p, nil
}
