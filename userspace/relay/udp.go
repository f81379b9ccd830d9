package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// DefaultUDPTTL is how long a UDP session survives without a datagram in
	// either direction when UDP.TTL is zero.
	DefaultUDPTTL = 5 * time.Second
	// DefaultMaxUDPSessions bounds concurrent UDP sessions when
	// UDP.MaxSessions is zero.
	DefaultMaxUDPSessions = 65536

	// maxDatagram holds any UDP payload (65535 minus the 8-byte header,
	// rounded up).
	maxDatagram = 64 << 10
	// maxBacklog bounds the datagrams a session buffers while its upstream
	// socket is still being opened.
	maxBacklog = 16
	// udpDialTimeout bounds opening one session's upstream socket so a
	// stuck Dial cannot hold a session slot (or Serve's shutdown) forever.
	udpDialTimeout = 10 * time.Second
)

// replyBuffers lends datagram buffers to sessions only while a reply is in
// hand, so thousands of idle sessions do not each pin 64 KiB.
var replyBuffers = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// UDP relays datagrams between the clients of one listening socket and a
// connected upstream socket per client (a session). Sessions expire after TTL
// without traffic. Datagram boundaries are preserved.
//
// The hooks (Dial, OnSession, OnError) are called from several goroutines.
type UDP struct {
	// Conn is the service's listening socket. Serve reads it and writes
	// replies through it; the caller owns and closes it.
	Conn net.PacketConn
	// Dial opens the upstream socket for a new client (a connected UDP
	// socket, in the service's outbound namespace) and names the node it
	// reaches, for Sessions ("" when there is no name).
	Dial func(ctx context.Context, client net.Addr) (conn net.Conn, node string, err error)
	// TTL is the session idle expiry (DefaultUDPTTL when zero).
	TTL time.Duration
	// OneReply ends a session once it has passed one reply to its client
	// (GOST's udp listener without keepAlive): the client's next datagram
	// opens a new session. False keeps a session until TTL.
	OneReply bool
	// ReadSize cuts client datagrams longer than this many bytes, as
	// GOST's readBufferSize does (the kernel drops what does not fit its
	// buffer); 0 passes whole datagrams.
	ReadSize int
	// Counts receives byte counts; may be nil.
	Counts *Counts
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// MaxSessions bounds concurrent sessions (DefaultMaxUDPSessions when
	// zero). Datagrams from new clients beyond it are dropped and counted.
	MaxSessions int
	// OnSession, if set, is called with true when a session opens and false
	// when it closes, exactly once each (active-session metrics). It runs
	// under the session table's lock and must not block.
	OnSession func(opened bool)
	// Admit, if set, is asked before a session of client opens, after
	// MaxSessions: false drops the datagram (counted in Dropped) and opens
	// nothing (the daemon's fd budget, GOST's climiter and rlimiter). The
	// release it returns with true is called exactly once, when the
	// session closes. It runs under the session table's lock and must not
	// block.
	Admit func(client netip.AddrPort) (release func(), ok bool)
	// OnError, if set, receives per-session failures (dial errors, upstream
	// read and write errors) that do not stop Serve.
	OnError func(err error)

	dropped atomic.Uint64
	table   atomic.Pointer[udpTable] // the running Serve's sessions, for Sessions
	// readingStopped: StopReading was called.
	readingStopped atomic.Bool
}

// errReadingStopped ends readClients after StopReading.
var errReadingStopped = errors.New("udp relay: reading stopped")

// StopReading ends Serve's reading of client datagrams, and only that:
// the sessions already open keep relaying their replies through Conn
// until they expire (TTL) or Serve's context ends, and then Serve returns.
// An upgrade calls it: the new process shares Conn and reads every
// datagram from then on, while replies to what this process forwarded
// still reach their clients.
func (u *UDP) StopReading() {
	u.readingStopped.Store(true)
	_ = u.Conn.SetReadDeadline(time.Unix(1, 0)) // unblocks ReadFrom; this process's deadline only
}

