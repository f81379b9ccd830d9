package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
	"github.com/ebpfwd/ebpfwd/userspace/chain"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
	"github.com/ebpfwd/ebpfwd/userspace/httpproxy"
	"github.com/ebpfwd/ebpfwd/userspace/proxyproto"
)

// service is one configured service at run time.
type service struct {
	d        *Daemon
	index    int
	cfg      *config.Service
	log      *slog.Logger
	listenNS netns.NS
	outNS    netns.NS
	chain    *chain.Chain               // nil: nodes are dialed directly
	nodes    *selector.Selector[string] // forward targets (addr); nil for http
	plan     Plan
	errs     *Errors
	proxy    *httpproxy.Server // handler http only
	// limit is the service's share of the fd budget: the streams or
	// sessions it may hold at once. A reload's new form takes its previous
	// form's, so both forms' connections count against one share.
	limit *datapath.Limit
	// limits are the service's GOST limiters (climiter, rlimiter,
	// limiter), enforced on every connection userspace serves.
	limits *limits

	att     datapath.Attachment
	splicer datapath.Splicer // att's way of moving streams
	ln      listener

	// conns is the context of the service's connections: cancelled when
	// a drain runs out of time.
	conns       context.Context
	cancelConns context.CancelFunc
	mu          sync.Mutex
	draining    bool           // no new connection is taken
	wg          sync.WaitGroup // in-flight connections (and the UDP loop)

	stopHealth context.CancelFunc // stops syncNodeHealth; nil when not running
	healthDone chan struct{}
}

func newService(d *Daemon, cfg *config.Config, i int, sc *config.Service, chains map[string]*chain.Chain) (*service, error) {
	field := fmt.Sprintf("services[%d]", i)
	s := &service{
		d:     d,
		index: i,
		cfg:   sc,
		log:   d.log.With("service", sc.Name),
		errs:  &Errors{},
		limit: d.pool.NewLimit(demandOf(&service{cfg: sc}).cost),
	}
	s.limits = newLimits(sc.Limits, s.errs, s.log)
	s.listenNS, s.outNS = sc.NetNS, sc.NetNSOut
	var errs []error
	var err error
	if sc.Handler.Chain != "" {
		if s.chain = chains[sc.Handler.Chain]; s.chain == nil {
			// config validates chain names, so the chain failed to build
			// and reported why; this names the service it leaves unusable.
			errs = append(errs, located(cfg, sc.Pos, field+".handler.chain",
				fmt.Errorf("chain %q could not be built", sc.Handler.Chain)))
			return nil, errors.Join(errs...)
		}
	}
	if sc.Forwarder != nil && sc.Handler.Type != "http" {
		var nodes []*selector.Node[string]
		for _, n := range sc.Forwarder.Nodes {
			nodes = append(nodes, &selector.Node[string]{Name: n.Name, Value: n.Addr})
		}
		s.nodes = selector.New(selectorOptions(sc.Forwarder.Selector), nodes...)
	}
	if s.plan, err = d.datapaths.Plan(s.spec(), datapath.Kind(sc.Datapath)); err != nil {
		errs = append(errs, located(cfg, sc.Pos, field+".metadata.datapath", err))
	}
	if sc.Handler.Type == "http" {
		s.proxy = s.newProxy()
	}
	s.declareDials()
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	s.log = s.log.With("datapath", s.plan.Datapath)
	return s, nil
}

func (s *service) spec() datapath.Service {
	svc := datapath.Service{
		Name:        s.cfg.Name,
		Network:     s.cfg.Listener.Type,
		Addr:        s.cfg.Addr,
		Listen:      s.cfg.Listen,
		ListenNS:    s.listenNS,
		OutNS:       s.outNS,
		Chained:     s.chain != nil,
		Proxy:       s.cfg.Handler.Type == "http",
		IdleTimeout: s.cfg.IdleTimeout,
		PacketTTL:   s.cfg.Listener.TTL,
		Limit:       s.limit,
		Limiters:    s.cfg.Limits.Names(),

		PacketKeepAlive:   s.cfg.Listener.KeepAlive,
		PacketReadSize:    s.cfg.Listener.ReadBufferSize,
		AcceptProxyHeader: s.cfg.ProxyProtocol > 0,
		SendProxyHeader:   s.cfg.Handler.ProxyProtocol,
	}
	if s.limits.admission != nil {
		svc.Admit = func(client netip.Addr) (func(), bool) { return s.limits.admit(client, "udp session") }
	}
	if s.cfg.Forwarder != nil && !svc.Proxy {
		svc.Strategy = s.cfg.Forwarder.Selector.Strategy
		if s.nodes != nil {
			svc.MaxFails = s.nodes.MaxFails()
		}
		for _, n := range s.cfg.Forwarder.Nodes {
			svc.Nodes = append(svc.Nodes, datapath.Node{Name: n.Name, Addr: n.Addr, IP: n.IP})
		}
	}
	return svc
}

