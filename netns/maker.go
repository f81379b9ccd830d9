package netns

import (
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Socket makers: one long-lived goroutine per namespace, locked to a thread
// that entered the namespace once, creating sockets on request. See "The
// locked-thread rule" in the package documentation for why.

// makerTiming is how a maker notices that it is no longer needed: every
// tick it checks that its path still names its namespace, and it exits
// after idleTicks ticks without a request.
type makerTiming struct {
	tick      time.Duration
	idleTicks int
}

// defaultMakerTiming releases a deleted namespace within a second, and
// costs an idle namespace one thread for ten seconds after its last dial.
var defaultMakerTiming = makerTiming{tick: time.Second, idleTicks: 10}

// makerAttempts bounds how often one socket request follows a maker that
// retired, or a path that changed, before it gives up.
const makerAttempts = 3

// socketRequest asks a maker for one socket(2). reply is buffered, so the
// maker never waits for the requester.
type socketRequest struct {
	domain, typ, proto int
	reply              chan socketResult
}

type socketResult struct {
	fd  int
	err error
}

// requests recycles socketRequests with their reply channels: a channel is
// the only allocation a request needs, and dials are frequent.
var requests = sync.Pool{New: func() any {
	return &socketRequest{reply: make(chan socketResult, 1)}
}}

// maker serves socket requests for the namespace whose identity is id.
type maker struct {
	id   ID
	ns   NS // the spec that started it; its path is re-checked every tick
	reqs chan *socketRequest
	makerTiming
	// spares holds sockets made ahead, per kind (see spareKind), so that
	// most dials take one without waiting for the maker's thread to be
	// scheduled; kick asks the maker to top them up.
	spares [len(spareKinds)]chan int
	kick   chan struct{}
	// done is closed when the maker stops receiving requests. err, set
	// before, says why it could not start; nil means it retired and a
	// fresh maker may be asked.
	done chan struct{}
	err  error
}

// makers holds at most one maker per namespace identity, and the threads
// makers hold outside the original namespace (for tests that check every
// other thread). timing is given to each new maker; tests shorten it.
var makers = struct {
	mu      sync.Mutex
	byID    map[ID]*maker
	threads map[int]bool
	timing  makerTiming
}{byID: make(map[ID]*maker), threads: make(map[int]bool), timing: defaultMakerTiming}

// socket creates a socket inside n, non-blocking and close-on-exec, on n's
// maker. It fails with an error wrapping ErrGone when n's path no longer
// exists, whether or not a maker for the namespace it named still runs.
func (n NS) socket(domain, typ, proto int) (int, error) {
	for range makerAttempts {
		id, err := n.pathID()
		if err != nil {
			return -1, err
		}
		m := makerFor(n, id)
		if fd, served, err := m.socket(domain, typ, proto); served {
			return fd, err
		}
		if m.err != nil { // ordered by the close of m.done
			return -1, m.err
		}
	}
	return -1, &nsError{ns: n, err: fmt.Errorf("%s names another namespace each time it is looked at", n.path)}
}

// pathID returns the identity of what n's path names now. It is the cheap
// per-request check (one stat, no fd) that keeps a deleted namespace from
// being used through a maker that entered it earlier.
func (n NS) pathID() (ID, error) {
	var st unix.Stat_t
	for {
		err := unix.Stat(n.path, &st)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return ID{}, &nsError{ns: n, err: &os.PathError{Op: "stat", Path: n.path, Err: err}, gone: err == unix.ENOENT}
		}
		return ID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
	}
}

// makerFor returns the maker of namespace id, starting it if there is none.
func makerFor(n NS, id ID) *maker {
	makers.mu.Lock()
	defer makers.mu.Unlock()
	if m := makers.byID[id]; m != nil {
		return m
	}
	m := &maker{id: id, ns: n, reqs: make(chan *socketRequest), makerTiming: makers.timing,
		kick: make(chan struct{}, 1), done: make(chan struct{})}
	for i := range m.spares {
		m.spares[i] = make(chan int, spareCap)
	}
	makers.byID[id] = m
	go m.run()
	return m
}

// socket sends one request. served is false when the maker stopped (or
// never started) before taking it.
func (m *maker) socket(domain, typ, proto int) (fd int, served bool, err error) {
	if k, ok := spareKind(domain, typ, proto); ok {
		select {
		case fd := <-m.spares[k]:
			if len(m.spares[k]) <= spareCap/2 {
				select {
				case m.kick <- struct{}{}:
				default: // a kick is pending already
				}
			}
			return fd, true, nil
		default:
		}
	}
	req := requests.Get().(*socketRequest)
	req.domain, req.typ, req.proto = domain, typ, proto
	select {
	case m.reqs <- req:
	case <-m.done:
		requests.Put(req)
		return -1, false, nil
	}
	// No cancellation here: socket(2) does not block, and a requester that
	// left would leak the fd the maker sends.
	res := <-req.reply
	requests.Put(req)
	return res.fd, true, res.err
}

// run is the maker's goroutine. The namespace file is opened and checked
// before a thread is locked, so a path that is not a namespace costs none.
func (m *maker) run() {
	fd, err := m.open()
	if err != nil || fd < 0 {
		m.retire(err)
		return
	}
	lockOffMainThread(func() { m.runLocked(fd) })
}

