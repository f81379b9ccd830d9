// Package relay moves bytes between an accepted client connection and the
// upstream connection dialed for it: the userspace datapath of ebpfwd.
//
// TCP streams between kernel sockets are read into a pooled buffer and
// written while messages are small, and spliced (splice(2)) once a read
// fills the buffer, in bounded chunks so byte counters stay live and idle
// deadlines can be re-armed. UDP is relayed per client session over the service's single
// listening socket.
package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/datapath"
)

// Counts are live byte counters a relay adds to as bytes move. A
// connection's own Counts may credit a shared Total too (the service's), so
// one relay keeps both per-connection and per-service figures live.
type Counts struct {
	Up   atomic.Uint64 // client -> upstream
	Down atomic.Uint64 // upstream -> client
	// Total, when set, is credited with every byte counted here.
	Total *Counts
}

// counter adds to one direction of a Counts and its Total.
type counter struct{ own, total *atomic.Uint64 }

func (c counter) Add(n uint64) {
	c.own.Add(n)
	if c.total != nil {
		c.total.Add(n)
	}
}

func (c *Counts) up() counter {
	if c.Total == nil {
		return counter{own: &c.Up}
	}
	return counter{own: &c.Up, total: &c.Total.Up}
}

func (c *Counts) down() counter {
	if c.Total == nil {
		return counter{own: &c.Down}
	}
	return counter{own: &c.Down, total: &c.Total.Down}
}

// ErrIdleTimeout is returned (wrapped) by TCP when neither direction moved a
// byte for the idle duration.
var ErrIdleTimeout = errors.New("idle timeout")

// chunkSize bounds one copy call. Small enough that counters and deadlines
// are refreshed often during bulk transfers, large enough that splice(2)
// amortises its syscalls.
const chunkSize = 1 << 20

// liveCountWindow bounds how stale a long-lived connection's byte counts
// (metrics, ebpfwd conns) may be.
const liveCountWindow = time.Second

// bufferSize is the userspace buffer used when a direction cannot splice.
const bufferSize = 32 << 10

// Tunnel is implemented by a proxy connection that read bytes past its
// handshake: Pending holds them, NetConn is the raw connection underneath.
// TCP forwards Pending first and then relays from NetConn so splice(2) still
// applies after a proxy handshake.
type Tunnel interface {
	Pending() []byte
	NetConn() net.Conn
}

// TCP moves bytes both ways between client and upstream until both
// directions finish, then closes both connections. It takes ownership of
// both.
//
// When one direction reaches EOF the write side of its destination is shut
// down (half-close) and the other direction keeps running. An error in either
// direction aborts the relay: both connections are reset so neither peer
// mistakes a truncated stream for a complete one, and the error is returned.
// A clean end returns nil.
//
// While the relay runs, both sockets carry SO_LINGER{on, 0}: should the
// process die (SIGKILL, the OOM killer, a crash), the kernel closes them
// with a reset, not the FIN an orderly end sends, so a peer never mistakes
// a stream cut by the relay's death for a complete one. A clean end clears
// it before the final close, so the peers see a graceful close and bytes
// still queued for them are delivered.
//
// A destination without CloseWrite cannot be half-closed; the other
// direction then runs until its own end, an error, the idle timeout or ctx.
//
// With idle > 0 the relay ends with ErrIdleTimeout once neither direction has
// moved a byte for idle; it fires between idle and 1.5×idle after the last
// byte. A one-way transfer keeps the quiet direction alive, and so does a
// direction blocked delivering bytes to a peer that is slow to read.
//
// Cancelling ctx aborts the relay and returns an error wrapping ctx's cause.
// c may be nil.
func TCP(ctx context.Context, client, upstream net.Conn, idle time.Duration, c *Counts) error {
	return TCPWith(ctx, client, upstream, Options{Idle: idle, Counts: c})
}

// Options are the settings of one relayed stream beyond its connections.
type Options struct {
	Idle   time.Duration // see TCP
	Counts *Counts       // may be nil
	// Up and Down bound each direction's rate (client -> upstream and
	// upstream -> client): after each chunk the direction waits on every
	// one of them for the chunk's bytes, and a chunk is never larger than
	// the smallest burst, so no direction runs ahead of its buckets by
	// more than one burst.
	Up, Down []Bucket
}

// Bucket is a token bucket of bytes: datapath's, which *rate.Limiter of
// golang.org/x/time satisfies.
type Bucket = datapath.Bucket