// start sets up the datapath and opens the listening socket.
func (s *service) start(ctx context.Context) error {
	if err := s.setup(ctx); err != nil {
		return err
	}
	return s.listen(ctx)
}

// setup sets up the service's datapath (and the node health feeding a
// datapath that picks nodes itself), without a listener: a reload hands a
// changed service the listener of its previous form.
func (s *service) setup(ctx context.Context) error {
	s.conns, s.cancelConns = context.WithCancel(s.d.conns)
	configured := s.cfg.Datapath != "" && datapath.Kind(s.cfg.Datapath) != datapath.Auto
	att, plan, err := s.d.datapaths.Setup(ctx, s.plan, configured, s.spec(), s.log)
	if err != nil {
		return fmt.Errorf("service %s: %w", s.cfg.Name, err)
	}
	if plan != s.plan {
		s.plan = plan
		s.log = s.log.With("datapath", plan.Datapath)
	}
	s.att = att
	splicer, ok := att.(datapath.Splicer)
	if !ok && s.cfg.Listener.Type == "tcp" {
		att.Close()
		return fmt.Errorf("service %s: datapath %s cannot carry TCP streams", s.cfg.Name, s.plan.Datapath)
	}
	if _, ok := att.(datapath.PacketForwarder); !ok && s.cfg.Listener.Type == "udp" {
		att.Close()
		return fmt.Errorf("service %s: datapath %s cannot forward UDP", s.cfg.Name, s.plan.Datapath)
	}
	s.splicer = splicer
	if hs, ok := att.(datapath.NodeHealthSetter); ok && datapath.PicksNodes(att) && s.nodes != nil {
		hctx, stop := context.WithCancel(context.WithoutCancel(ctx))
		s.stopHealth, s.healthDone = stop, make(chan struct{})
		go func() {
			defer close(s.healthDone)
			// The kernel picks the nodes, so no dial of the daemon's
			// marks them: the datapath's verdicts on their flows do
			// (passive), and probes too when the service asks.
			var probes sync.WaitGroup
			if network := s.cfg.Listener.Type; s.cfg.HealthCheck == config.HealthProbe && (network == "tcp" || network == "udp") {
				probes.Go(func() { s.probeNodes(hctx, network) })
			}
			s.syncNodeHealth(hctx, hs, datapath.NodeJudge(att))
			probes.Wait()
		}()
	}
	return nil
}

// listen opens the service's listening socket.
func (s *service) listen(ctx context.Context) error {
	if f := s.inherited(); f != nil {
		return s.fromInherited(f)
	}
	switch s.cfg.Listener.Type {
	case "udp":
		pc, err := s.listenNS.ListenPacket(ctx, "udp", s.cfg.Addr)
		if err != nil {
			return fmt.Errorf("service %s: listen udp %s in netns %s: %w", s.cfg.Name, s.cfg.Addr, s.listenNS, err)
		}
		s.ln = listener{pc: pc}
	default:
		l, err := s.listenNS.Listen(ctx, "tcp", s.cfg.Addr)
		if err != nil {
			return fmt.Errorf("service %s: listen tcp %s in netns %s: %w", s.cfg.Name, s.cfg.Addr, s.listenNS, err)
		}
		s.ln = listener{acc: newAcceptor(l, s)}
	}
	return nil
}