// runLocked enters the namespace open as fd (and closes fd), serves
// requests until the maker retires, then returns the thread to the original
// namespace. It runs locked to its thread and returns still locked when the
// thread must be discarded.
func (m *maker) runLocked(fd int) {
	tid := unix.Gettid()
	makers.mu.Lock()
	makers.threads[tid] = true
	makers.mu.Unlock()
	defer func() {
		makers.mu.Lock()
		delete(makers.threads, tid)
		makers.mu.Unlock()
	}()
	err := m.ns.enter(fd)
	unix.Close(fd) // the thread holds its own reference now
	if err != nil {
		runtime.UnlockOSThread() // a failed setns leaves the thread where it was
		m.retire(err)
		return
	}
	m.serve()
	m.retire(nil)
	// Unlock only a thread known to be back in the original namespace;
	// ending the goroutine while locked makes the runtime destroy the
	// thread.
	if err := setns(original.fd, unix.CLONE_NEWNET); err != nil {
		slog.Error("cannot return socket maker thread to the original network namespace; discarding the thread",
			"netns", m.ns.String(), "err", err)
		return
	}
	runtime.UnlockOSThread()
}

// open opens the maker's namespace file and checks that it still is the
// namespace the maker is registered for. fd is -1 with a nil error when the
// path names another namespace by now: the maker retires and its requesters
// look again.
func (m *maker) open() (fd int, err error) {
	if original.err != nil {
		return -1, &nsError{ns: m.ns, err: fmt.Errorf("cannot return from it, original namespace unavailable: %w", original.err)}
	}
	fd, err = m.ns.open()
	if err != nil {
		return -1, err
	}
	if err := m.ns.verify(fd); err != nil {
		unix.Close(fd)
		return -1, err
	}
	id, err := fdID(fd)
	if err != nil || id != m.id {
		unix.Close(fd)
		if err != nil {
			return -1, &nsError{ns: m.ns, err: err}
		}
		return -1, nil
	}
	return fd, nil
}

// serve creates sockets until the namespace is gone or the maker idle.
func (m *maker) serve() {
	tick := time.NewTicker(m.tick)
	defer tick.Stop()
	idle := 0
	defer m.dropSpares()
	var wanted [len(m.spares)]bool // kinds asked for since the maker started
	for {
		select {
		case req := <-m.reqs:
			idle = 0
			// req goes back to its pool once replied to.
			domain, typ, proto := req.domain, req.typ, req.proto
			fd, err := newSocket(domain, typ, proto)
			req.reply <- socketResult{fd: fd, err: err}
			if k, ok := spareKind(domain, typ, proto); ok {
				wanted[k] = true
				m.fillSpares(k)
			}
		case <-m.kick:
			idle = 0
			for k := range wanted {
				if wanted[k] {
					m.fillSpares(k)
				}
			}
		case <-tick.C:
			idle++
			// Exiting when the path no longer names the namespace
			// releases the thread's reference to it, so a deleted
			// namespace (and its devices) goes away as it would
			// without ebpfwd.
			if id, err := m.ns.pathID(); idle >= m.idleTicks || err != nil || id != m.id {
				return
			}
		}
	}
}

// Spare sockets. The maker's thread is locked, so waking it for a request
// means handing a P to it and back, which costs more than the socket(2)
// itself. Spares let a dial take a socket made earlier instead, and the
// maker top up in batches, once for every spareCap/2 dials. A spare is an
// unconnected socket made with the namespace's settings of its time; at
// most spareCap of each kind wait, and they are closed when the maker exits.
const spareCap = 16

// spareKinds are the sockets Dial makes, TCP and UDP over IPv4 and IPv6;
// their indexes number the maker's spares.
var spareKinds = [...]struct{ domain, typ int }{
	{unix.AF_INET, unix.SOCK_STREAM},
	{unix.AF_INET, unix.SOCK_DGRAM},
	{unix.AF_INET6, unix.SOCK_STREAM},
	{unix.AF_INET6, unix.SOCK_DGRAM},
}

func spareKind(domain, typ, proto int) (int, bool) {
	for k, kind := range spareKinds {
		if proto == 0 && kind.domain == domain && kind.typ == typ {
			return k, true
		}
	}
	return 0, false
}

// fillSpares tops up spares of kind k. A socket(2) failure (say, the fd
// limit) just stops it: the next dial asks for its socket directly and
// gets the error.
func (m *maker) fillSpares(k int) {
	for len(m.spares[k]) < spareCap {
		fd, err := newSocket(spareKinds[k].domain, spareKinds[k].typ, 0)
		if err != nil {
			return
		}
		m.spares[k] <- fd // only the maker sends, so there is room
	}
}

// dropSpares closes the spares nobody took.
func (m *maker) dropSpares() {
	for _, spares := range m.spares {
		for len(spares) > 0 {
			select {
			case fd := <-spares:
				unix.Close(fd)
			default: // a dial took the last one meanwhile
			}
		}
	}
}

func newSocket(domain, typ, proto int) (int, error) {
	fd, err := unix.Socket(domain, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	return fd, nil
}

// retire unregisters the maker and tells waiting requesters. err is the
// reason it could not start, nil when it just stopped.
func (m *maker) retire(err error) {
	makers.mu.Lock()
	if makers.byID[m.id] == m {
		delete(makers.byID, m.id)
	}
	makers.mu.Unlock()
	m.err = err
	close(m.done)
}

// lockOffMainThread locks the calling goroutine to an OS thread that is not
// the process's main thread. A maker's thread stays in its namespace for a
// long time, and the main thread's namespace is the one /proc/PID/ns/net
// shows: tools (and Find) would take the daemon for living in the target
// namespace.
//
// next runs locked, on the calling goroutine or, when that is on the main
// thread, on a fresh goroutine, which cannot start on the main thread while
// the caller holds it locked. lockOffMainThread may then return before next
// does, so it must be the last thing its caller does.
func lockOffMainThread(next func()) {
	runtime.LockOSThread()
	if unix.Gettid() != unix.Getpid() {
		next()
		return
	}
	locked := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		close(locked)
		next()
	}()
	<-locked
	runtime.UnlockOSThread()
}