// Session describes one live UDP session.
type Session struct {
	Client   netip.AddrPort
	Node     string // as Dial named it; "" while the upstream opens
	Upstream string // the upstream socket's remote address; "" while it opens
	Started  time.Time
	Idle     time.Duration // since a datagram last moved either way
	// Payload bytes and datagrams relayed client -> upstream (Up) and
	// back (Down); datagrams dropped or cut short count what was sent.
	BytesUp, BytesDown         uint64
	DatagramsUp, DatagramsDown uint64
}

// Sessions lists the live sessions of the running Serve.
func (u *UDP) Sessions() []Session {
	t := u.table.Load()
	if t == nil {
		return nil
	}
	// Lock order is s.mu before t.mu: copy the table, then visit each
	// session on its own.
	t.mu.Lock()
	open := make([]*udpSession, 0, len(t.sessions))
	for _, s := range t.sessions {
		open = append(open, s)
	}
	t.mu.Unlock()
	now := t.now()
	out := make([]Session, 0, len(open))
	for _, s := range open {
		info := Session{Client: s.key, Started: s.started, Idle: time.Duration(now - s.lastActive.Load()),
			BytesUp: s.counts.Up.Load(), BytesDown: s.counts.Down.Load(),
			DatagramsUp: s.datagramsUp.Load(), DatagramsDown: s.datagramsDown.Load()}
		s.mu.Lock()
		closed := s.closed
		if s.up != nil {
			info.Upstream = s.up.RemoteAddr().String()
			info.Node = s.node
		}
		s.mu.Unlock()
		if !closed {
			out = append(out, info)
		}
	}
	return out
}

// Dropped returns how many client datagrams were discarded: beyond
// MaxSessions or refused by Admit, beyond a session's backlog while its upstream was opening, or
// because the upstream could not be opened.
func (u *UDP) Dropped() uint64 { return u.dropped.Load() }

// Serve relays until ctx is done or Conn is closed, both of which return nil;
// any other read error on Conn is returned. Before returning it closes every
// session's upstream socket and waits for the session goroutines to exit.
// On ctx cancellation it interrupts the blocked read by setting a read
// deadline in the past on Conn.
func (u *UDP) Serve(ctx context.Context) error {
	if u.Conn == nil || u.Dial == nil {
		return errors.New("udp relay: Conn and Dial are required")
	}
	ctx, cancel := context.WithCancel(ctx)
	t := &udpTable{
		u:           u,
		ctx:         ctx,
		start:       time.Now(),
		ttl:         u.TTL,
		maxSessions: u.MaxSessions,
		counts:      u.Counts,
		log:         u.Logger,
		sessions:    make(map[netip.AddrPort]*udpSession),
	}
	if t.ttl <= 0 {
		t.ttl = DefaultUDPTTL
	}
	if t.maxSessions <= 0 {
		t.maxSessions = DefaultMaxUDPSessions
	}
	if t.counts == nil {
		t.counts = new(Counts)
	}
	if t.log == nil {
		t.log = slog.Default()
	}
	t.udpConn, _ = u.Conn.(*net.UDPConn)
	u.table.Store(t)
	defer u.table.Store(nil)

	stop := context.AfterFunc(ctx, func() {
		// Unblocks ReadFrom; Serve does not own Conn, so it does not close it.
		_ = u.Conn.SetReadDeadline(time.Unix(1, 0))
	})
	err := t.readClients()
	if errors.Is(err, errReadingStopped) {
		err = nil
		ended := make(chan struct{})
		go func() { t.wg.Wait(); close(ended) }()
		select {
		case <-ended: // every session expired or answered
		case <-ctx.Done():
		}
	}
	stop()
	cancel()
	t.closeAll()
	return err
}