// TCPWith is TCP with every option.
func TCPWith(ctx context.Context, client, upstream net.Conn, o Options) error {
	c, idle := o.Counts, o.Idle
	if c == nil {
		c = new(Counts)
	}
	// A direction waiting on a bucket must stop once the relay aborted;
	// without buckets nothing waits on the context, and a stream spares
	// its own (a context and its children's map per connection).
	parent, cancel := ctx, context.CancelFunc(func() {})
	if len(o.Up)+len(o.Down) > 0 {
		ctx, cancel = context.WithCancel(ctx)
	}
	defer cancel()
	r := &tcpRelay{
		ctx:    ctx,
		cancel: cancel,
		conns:  [...]net.Conn{client, upstream},
		idle:   idle,
		start:  time.Now(),
		done:   make(chan error, 1),
	}
	clientRaw, clientPending := unwrap(client)
	upstreamRaw, upstreamPending := unwrap(upstream)
	r.raw = [...]net.Conn{clientRaw, upstreamRaw}
	// Once per socket per stream, not per chunk. A half-close is
	// shutdown(SHUT_WR), which sends FIN whatever the linger, so the option
	// can stay on until abort decides how the final close ends.
	for i, raw := range r.raw {
		r.lingering[i] = setLinger(raw, 0)
	}
	r.dirs = [...]*direction{
		newDirection("client→upstream", clientRaw, upstreamRaw, clientPending, c.up(), o.Up),
		newDirection("upstream→client", upstreamRaw, clientRaw, upstreamPending, c.down(), o.Down),
	}
	// Read deadlines interrupt a blocked copy every window so the bytes
	// it moved so far are counted (splice(2) reports them only when the
	// copy call returns) and, with an idle timeout, so quiet time is seen.
	r.window = liveCountWindow
	if idle > 0 {
		r.window = min(max(idle/4, time.Millisecond), liveCountWindow)
	}

	stop := context.AfterFunc(parent, func() {
		r.abort(fmt.Errorf("relay aborted: %w", context.Cause(parent)), true)
	})
	defer stop()

	// One direction runs on a goroutine of its own, the other on the
	// caller's: an idle stream costs one goroutine stack fewer. Each
	// aborts the relay itself when it fails, since the other may be
	// blocked and nobody else is watching.
	go func() { r.done <- r.finish(r.run(r.dirs[0])) }()
	r.finish(r.run(r.dirs[1]))
	<-r.done
	r.abort(nil, false) // both directions finished: plain close
	return r.reason
}

// finish ends a direction: a failed one aborts the relay (an idle timeout
// with a plain close, anything else with resets).
func (r *tcpRelay) finish(err error) error {
	if err != nil {
		r.abort(err, !errors.Is(err, ErrIdleTimeout))
	}
	return err
}

// tcpRelay is the state shared by the two directions of one TCP relay.
type tcpRelay struct {
	// ctx ends when the relay does (abort cancels it), so a direction
	// waiting on a bucket stops waiting once the other one failed.
	ctx    context.Context
	cancel context.CancelFunc
	conns  [2]net.Conn // as handed to TCP (closed too, in case a tunnel owns more than its NetConn)
	raw    [2]net.Conn // what bytes are actually read from and written to
	dirs   [2]*direction
	done   chan error

	idle   time.Duration
	window time.Duration // read deadline granularity
	start  time.Time     // origin of the monotonic nanosecond clock below
	// lastActive is when a byte last moved in either direction, in
	// nanoseconds since start.
	lastActive atomic.Int64

	// lingering records which raw sockets got SO_LINGER{on, 0} at start:
	// closed as they are, they reset their peer.
	lingering [2]bool

	closeOnce sync.Once
	reason    error // first reason the relay ended; set once in abort
}

// lingerer is a socket whose close can be made to discard unsent data and
// reset the peer (*net.TCPConn).
type lingerer interface{ SetLinger(sec int) error }

// setLinger sets c's SO_LINGER as (*net.TCPConn).SetLinger does: 0 makes a
// close reset, -1 restores the default graceful close. It reports whether
// c took it; a socket without the option (a Unix stream) just keeps its
// default, and a failure leaves the stream to end as it would have anyway.
func setLinger(c net.Conn, sec int) bool {
	l, ok := c.(lingerer)
	return ok && l.SetLinger(sec) == nil
}

