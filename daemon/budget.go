package daemon

import (
	"fmt"
	"log/slog"
	"os"
	"syscall"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/metrics"
	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

// The fd budget keeps one service from taking every file descriptor the
// process may open. Without it a UDP flood from thousands of source ports
// (one socket per session) or a TCP connection storm ran the daemon out of
// descriptors, and every other service, the metrics endpoint and the
// control socket stopped accepting until the flood's sessions expired.
//
// The budget is RLIMIT_NOFILE's soft limit, raised to the hard limit at
// start. Out of it the daemon keeps a reserve for itself, and the services
// share the rest (datapath.Pool):
//
//   - reserve = the descriptors open once every service has started
//     (stdio, the log file, the runtime's poller, every listening socket,
//     the metrics listener, the control socket, namespace handles, the
//     kernel datapaths' BPF programs, maps, links and netlink sockets),
//     measured then, plus fdHeadroom for what comes and goes, plus the
//     splice pipes every relayed stream shares (splicePipesFor).
//   - half of the rest is guaranteed: split between the services max-min
//     fair (a service whose maxStreams needs less than an equal part takes
//     only that, the others split what it leaves), and no other service can
//     take a service's guarantee;
//   - the other half, and whatever the guarantees leave, is shared: any
//     service may borrow from it beyond its guarantee, first come first
//     served, and gives back as its connections close.
//
// A connection costs what it holds while idle: tcpStreamFDs per TCP
// stream, udpSessionFDs per UDP session. A TCP connection beyond what its
// service can take is reset as soon as it is accepted; a datagram that
// would open a UDP session beyond it is dropped. Both count as
// errors_total{reason="fd_budget"}.
const (
	// fdHeadroom is what the daemon may open beyond what it held at start,
	// whatever the services do:
	//   - 8 concurrent metrics scrapes (each an accepted connection);
	//   - 4 concurrent control socket clients (ebpfwd reload, conns);
	//   - 16 node health probes in flight (tc services probe their nodes
	//     with a socket each);
	//   - 16 for dials in progress that no stream or session accounts for:
	//     the spare sockets a namespace's socket maker keeps ready, the
	//     sockets and /etc files of a name lookup;
	//   - 16 for a reload, which opens the new form's listeners and
	//     datapath before the old form's close;
	//   - 4 for the rest: a log file reopened, a ready file written.
	fdHeadroom = 64
	// tcpStreamFDs is what one relayed TCP stream holds: the accepted and
	// the dialed socket. The splice pipes it borrows while bytes move come
	// from the allowance every stream shares (splicePipesFor). An HTTP
	// proxy connection (client and target) and a chained stream (the
	// upstream is one socket to the first hop) cost the same.
	tcpStreamFDs = 2
	// udpSessionFDs is what one UDP session holds: its connected upstream
	// socket. Replies go out through the service's listening socket.
	udpSessionFDs = 1
	// guaranteedPart is the fraction of the services' descriptors that is
	// guaranteed (1/guaranteedPart); the rest is shared. Half and half:
	// every service can always open half of an even split, and a busy one
	// can still take more than half of everything.
	guaranteedPart = 2
)

// splicePipesFor is the number of splice pipes (two descriptors each) the
// relays may hold at once under a limit of limit descriptors: a pipe is
// held only by a direction moving bytes, so this bounds concurrent
// transfers, not connections (beyond it a chunk is copied through a
// buffer). A sixteenth of the limit, between 8 and 512 pipes: 512
// concurrent splices keep two CPUs' worth of relaying busy many times over,
// and 8 keep a small limit's daemon splicing at all.
func splicePipesFor(limit int64) int64 { return min(max(limit/16, 8), 512) }

// fdBudget is the daemon's descriptor budget, fixed at start.
type fdBudget struct {
	limit int64 // RLIMIT_NOFILE's soft limit; 0: unknown, no budget
	base  int64 // descriptors open when the services had started
}

// reserve is what the daemon keeps for itself.
func (b fdBudget) reserve() int64 { return b.base + fdHeadroom + 2*splicePipesFor(b.limit) }

// pool is what the services share.
func (b fdBudget) pool() int64 { return max(b.limit-b.reserve(), 0) }

// demand is what one service asks of the budget.
type demand struct {
	cost int64 // descriptors one stream or session holds
	max  int64 // the most streams or sessions it wants; 0: as many as it gets
}

// split divides pool descriptors between demands, max-min fair, and
// returns how many streams or sessions each may hold. Every demand gets
// an equal share, except that one whose max needs less takes only that;
// what it leaves is split again between the others. A share is spent in
// whole streams (share/cost): the remainder of a division is not handed
// on, which keeps the result easy to check and costs at most cost-1
// descriptors per service.
func split(pool int64, demands []demand) []int64 {
	grants := make([]int64, len(demands))
	if pool <= 0 {
		return grants
	}
	open := make([]int, 0, len(demands))
	for i, d := range demands {
		if d.cost > 0 {
			open = append(open, i)
		}
	}
	for len(open) > 0 {
		fair := pool / int64(len(open))
		rest := open[:0:0]
		for _, i := range open {
			d := demands[i]
			// d.max is at most an int's worth of streams, d.cost a few
			// descriptors: the product cannot overflow an int64.
			if d.max > 0 && d.max*d.cost <= fair {
				grants[i] = d.max
				pool -= d.max * d.cost
				continue
			}
			rest = append(rest, i)
		}
		if len(rest) == len(open) {
			// Nobody is satisfied with less than a fair share: everyone
			// left gets exactly that.
			for _, i := range rest {
				grants[i] = fair / demands[i].cost
			}
			break
		}
		open = rest
	}
	return grants
}

// demandOf is what a service asks of the budget: its configured maxStreams,
// and for UDP at most the relay's session table.
func demandOf(s *service) demand {
	if s.cfg.Listener.Type == "udp" {
		m := int64(relay.DefaultMaxUDPSessions)
		if s.cfg.MaxStreams > 0 {
			m = min(m, int64(s.cfg.MaxStreams))
		}
		return demand{cost: udpSessionFDs, max: m}
	}
	return demand{cost: tcpStreamFDs, max: int64(s.cfg.MaxStreams)}
}

// raiseFDLimit raises RLIMIT_NOFILE's soft limit to the hard limit, where
// the kernel allows it, and returns the soft limit in force (0 when it
// cannot be read). It never fails: a daemon that keeps a lower limit still
// serves, within a smaller budget.
func raiseFDLimit(log *slog.Logger) int64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read the open file limit: no fd budget, one service may starve the others",
			"err", fmt.Errorf("getrlimit RLIMIT_NOFILE: %w", err))
		return 0
	}
	if lim.Cur < lim.Max {
		soft := lim.Cur
		lim.Cur = lim.Max
		// syscall.Setrlimit, not x/sys/unix's: it also tells the Go
		// runtime not to put the old limit back in the processes it
		// starts (the restart in place re-executes the daemon).
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise the open file limit to its hard limit; keeping it",
				"soft", soft, "hard", lim.Max, "err", fmt.Errorf("setrlimit RLIMIT_NOFILE: %w", err))
			return int64(soft)
		}
		log.Info("raised the open file limit to its hard limit", "from", soft, "to", lim.Max)
		return int64(lim.Max)
	}
	log.Info("open file limit", "soft", lim.Cur, "hard", lim.Max)
	return int64(lim.Cur)
}