// udpTable is the state of one Serve call.
type udpTable struct {
	u           *UDP
	ctx         context.Context // cancelled when Serve returns
	start       time.Time       // origin of the monotonic clock below
	ttl         time.Duration
	maxSessions int
	counts      *Counts
	log         *slog.Logger
	udpConn     *net.UDPConn // Conn as *net.UDPConn, for allocation-free reads and writes; may be nil

	mu       sync.Mutex
	sessions map[netip.AddrPort]*udpSession
	wg       sync.WaitGroup
}

// udpSession is one client's flow.
type udpSession struct {
	key     netip.AddrPort
	addr    net.Addr // the client as Conn reported it
	started time.Time
	release func() // Admit's, called once when the session leaves the table

	// lastActive is when a datagram last moved either way, in nanoseconds
	// since the table started.
	lastActive atomic.Int64
	// counts are the session's payload bytes, crediting the table's (the
	// service's) as Total; datagrams* count the datagrams that carried them.
	counts                     Counts
	datagramsUp, datagramsDown atomic.Uint64

	mu      sync.Mutex // guards the fields below; held while writing upstream
	up      net.Conn   // nil while the upstream socket is being opened
	node    string     // Dial's name for up's node
	backlog [][]byte   // datagrams received while up is nil
	closed  bool       // no more datagrams are accepted
	failed  bool       // closed because the upstream could not be opened
}

func (t *udpTable) now() int64 { return int64(time.Since(t.start)) }

func (t *udpTable) readClients() error {
	buf := make([]byte, maxDatagram)
	for {
		n, key, addr, err := t.readFrom(buf)
		if err != nil {
			if t.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			if t.u.readingStopped.Load() {
				return errReadingStopped
			}
			return fmt.Errorf("udp relay: read from %s: %w", t.u.Conn.LocalAddr(), err)
		}
		if !key.IsValid() {
			t.u.dropped.Add(1)
			continue
		}
		if t.u.ReadSize > 0 {
			n = min(n, t.u.ReadSize)
		}
		t.deliver(key, addr, buf[:n])
	}
}

func (t *udpTable) readFrom(buf []byte) (int, netip.AddrPort, net.Addr, error) {
	if t.udpConn != nil {
		n, key, err := t.udpConn.ReadFromUDPAddrPort(buf)
		return n, key, nil, err
	}
	n, addr, err := t.u.Conn.ReadFrom(buf)
	if err != nil {
		return 0, netip.AddrPort{}, nil, err
	}
	if ua, ok := addr.(*net.UDPAddr); ok {
		return n, ua.AddrPort(), addr, nil
	}
	key, perr := netip.ParseAddrPort(addr.String())
	if perr != nil {
		return n, netip.AddrPort{}, addr, nil
	}
	return n, key, addr, nil
}

func (t *udpTable) writeTo(p []byte, s *udpSession) (int, error) {
	if t.udpConn != nil && s.addr == nil {
		return t.udpConn.WriteToUDPAddrPort(p, s.key)
	}
	return t.u.Conn.WriteTo(p, s.addr)
}

// deliver hands one client datagram to its session, opening one if needed.
func (t *udpTable) deliver(key netip.AddrPort, addr net.Addr, p []byte) {
	// A session may expire between lookup and send; the second attempt then
	// opens a fresh one.
	for range 2 {
		s := t.session(key, addr)
		if s == nil {
			t.u.dropped.Add(1)
			return
		}
		if s.send(t, p) {
			return
		}
	}
	t.u.dropped.Add(1)
}

// session returns key's live session, opening one, or nil when at
// MaxSessions or when Admit refuses a new one.
func (t *udpTable) session(key netip.AddrPort, addr net.Addr) *udpSession {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s, ok := t.sessions[key]; ok {
		return s
	}
	if len(t.sessions) >= t.maxSessions {
		return nil
	}
	var release func()
	if t.u.Admit != nil {
		var ok bool
		if release, ok = t.u.Admit(key); !ok {
			return nil
		}
	}
	s := &udpSession{key: key, addr: addr, started: time.Now(), release: release}
	s.counts.Total = t.counts
	s.lastActive.Store(t.now())
	t.sessions[key] = s
	if t.u.OnSession != nil {
		t.u.OnSession(true)
	}
	t.wg.Add(1)
	go t.run(s)
	return s
}