// direction is one way of a relay.
type direction struct {
	name     string
	src, dst net.Conn
	pending  []byte
	counter  counter
	limited  io.LimitedReader
	chunk    int64           // bytes one copy call moves at most
	buckets  []Bucket        // rate limits: waited on after every chunk
	buf      []byte          // nil when dst splices from src in the kernel
	srcRaw   syscall.RawConn // src's socket, when splicing
	dstRaw   syscall.RawConn // dst's socket, when splicing
	rc       rawCopy         // readWrite's state, when splicing
	// bulk: the direction splices. It starts false: a direction first
	// reads what the socket holds into a pooled buffer and writes it, which
	// costs two syscalls for a small message where splicing costs a peek,
	// two or three splice calls and a pipe; a read that fills the buffer
	// means a bulk transfer, and the direction splices until a read window
	// ends with less than a buffer moved.
	bulk bool
	// deadline is the read deadline armed on src: re-armed only once half
	// a window has passed, not before every chunk, so a chatty stream does
	// not reset a runtime timer per message.
	deadline time.Time
	// quietUntil is the latest time (ns since start) up to which this
	// direction is known to have moved nothing since its last activity: set
	// whenever a read window expires empty, and to MaxInt64 once the
	// direction has finished.
	quietUntil atomic.Int64
}

func newDirection(name string, src, dst net.Conn, pending []byte, counter counter, buckets []Bucket) *direction {
	d := &direction{name: name, src: src, dst: dst, pending: pending, counter: counter, chunk: chunkSize, buckets: buckets}
	for _, b := range buckets {
		d.chunk = min(d.chunk, int64(max(b.Burst(), 1)))
	}
	d.limited.R = src
	// *net.TCPConn.ReadFrom splices from a TCP or Unix stream socket; any
	// other pair gets one reusable buffer instead of io.Copy's per-call
	// allocation.
	if sc, ok := src.(syscall.Conn); ok && splices(src, dst) {
		raw, err := sc.SyscallConn()
		draw, derr := dst.(syscall.Conn).SyscallConn()
		if err == nil && derr == nil {
			d.srcRaw, d.dstRaw = raw, draw
			d.rc.init()
		}
	}
	if d.srcRaw == nil {
		d.buf = make([]byte, bufferSize)
	}
	return d
}

// splices reports whether dst.ReadFrom(src) moves bytes with splice(2).
func splices(src, dst net.Conn) bool {
	if _, ok := dst.(*net.TCPConn); !ok {
		return false
	}
	switch src.(type) {
	case *net.TCPConn, *net.UnixConn:
		return true
	default:
		return false
	}
}

func unwrap(c net.Conn) (net.Conn, []byte) {
	if t, ok := c.(Tunnel); ok {
		if raw := t.NetConn(); raw != nil {
			return raw, t.Pending()
		}
	}
	return c, nil
}

// now is a monotonic clock in nanoseconds since the relay started.
func (r *tcpRelay) now() int64 { return int64(time.Since(r.start)) }

// abort closes both connections once, recording why. reset discards unsent
// data and makes the peers see a reset instead of an orderly end.
func (r *tcpRelay) abort(reason error, reset bool) {
	r.closeOnce.Do(func() {
		r.reason = reason
		defer r.cancel()
		for i := range r.raw {
			switch {
			case reset && !r.lingering[i]:
				// Not armed at start: best effort now, Close below still
				// ends the stream.
				setLinger(r.raw[i], 0)
			case !reset && r.lingering[i]:
				// Closed with linger{on, 0}, the socket would drop what the
				// peer has not acknowledged yet (the tail of a stream whose
				// reader is slow) and reset it instead of closing.
				setLinger(r.raw[i], -1)
			}
			_ = r.raw[i].Close()
			if r.conns[i] != r.raw[i] {
				_ = r.conns[i].Close()
			}
		}
	})
}