// openFDs counts the process's open descriptors, or returns -1.
func openFDs() int64 {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	// ReadDir's own descriptor on the directory was open while it read.
	return int64(len(entries)) - 1
}

// Budget reports the descriptor budget and the relays' splice pipes for
// metrics. Before the budget is fixed (or without one) the parts read 0.
func (d *Daemon) Budget() metrics.Budget {
	var b metrics.Budget
	d.mu.RLock()
	budget := d.budget
	d.mu.RUnlock()
	if budget.limit > 0 {
		b.Limit, b.Reserved = budget.limit, budget.reserve()
		b.Shared, b.Borrowed = d.pool.Shared()
	}
	b.PipesLimit, b.PipesInUse, b.PipesBuffered = relay.SplicePipes()
	return b
}

// startBudget fixes the budget once every service has started, before any
// serves.
func (d *Daemon) startBudget(limit int64) {
	base := openFDs()
	if limit <= 0 || base < 0 {
		if base < 0 {
			d.log.Warn("cannot count open descriptors (/proc/self/fd): no fd budget, one service may starve the others")
		}
		return
	}
	d.mu.Lock()
	d.budget = fdBudget{limit: limit, base: base}
	d.mu.Unlock()
	relay.SetSplicePipes(splicePipesFor(limit))
	d.applyBudget(d.current())
}

// applyBudget hands each of services its share of the budget: at start,
// and for the services a reload leaves running. A Limit of the pool that
// is not among services (a removed service, draining) loses its
// guarantee.
func (d *Daemon) applyBudget(services []*service) {
	b := d.budget
	if b.limit == 0 {
		return
	}
	demands := make([]demand, len(services))
	for i, s := range services {
		demands[i] = demandOf(s)
	}
	guaranteed := split(b.pool()/guaranteedPart, demands)
	shared := b.pool()
	shares := make(map[*datapath.Limit]datapath.Share, len(services))
	for i, s := range services {
		shared -= guaranteed[i] * demands[i].cost
		shares[s.limit] = datapath.Share{Guaranteed: guaranteed[i], Max: demands[i].max}
	}
	d.pool.Rebalance(shared, shares)
	d.log.Info("fd budget", "limit", b.limit, "reserved", b.reserve(), "open_at_start", b.base,
		"splice_pipes", splicePipesFor(b.limit), "services", len(services), "pool", b.pool(), "shared", shared)
	if b.pool() == 0 {
		d.log.Warn("the open file limit leaves the services no descriptor: every connection will be refused; raise it (LimitNOFILE= under systemd, ulimit -n)",
			"limit", b.limit, "reserved", b.reserve())
	}
	for i, s := range services {
		unit := "streams"
		if s.cfg.Listener.Type == "udp" {
			unit = "sessions"
		}
		// The most the service can hold: its guarantee and all of the
		// shared part, within its own cap.
		most := guaranteed[i] + shared/demands[i].cost
		if m := demands[i].max; m > 0 {
			most = min(most, m)
		}
		s.log.Info("fd budget share", "guaranteed_"+unit, guaranteed[i], "max_"+unit, most,
			"fds_guaranteed", guaranteed[i]*demands[i].cost)
		switch {
		case guaranteed[i] == 0 && b.pool() > 0:
			s.log.Warn("the service's fd budget guarantees it no "+unit+": it serves only from the shared descriptors; raise the open file limit",
				"limit", b.limit)
		case int64(s.cfg.MaxStreams) > most:
			s.log.Warn("maxStreams is above what the fd budget can give the service: it holds at most max_"+unit,
				"maxStreams", s.cfg.MaxStreams, "max_"+unit, most, "limit", b.limit)
		}
	}
}