// send forwards p upstream, or queues it while the upstream is opening. It
// returns false if the session has closed.
func (s *udpSession) send(t *udpTable, p []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failed {
		// Dropped rather than retried: a datagram must not trigger a
		// second dial right after one failed for it.
		t.u.dropped.Add(1)
		return true
	}
	if s.closed {
		return false
	}
	s.lastActive.Store(t.now())
	if s.up == nil {
		if len(s.backlog) >= maxBacklog {
			t.u.dropped.Add(1)
			return true
		}
		s.backlog = append(s.backlog, append([]byte(nil), p...))
		return true
	}
	t.writeUp(s, p)
	return true
}

// writeUp writes one datagram upstream; s.mu must be held.
func (t *udpTable) writeUp(s *udpSession, p []byte) {
	n, err := s.up.Write(p)
	if err != nil {
		t.report(fmt.Errorf("udp relay: client %s: write upstream: %w", s.key, err))
		return
	}
	s.counts.up().Add(uint64(n))
	s.datagramsUp.Add(1)
}

// report passes a per-session failure to OnError. It logs only at debug
// level: these failures can come once per datagram, so rate-limited logging
// and metrics belong to the OnError owner.
func (t *udpTable) report(err error) {
	t.log.Debug("udp relay", "err", err)
	if t.u.OnError != nil {
		t.u.OnError(err)
	}
}

// run owns one session: it opens the upstream socket, flushes the backlog,
// then relays replies until the session expires or is closed.
func (t *udpTable) run(s *udpSession) {
	defer t.wg.Done()
	defer t.remove(s)

	clientAddr := s.addr
	if clientAddr == nil {
		clientAddr = net.UDPAddrFromAddrPort(s.key)
	}
	dialCtx, cancel := context.WithTimeout(t.ctx, udpDialTimeout)
	up, node, err := t.u.Dial(dialCtx, clientAddr)
	cancel()

	s.mu.Lock()
	if err != nil || s.closed {
		s.closed = true
		s.failed = err != nil
		t.remove(s)
		t.u.dropped.Add(uint64(len(s.backlog)))
		s.backlog = nil
		s.mu.Unlock()
		if err != nil {
			t.report(fmt.Errorf("udp relay: client %s: open upstream: %w", s.key, err))
		} else {
			_ = up.Close() // Serve shut down while dialing
		}
		return
	}
	s.up, s.node = up, node
	for _, p := range s.backlog {
		t.writeUp(s, p)
	}
	s.backlog = nil
	s.mu.Unlock()
	defer up.Close()

	t.log.Debug("udp session opened", "client", s.key, "upstream", up.RemoteAddr())
	t.relayReplies(s, up)
}