// serve starts taking traffic: the accept loop, or the UDP loop.
func (s *service) serve() {
	if s.ln.acc != nil {
		s.ln.acc.start()
		return
	}
	if s.ln.pc == nil || !s.begin() {
		return
	}
	go func() {
		defer s.wg.Done()
		pf := s.att.(datapath.PacketForwarder)
		if err := pf.ServePackets(s.conns, s.ln.pc, s.dialPacket); err != nil && !errors.Is(err, net.ErrClosed) {
			s.log.Error("udp service stopped", "err", err)
		}
	}()
}

// begin counts a new connection in, unless the service drains.
func (s *service) begin() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return false
	}
	s.wg.Add(1)
	return true
}

// admit takes a slot of the service's fd budget share for an accepted
// connection. Without one the connection is reset at once, from the
// accept loop, without blocking it: a storm on one service must not hold
// descriptors, or the loop, that others need.
//
// Then the service's climiter and rlimiter decide, by the client's
// address; a connection they refuse is reset the same way. The release
// returned with true ends the connection's hold on both.
func (s *service) admit(conn net.Conn) (release func(), ok bool) {
	if !s.limit.Acquire() {
		resetClose(conn)
		s.limit.LogRefusal(s.log, "connection")
		return nil, false
	}
	if s.limits.admission == nil || s.cfg.ProxyProtocol > 0 {
		// A PROXY header names the real client: such a service asks its
		// limiters once handle has read it.
		return s.limit.Release, true
	}
	admitted, ok := s.limits.admit(peerOf(conn).Addr(), "connection")
	if !ok {
		s.limit.Release()
		resetClose(conn)
		return nil, false
	}
	return func() { admitted(); s.limit.Release() }, true
}

// resetClose closes a refused connection with a reset: it tells the client
// at once that it was refused, not served an empty stream, and leaves no
// TIME_WAIT behind.
func resetClose(conn net.Conn) {
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	conn.Close()
}

// proxyHeaderTimeout bounds the wait for a PROXY protocol header, as GOST's
// listener does.
const proxyHeaderTimeout = 10 * time.Second

// handle serves one accepted connection; begin counted it in and admit
// gave it a slot, which release gives back.
//
// A forwarded stream is relayed on a goroutine started once the upstream
// is dialed, and this one ends: its stack grew deep while it dialed (the
// net package's dialer, a chain's handshakes), and Go shrinks a stack only
// once less than a quarter of it is in use, so relaying here would keep
// 8 KiB per connection for as long as the stream lives.
func (s *service) handle(conn net.Conn, release func()) {
	relay := s.prepare(conn)
	if relay == nil {
		release()
		s.wg.Done()
		return
	}
	go func() {
		defer s.wg.Done()
		defer release()
		relay()
	}()
}

// prepare does what comes before a stream is relayed: a service with
// proxyProtocol reads the client's PROXY header first (from then on the
// connection's addresses are the header's), and a tcp handler dials. It
// returns the relay still to run, or nil when the connection is done.
func (s *service) prepare(conn net.Conn) (relay func()) {
	admitted := func() {}
	if s.cfg.ProxyProtocol > 0 {
		pc, err := proxyproto.Read(conn, proxyHeaderTimeout)
		if err != nil {
			conn.Close()
			reason := reasonOf(err)
			s.errs.Add(reason)
			s.log.Warn("connection closed: no valid PROXY protocol header", "client", peerOf(conn), "reason", reason, "err", err)
			return nil
		}
		conn = pc
		if s.limits.admission != nil {
			var ok bool
			if admitted, ok = s.limits.admit(peerOf(conn).Addr(), "connection"); !ok {
				resetClose(conn)
				return nil
			}
		}
	}
	ctx := withClient(s.conns, conn)
	if s.proxy != nil {
		s.proxy.ServeConn(ctx, conn)
		admitted()
		return nil
	}
	forward := s.forward(ctx, conn)
	if forward == nil {
		admitted()
		return nil
	}
	return func() {
		defer admitted()
		forward()
	}
}

// clientKey carries a connection's client and the address it reached
// (the PROXY header's when one was read) to the dials made for it, for the
// PROXY headers they send.
type clientKey struct{}

type clientAddrs struct{ src, dst netip.AddrPort }

func withClient(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, clientKey{}, clientAddrs{src: peerOf(c), dst: addrPortOf(c.LocalAddr())})
}

func clientOf(ctx context.Context) clientAddrs {
	a, _ := ctx.Value(clientKey{}).(clientAddrs)
	return a
}

