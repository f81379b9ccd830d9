package daemon

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// acceptBackoffMax bounds the pause after a failing Accept (EMFILE and the
// like): long enough not to spin, short enough to recover quickly.
const acceptBackoffMax = time.Second

// acceptor is a listening socket and its accept loop. It belongs to no one
// service: it hands each connection to its current owner, so a reload can
// give a changed service its previous form's listener without closing it.
// No connection is refused across the switch, and the kernel's accept
// queue is never dropped.
type acceptor struct {
	l     net.Listener
	owner atomic.Pointer[service]

	startOnce sync.Once
	done      chan struct{} // closed when the accept loop has ended
	started   atomic.Bool
}

func newAcceptor(l net.Listener, owner *service) *acceptor {
	a := &acceptor{l: l, done: make(chan struct{})}
	a.owner.Store(owner)
	return a
}

// start runs the accept loop, once.
func (a *acceptor) start() {
	a.startOnce.Do(func() {
		a.started.Store(true)
		go a.run()
	})
}

// handOver makes s the owner of every connection accepted from now on.
func (a *acceptor) handOver(s *service) { a.owner.Store(s) }

func (a *acceptor) run() {
	defer close(a.done)
	var backoff time.Duration
	for {
		conn, err := a.l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), acceptBackoffMax)
			s := a.owner.Load()
			s.errs.Add(ReasonAccept)
			s.log.Error("accept failed", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		a.dispatch(conn)
	}
}

// dispatch gives conn to the owner. A reload stores the new owner before
// the old one starts draining, so an owner that refuses (it drains) has
// been replaced: the second look finds the new one.
func (a *acceptor) dispatch(conn net.Conn) {
	for range 2 {
		s := a.owner.Load()
		if s.begin() {
			release, ok := s.admit(conn)
			if !ok {
				s.wg.Done() // refused: admit closed it
				return
			}
			go s.handle(conn, release)
			return
		}
	}
	conn.Close() // the owner drains for shutdown: nobody takes it
}

// close closes the listener and waits for the accept loop to end.
func (a *acceptor) close() {
	a.l.Close()
	a.startOnce.Do(func() {}) // no loop starts after this
	if a.started.Load() {
		<-a.done
	}
}