// relayReplies copies upstream datagrams to the client until the session has
// been idle for TTL or up is closed.
func (t *udpTable) relayReplies(s *udpSession, up net.Conn) {
	var raw syscall.RawConn
	if sc, ok := up.(syscall.Conn); ok {
		raw, _ = sc.SyscallConn()
	}
	var ownBuf []byte // used only when up is not a kernel socket
	for {
		deadline := t.start.Add(time.Duration(s.lastActive.Load()) + t.ttl)
		if err := up.SetReadDeadline(deadline); err != nil {
			t.report(fmt.Errorf("udp relay: client %s: arm session deadline: %w", s.key, err))
			return
		}
		var (
			buf *[]byte
			n   int
			err error
		)
		if raw != nil {
			buf, n, err = readPooled(raw)
		} else {
			if ownBuf == nil {
				ownBuf = make([]byte, maxDatagram)
			}
			n, err = up.Read(ownBuf)
		}
		switch {
		case err == nil:
			s.lastActive.Store(t.now())
			p := ownBuf
			if buf != nil {
				p = *buf
			}
			_, werr := t.writeTo(p[:n], s)
			if buf != nil {
				replyBuffers.Put(buf)
			}
			switch {
			case werr == nil:
				s.counts.down().Add(uint64(n))
				s.datagramsDown.Add(1)
			case errors.Is(werr, net.ErrClosed):
				return // the listening socket is gone: Serve is ending
			default:
				t.report(fmt.Errorf("udp relay: client %s: write reply: %w", s.key, werr))
			}
			if t.u.OneReply {
				s.end(t)
				t.log.Debug("udp session answered", "client", s.key)
				return
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			if s.expire(t) {
				t.log.Debug("udp session expired", "client", s.key)
				return
			}
		case errors.Is(err, syscall.ECONNREFUSED):
			// ICMP port unreachable from the upstream: the socket stays
			// usable, the next datagram may find the port open.
			t.report(fmt.Errorf("udp relay: client %s: upstream %s: %w", s.key, up.RemoteAddr(), err))
		case errors.Is(err, net.ErrClosed):
			return
		default:
			t.report(fmt.Errorf("udp relay: client %s: read upstream: %w", s.key, err))
			return
		}
	}
}

// readPooled waits for one datagram on raw and reads it into a pooled
// buffer, which the caller returns to replyBuffers.
func readPooled(raw syscall.RawConn) (*[]byte, int, error) {
	var (
		buf     *[]byte
		n       int
		readErr error
	)
	err := raw.Read(func(fd uintptr) bool {
		b := replyBuffers.Get().(*[]byte)
		n, readErr = unix.Read(int(fd), *b)
		if readErr == unix.EAGAIN {
			replyBuffers.Put(b)
			return false // not readable yet: wait in the poller
		}
		if readErr != nil {
			replyBuffers.Put(b)
			return true
		}
		buf = b
		return true
	})
	if err != nil {
		return nil, 0, err
	}
	if readErr != nil {
		return nil, 0, os.NewSyscallError("read", readErr)
	}
	return buf, n, nil
}

// expire closes s if it has been idle for TTL and reports whether it did. It
// takes s.mu so a datagram being sent concurrently either keeps the session
// alive or finds it closed, and removes s from the table before releasing
// the lock so that datagram's retry opens a fresh session.
func (s *udpSession) expire(t *udpTable) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t.now()-s.lastActive.Load() < int64(t.ttl) {
		return false
	}
	s.closed = true
	t.remove(s)
	return true
}

// end closes s now and takes it out of the table, so the client's next
// datagram opens a fresh session.
func (s *udpSession) end(t *udpTable) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	t.remove(s)
}

// remove takes s out of the table and reports the closed session, once: it
// is a no-op when s is no longer the table's entry for its client. Lock
// order is s.mu before t.mu.
func (t *udpTable) remove(s *udpSession) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.sessions[s.key] != s {
		return
	}
	delete(t.sessions, s.key)
	if s.release != nil {
		s.release()
	}
	if t.u.OnSession != nil {
		t.u.OnSession(false)
	}
}

// closeAll ends every session and waits for their goroutines. t.ctx must
// already be cancelled so sessions still dialing give up.
func (t *udpTable) closeAll() {
	t.mu.Lock()
	open := make([]*udpSession, 0, len(t.sessions))
	for _, s := range t.sessions {
		open = append(open, s)
	}
	t.mu.Unlock()
	for _, s := range open {
		s.mu.Lock()
		s.closed = true
		up := s.up
		s.mu.Unlock()
		if up != nil {
			_ = up.Close() // wakes relayReplies
		}
	}
	t.wg.Wait()
}