// run copies one direction until EOF, error or idle timeout.
func (r *tcpRelay) run(d *direction) error {
	defer d.quietUntil.Store(math.MaxInt64)

	if len(d.pending) > 0 {
		n, err := d.dst.Write(d.pending)
		d.counter.Add(uint64(n))
		r.lastActive.Store(r.now())
		if err != nil {
			return fmt.Errorf("relay %s: write pending bytes: %w", d.name, err)
		}
	}
	for {
		if now := time.Now(); now.After(d.deadline.Add(-r.window / 2)) {
			d.deadline = now.Add(r.window)
			if err := d.src.SetReadDeadline(d.deadline); err != nil {
				return fmt.Errorf("relay %s: arm read deadline: %w", d.name, err)
			}
		}
		n, err := d.copyChunk()
		if n > 0 {
			d.counter.Add(uint64(n))
			r.lastActive.Store(r.now())
		}
		switch {
		case errors.Is(err, errMore): // a read-mode chunk: the stream goes on
			if err := d.charge(r.ctx, n); err != nil {
				return fmt.Errorf("relay %s: rate limit: %w", d.name, err)
			}
			continue
		case err == nil && n == d.chunk:
			if err := d.charge(r.ctx, n); err != nil {
				return fmt.Errorf("relay %s: rate limit: %w", d.name, err)
			}
			continue
		case err == nil: // short chunk without error: src reached EOF
			if d.dstRaw != nil {
				if err := shutdownWrite(d.dstRaw); err != nil && !errors.Is(err, syscall.ENOTCONN) {
					return fmt.Errorf("relay %s: propagate half-close: %w", d.name, err)
				}
			} else if cw, ok := d.dst.(interface{ CloseWrite() error }); ok {
				// ENOTCONN: the destination's peer already closed the whole
				// connection, so there is no one left to tell; the other
				// direction sees that end for itself.
				if err := cw.CloseWrite(); err != nil && !errors.Is(err, syscall.ENOTCONN) {
					return fmt.Errorf("relay %s: propagate half-close: %w", d.name, err)
				}
			}
			return nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			// The window expired: re-arm before the next chunk.
			d.deadline = time.Time{}
			if n < bufferSize {
				d.bulk = false // no longer a bulk transfer: read first again
			}
			if n == 0 {
				d.quietUntil.Store(r.now())
			} else if err := d.charge(r.ctx, n); err != nil {
				return fmt.Errorf("relay %s: rate limit: %w", d.name, err)
			}
			if r.idle > 0 && r.idleExpired() {
				return fmt.Errorf("relay: no bytes moved for %s: %w", r.idle, ErrIdleTimeout)
			}
		default:
			return fmt.Errorf("relay %s: %w", d.name, err)
		}
	}
}

// idleExpired reports whether both directions are known to have moved
// nothing for idle since the last activity. A direction mid-way through a
// read window may have moved bytes it has not reported yet, so its own word
// (quietUntil) is required rather than the shared timestamp alone: that is
// what keeps a slow one-way trickle from timing out the other direction.
func (r *tcpRelay) idleExpired() bool {
	deadline := r.lastActive.Load() + int64(r.idle)
	for _, d := range r.dirs {
		if d.quietUntil.Load() < deadline {
			return false
		}
	}
	return true
}

// charge waits until every bucket of the direction has n bytes' worth of
// tokens: the bytes have moved already, so the next chunk waits for them.
// n is at most the chunk, which is at most every bucket's burst.
func (d *direction) charge(ctx context.Context, n int64) error {
	for _, b := range d.buckets {
		if err := b.WaitN(ctx, int(n)); err != nil {
			return err
		}
	}
	return nil
}

// copyChunk moves up to d.chunk bytes. It returns a nil error with fewer
// than chunkSize bytes only at EOF, like io.CopyN without the io.EOF.
func (d *direction) copyChunk() (int64, error) {
	d.limited.N = d.chunk
	if d.buf == nil && !d.bulk {
		return d.readWrite()
	}
	if d.buf == nil {
		// Splice borrows a pipe (two fds) for as long as its call waits
		// for data, so wait first: an idle connection then holds only its
		// two sockets, not two pipes as well.
		if err := waitReadable(d.srcRaw); err != nil {
			return 0, err
		}
		if !takePipe() {
			return copyThroughBuffer(d.dst, &d.limited)
		}
		defer givePipe()
		// *net.TCPConn.ReadFrom accepts *io.LimitedReader and splices.
		return d.dst.(io.ReaderFrom).ReadFrom(&d.limited)
	}
	return io.CopyBuffer(writerOnly{d.dst}, &d.limited, d.buf)
}

// errMore is what readWrite returns with the bytes it moved when the stream
// goes on: unlike a splice chunk, a short read is not the end.
var errMore = errors.New("more to come")

