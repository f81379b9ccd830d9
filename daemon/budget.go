package daemon

import (
	"fmt"
	"log/slog"
	"os"
	"syscall"

	"github.com/ebpfwd/ebpfwd/userspace/relay"
)

// The fd budget keeps one service from taking every file descriptor the
// process may open. Without it a UDP flood from thousands of source ports
// (one socket per session) or a TCP connection storm ran the daemon out of
// descriptors, and every other service, the metrics endpoint and the
// control socket stopped accepting until the flood's sessions expired.
//
// The budget is RLIMIT_NOFILE's soft limit, raised to the hard limit at
// start. Out of it the daemon keeps a reserve for itself, and splits the
// rest between the services:
//
//   - reserve = the descriptors open once every service has started
//     (stdio, the log file, the runtime's poller, every listening socket,
//     the metrics listener, the control socket, namespace handles, the
//     kernel datapaths' BPF programs, maps, links and netlink sockets),
//     measured then, plus fdHeadroom for what comes and goes.
//   - each service gets a fair share of the rest (max-min fair: a service
//     whose own cap needs less than an equal share takes only what it
//     needs, and the others split what it leaves), and holds at most
//     share/cost streams or sessions at once: tcpStreamFDs per TCP stream,
//     udpSessionFDs per UDP session.
//
// A TCP connection beyond its service's share is reset as soon as it is
// accepted; a datagram that would open a UDP session beyond it is dropped.
// Both count as errors_total{reason="fd_budget"}.
const (
	// fdHeadroom is what the daemon may open beyond what it held at start,
	// whatever the services do:
	//   - 8 concurrent metrics scrapes (each an accepted connection);
	//   - 4 concurrent control socket clients (ebpfwd reload, conns);
	//   - 16 node health probes in flight (tc services probe their nodes
	//     with a socket each);
	//   - 16 for dials in progress that no stream or session accounts for:
	//     the namespace file a dial into another namespace opens for its
	//     setns, the sockets and /etc files of a name lookup, a UDP
	//     session's dial (a session is costed at its one socket);
	//   - 16 for a reload, which opens the new form's listeners and
	//     datapath before the old form's close;
	//   - 4 for the rest: a log file reopened, a ready file written.
	fdHeadroom = 64
	// tcpStreamFDs is what one relayed TCP stream may hold: the accepted
	// and the dialed socket, and while bytes move, one splice(2) pipe per
	// direction (two descriptors each; the relay borrows them only while
	// a direction has data, so an idle stream holds just its two
	// sockets). The budget counts the worst case so that streams that all
	// move bytes at once still fit. An HTTP proxy connection (client and
	// target) and a chained stream (the upstream is one socket to the
	// first hop) cost the same.
	tcpStreamFDs = 6
	// udpSessionFDs is what one UDP session holds: its connected upstream
	// socket. Replies go out through the service's listening socket.
	udpSessionFDs = 1
)

// fdBudget is the daemon's descriptor budget, fixed at start.
type fdBudget struct {
	limit int64 // RLIMIT_NOFILE's soft limit; 0: unknown, no budget
	base  int64 // descriptors open when the services had started
}

// reserve is what the daemon keeps for itself.
func (b fdBudget) reserve() int64 { return b.base + fdHeadroom }

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
	d.budget = fdBudget{limit: limit, base: base}
	d.applyBudget(d.current())
}

// applyBudget gives each of services its share of the budget: at start,
// and for the services a reload leaves running.
func (d *Daemon) applyBudget(services []*service) {
	b := d.budget
	if b.limit == 0 {
		return
	}
	demands := make([]demand, len(services))
	for i, s := range services {
		demands[i] = demandOf(s)
	}
	grants := split(b.pool(), demands)
	d.log.Info("fd budget", "limit", b.limit, "reserved", b.reserve(), "open_at_start", b.base,
		"services", len(services), "shared", b.pool())
	if b.pool() == 0 {
		d.log.Warn("the open file limit leaves the services no descriptor: every connection will be refused; raise it (LimitNOFILE= under systemd, ulimit -n)",
			"limit", b.limit, "reserved", b.reserve())
	}
	for i, s := range services {
		grant := grants[i]
		s.limit.SetMax(grant)
		unit := "streams"
		if s.cfg.Listener.Type == "udp" {
			unit = "sessions"
		}
		s.log.Info("fd budget share", "max_"+unit, grant, "fds", grant*demands[i].cost)
		switch {
		case grant == 0 && b.pool() > 0:
			s.log.Warn("the service's fd budget share holds no "+unit+": every one will be refused; raise the open file limit",
				"limit", b.limit)
		case int64(s.cfg.MaxStreams) > grant:
			s.log.Warn("maxStreams is above the service's fd budget share: clamped",
				"maxStreams", s.cfg.MaxStreams, "max_"+unit, grant, "limit", b.limit)
		}
	}
}