// drain takes no new connection and waits up to timeout (or until hurry is
// closed) for those in flight, then ends the rest and waits for them. It
// reports how many it had to end.
func (s *service) drain(timeout time.Duration, hurry <-chan struct{}) int64 {
	s.mu.Lock()
	s.draining = true
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-done:
		return 0
	case <-timer.C:
	case <-hurry:
	}
	var left int64
	if s.att != nil {
		left = s.att.Counters().Active
	}
	if s.cancelConns != nil {
		s.cancelConns()
	}
	<-done
	return left
}

func peerOf(c net.Conn) netip.AddrPort { return addrPortOf(c.RemoteAddr()) }

func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// forward dials for one accepted TCP connection of a tcp handler and
// returns the relay of the stream, or nil when no node answered.
func (s *service) forward(ctx context.Context, client net.Conn) (relay func()) {
	peer := peerOf(client)
	upstream, node, err := s.dialNode(ctx, peer.Addr().String())
	if err != nil {
		client.Close()
		s.log.Warn("connection dropped: no node reachable", "client", peer, "err", err)
		return nil
	}
	return func() {
		// The datapath logs how the stream ended; the daemon counts why.
		up, down, released := s.limits.traffic.Stream(peer.Addr())
		defer released()
		err := s.splicer.Splice(ctx, datapath.Stream{Client: client, Upstream: upstream, Peer: peer, Node: node, Up: up, Down: down})
		if err != nil && !errors.Is(err, context.Canceled) {
			s.errs.Add(reasonOf(err))
		}
	}
}

// dialNode tries the forward nodes in the selector's order until one
// answers, marking the ones that do not.
func (s *service) dialNode(ctx context.Context, key string) (net.Conn, string, error) {
	var errs []error
	for _, n := range s.nodes.Order(key) {
		if ctx.Err() != nil {
			break
		}
		start := time.Now()
		conn, err := s.dial(ctx, "tcp", n.Value, key)
		s.d.opts.Metrics.ObserveDial(s.cfg.Name, "node", n.Name, time.Since(start), err)
		if err == nil {
			s.nodes.MarkOK(n)
			s.log.Debug("dialed node", "node", n.Name, "addr", n.Value, "took", time.Since(start))
			return conn, n.Name, nil
		}
		reason := reasonOf(err)
		s.errs.Add(reason)
		// A broken chain is not the node's fault: marking every node dead
		// would only hide which hop is failing.
		if (s.chain == nil || chain.TargetUnreachable(err)) && nodesFault(err) {
			s.nodes.MarkFailed(n)
		}
		s.log.Warn("dial failed", "node", n.Name, "addr", n.Value, "reason", reason, "err", err)
		errs = append(errs, fmt.Errorf("node %s (%s): %w", n.Name, n.Value, err))
	}
	if len(errs) == 0 {
		return nil, "", fmt.Errorf("no node tried: %w", context.Cause(ctx))
	}
	return nil, "", errors.Join(errs...)
}

// dial reaches addr from the service's outbound namespace, through its
// chain when it has one. One attempt is bounded by dialTimeout.
func (s *service) dial(ctx context.Context, network, addr, key string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, dialTimeout)
	defer cancel()
	client := clientOf(ctx)
	var conn net.Conn
	var err error
	if s.chain != nil {
		conn, err = s.chain.Dial(ctx, chain.Request{Target: addr, Key: key, DefaultNS: s.outNS, Observe: s.observeHop,
			Source: client.src, Destination: client.dst})
	} else {
		conn, err = s.outNS.Dial(ctx, network, addr)
	}
	if err != nil || network != "tcp" || s.proxy != nil || s.cfg.Handler.ProxyProtocol == 0 {
		return conn, err
	}
	// GOST's forward handler: the node hears of the client first.
	if err := proxyproto.Write(conn, s.cfg.Handler.ProxyProtocol, client.src, client.dst); err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

