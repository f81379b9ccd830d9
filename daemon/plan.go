package daemon

import (
	"fmt"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
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

// planDatapath chooses a service's datapath from its `datapath` metadata.
// Only the userspace relay is built into this version: `auto` takes it and
// says why; asking for a kernel datapath by name is an error rather than a
// silent fallback, because the operator asked for something specific.
func planDatapath(sc *config.Service, chained bool) (Plan, error) {
	p := Plan{Service: sc.Name}
	switch kind := datapath.Kind(sc.Datapath); kind {
	case datapath.Userspace:
		p.Datapath, p.Reason = datapath.Userspace, "configured"
	case datapath.Auto, "":
		p.Datapath = datapath.Userspace
		switch {
		case sc.Handler.Type == "http":
			p.Reason = "http proxy services terminate connections in userspace"
		case chained:
			p.Reason = "traffic goes through proxy hops"
		default:
			p.Reason = "no kernel datapath (tc, sockmap) is built into this version"
			p.From, p.FallbackReason = datapath.TC, "not_built"
		}
	default:
		return p, fmt.Errorf("datapath %q is not available in this version (available: userspace, auto)", kind)
	}
	return p, nil
}