// readWrite moves what src holds, up to one buffer, with one read(2) into a
// pooled buffer and a write to dst. The buffer is taken only once the read
// has data, so a waiting direction holds none. A read that fills the buffer
// switches the direction to splicing. It returns errMore with the bytes
// moved, a nil error at EOF.
func (d *direction) readWrite() (int64, error) {
	rc := &d.rc
	rc.want = int(min(int64(bufferSize), d.chunk))
	rc.n, rc.err = 0, nil
	err := d.srcRaw.Read(rc.readFn)
	if rc.buf != nil {
		defer func() { copyBuffers.Put(rc.buf); rc.buf = nil }()
	}
	switch {
	case err != nil:
		return 0, err
	case rc.err != nil:
		return 0, os.NewSyscallError("read", rc.err)
	case rc.n <= 0:
		return 0, nil // EOF
	}
	if rc.n == rc.want {
		d.bulk = true
	}
	rc.written = 0
	err = d.dstRaw.Write(rc.writeFn)
	if err == nil && rc.err != nil {
		err = os.NewSyscallError("write", rc.err)
	}
	if err != nil {
		return int64(rc.written), err
	}
	return int64(rc.written), errMore
}

// rawCopy is readWrite's state. Its two callbacks are made once per
// direction: a function handed to RawConn.Read or Write escapes, so
// closures made per call would cost several allocations per message.
type rawCopy struct {
	want    int     // bytes one read may take
	buf     *[]byte // the pooled buffer, while it holds bytes
	n       int     // bytes read into buf
	written int     // of those, bytes written
	err     error   // the read's or the write's errno
	readFn  func(fd uintptr) bool
	writeFn func(fd uintptr) bool
}

func (rc *rawCopy) init() {
	rc.readFn = func(fd uintptr) bool {
		rc.buf = copyBuffers.Get().(*[]byte)
		rc.n, rc.err = rawIO(unix.SYS_READ, fd, (*rc.buf)[:rc.want])
		if rc.err == unix.EAGAIN {
			copyBuffers.Put(rc.buf)
			rc.buf, rc.err = nil, nil
			return false // nothing yet: wait for the poller
		}
		return true
	}
	rc.writeFn = func(fd uintptr) bool {
		for rc.written < rc.n {
			n, err := rawIO(unix.SYS_WRITE, fd, (*rc.buf)[rc.written:rc.n])
			if err == unix.EAGAIN {
				return false // the send buffer is full: wait for the poller
			}
			if err != nil {
				rc.err = err
				return true
			}
			rc.written += n
		}
		return true
	}
}

// rawIO is read(2) or write(2) on a non-blocking socket, without telling
// the Go scheduler: the call never blocks, and a scheduler told of a
// syscall that takes more than 20 µs (one that runs the network stack
// inline, as a write to a veth peer does) hands the goroutine's P to
// another thread, a futex wake and two context switches per message.
func rawIO(trap, fd uintptr, p []byte) (int, error) {
	for {
		r, _, e := syscall.RawSyscall(trap, fd, uintptr(unsafe.Pointer(unsafe.SliceData(p))), uintptr(len(p)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 0, e
		}
		return int(r), nil
	}
}

// shutdownWrite is CloseWrite with rawIO's reason: the FIN it sends runs
// the peer's stack inline.
func shutdownWrite(c syscall.RawConn) error {
	var shutErr error
	err := c.Control(func(fd uintptr) {
		_, _, e := syscall.RawSyscall(syscall.SYS_SHUTDOWN, fd, syscall.SHUT_WR, 0)
		if e != 0 {
			shutErr = os.NewSyscallError("shutdown", e)
		}
	})
	if err != nil {
		return err
	}
	return shutErr
}

// waitReadable returns once c has data, EOF or an error to report, or its
// read deadline passes. It peeks without consuming, so it never waits
// while data is already queued.
func waitReadable(c syscall.RawConn) error {
	var b [1]byte
	var peekErr error
	err := c.Read(func(fd uintptr) bool {
		_, _, err := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		switch err {
		case unix.EAGAIN:
			return false // nothing yet: wait for the poller
		case nil, unix.EINTR:
		default:
			// The kernel reports a socket error (a reset) once, and the
			// peek has just taken it: it must not come back as a clean EOF.
			peekErr = os.NewSyscallError("recvfrom", err)
		}
		return true
	})
	if err != nil {
		return err
	}
	return peekErr
}

// writerOnly hides a destination's ReadFrom so io.CopyBuffer uses the
// direction's buffer.
type writerOnly struct{ io.Writer }