// dialPacket opens the upstream socket of a new UDP session.
func (s *service) dialPacket(ctx context.Context, client net.Addr) (net.Conn, string, error) {
	key := client.String()
	if ua, ok := client.(*net.UDPAddr); ok {
		key = ua.IP.String()
	}
	var errs []error
	for _, n := range s.nodes.Order(key) {
		conn, err := s.dial(ctx, "udp", n.Value, key)
		if err == nil {
			s.nodes.MarkOK(n)
			return conn, n.Name, nil
		}
		if nodesFault(err) {
			s.nodes.MarkFailed(n)
		}
		s.errs.Add(reasonOf(err))
		errs = append(errs, fmt.Errorf("node %s (%s): %w", n.Name, n.Value, err))
	}
	return nil, "", errors.Join(errs...)
}

// declareDials creates the service's dial latency series up front.
func (s *service) declareDials() {
	rec := s.d.opts.Metrics
	if s.proxy != nil {
		rec.DeclareDial(s.cfg.Name, "target", "*")
	}
	if s.nodes != nil {
		for _, n := range s.nodes.Nodes() {
			rec.DeclareDial(s.cfg.Name, "node", n.Name)
		}
	}
	if s.chain != nil {
		for _, h := range s.chain.Hops {
			for _, n := range h.Selector.Nodes() {
				rec.DeclareDial(s.cfg.Name, "hop", s.chain.Name+"/"+h.Name+"/"+n.Name)
			}
		}
	}
}

func (s *service) observeHop(hop, node string, took time.Duration, err error) {
	s.d.opts.Metrics.ObserveDial(s.cfg.Name, "hop", s.chain.Name+"/"+hop+"/"+node, took, err)
}

func (s *service) newProxy() *httpproxy.Server {
	srv := &httpproxy.Server{
		Logger: s.log,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			// GOST's hash strategy keys proxy traffic by destination.
			start := time.Now()
			conn, err := s.dial(ctx, network, addr, addr)
			// Proxy targets are whatever clients ask for: never a label.
			s.d.opts.Metrics.ObserveDial(s.cfg.Name, "target", "*", time.Since(start), err)
			return conn, err
		},
		Relay: func(ctx context.Context, client, upstream net.Conn) error {
			peer := peerOf(client)
			up, down, released := s.limits.traffic.Stream(peer.Addr())
			defer released()
			return s.splicer.Splice(ctx, datapath.Stream{Client: client, Upstream: upstream, Peer: peer, Up: up, Down: down})
		},
		OnResult: func(r httpproxy.Result) {
			switch {
			case r.Refused != "":
				s.errs.Add(Reason(r.Refused))
			case r.Err != nil && !errors.Is(r.Err, context.Canceled):
				s.errs.Add(reasonOf(r.Err))
			}
		},
		HandshakeTimeout: s.cfg.Handler.HTTP.HeaderTimeout,
		MaxClients:       s.cfg.Handler.HTTP.MaxClients,
	}
	if s.chain == nil {
		// A chained dial reaches the first hop, not the target: only a
		// direct one can loop into this daemon.
		srv.Self = func(ap netip.AddrPort) bool { return s.d.isOwnListener(s.outNS, ap) }
	}
	if a := s.cfg.Handler.Auth; a != nil {
		srv.Auth = &httpconnect.Auth{Username: a.Username, Password: a.Password}
	}
	return srv
}

func (s *service) stopAccepting() { s.ln.close() }

// logStarted logs what the service is and why it runs where it runs.
func (s *service) logStarted(msg string) {
	s.d.log.Info(msg, "service", s.cfg.Name, "addr", s.ln.addr(),
		"handler", s.cfg.Handler.Type, "netns", s.listenNS.String(), "netns.out", s.outNS.String(),
		"datapath", s.plan.Datapath, "reason", s.plan.Reason)
}

func (s *service) close() {
	s.ln.close()
	if s.cancelConns != nil {
		s.cancelConns()
	}
	s.stopProbing()
	if s.att != nil {
		if err := s.att.Close(); err != nil {
			s.log.Error("detach datapath", "err", err)
		}
	}
}

// listener is a service's listening socket: a stream listener with its
// accept loop, or a packet socket.
type listener struct {
	acc *acceptor
	pc  net.PacketConn
}

func (l listener) addr() string {
	switch {
	case l.acc != nil:
		return l.acc.l.Addr().String()
	case l.pc != nil:
		return l.pc.LocalAddr().String()
	}
	return ""
}

func (l listener) close() {
	if l.acc != nil {
		l.acc.close()
	}
	if l.pc != nil {
		l.pc.Close()
	}
}
