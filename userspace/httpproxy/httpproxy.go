// Package httpproxy is ebpfwd's built-in HTTP proxy service (GOST's
// `handler: http`). It serves CONNECT tunnels and plain absolute-URI HTTP
// requests, so a chain hop can be another ebpfwd instead of a GOST binary.
//
// The server only negotiates: dialing the upstream (netns.out, chains) and
// moving the bytes (the datapath's splice) are injected by the daemon, so
// tunnels run through the same datapath as every other service.
package httpproxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"net/textproto"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

const (
	// DefaultHandshakeTimeout bounds reading the client's request, from
	// accept until its header is in.
	DefaultHandshakeTimeout = 10 * time.Second
	// DefaultDialTimeout bounds dialing the upstream. It is half the
	// handshake deadline on purpose: a client gives the whole exchange a
	// budget of about that deadline (ebpfwd's own chain client allows 10s
	// per attempt), so a proxy that dials for as long answers its 504 when
	// the client has given up, and the client then blames the proxy (a
	// timeout) instead of the target (a 504, which a chain charges to the
	// next node). Half leaves room for a slowly sent request and the reply.
	DefaultDialTimeout = 5 * time.Second
	// DefaultReplyTimeout bounds writing one reply (the 200, 100 Continue
	// or an error status), counted from when it is ready: a reply after a
	// slow dial must not find the handshake deadline already spent, and a
	// client that does not read its reply costs at most this long.
	DefaultReplyTimeout = 2 * time.Second
	// maxRequestHeaderBytes bounds a request header; net/http uses 1 MiB for
	// servers, a proxy handshake needs far less.
	maxRequestHeaderBytes = 64 << 10
	// maxRequestLineBytes bounds the request line (answered 414 beyond):
	// RFC 9112 3 recommends supporting at least 8000 octets.
	maxRequestLineBytes = 8 << 10
	// lingerTimeout and lingerBytes bound the wait for a client to stop
	// sending after an error reply (see lingerClose), as net/http's
	// server does after a bad request.
	lingerTimeout = 500 * time.Millisecond
	lingerBytes   = 256 << 10
	// busyReplyTimeout bounds writing the 503 to a client over MaxClients:
	// a refusal must cost less than a served client.
	busyReplyTimeout = 100 * time.Millisecond
	// readBufferSize is the bufio size for reading requests. Bytes a client
	// pipelines after its CONNECT beyond this stay in the socket and reach
	// the upstream through Relay.
	readBufferSize = 4 << 10
	// realm is announced in Proxy-Authenticate.
	realm = "ebpfwd"
)

// Refusal says why the handler itself refused a client (as opposed to a
// target that could not be reached). The values are metric labels.
type Refusal string

const (
	// RefusedMalformed: the request is not valid HTTP/1.1 or not a proxy
	// request (400), including the framing RFC 9112 forbids:
	// Content-Length with Transfer-Encoding, more than one Content-Length,
	// whitespace before a header field's colon.
	RefusedMalformed Refusal = "http_bad_request"
	// RefusedTooLarge: the request line (414) or header (431) is over its
	// limit.
	RefusedTooLarge Refusal = "http_too_large"
	// RefusedHeaderTimeout: the header was not in within HandshakeTimeout
	// (408 when the client sent part of it, a close when it sent nothing).
	RefusedHeaderTimeout Refusal = "http_header_timeout"
	// RefusedAuth: missing or wrong Proxy-Authorization (407).
	RefusedAuth Refusal = "http_auth"
	// RefusedLoop: the target is one of ebpfwd's own listeners (508).
	RefusedLoop Refusal = "http_loop"
	// RefusedBusy: MaxClients clients were already being served (503).
	RefusedBusy Refusal = "http_busy"
)

// Refusals lists every Refusal, for metrics that show each at zero.
var Refusals = []Refusal{RefusedMalformed, RefusedTooLarge, RefusedHeaderTimeout, RefusedAuth, RefusedLoop, RefusedBusy}

// ErrLoop is wrapped by the error of a request whose target is one of
// ebpfwd's own listeners.
var ErrLoop = errors.New("target is one of ebpfwd's own listeners")

// Result describes how one client connection ended.
type Result struct {
	Method string // request method; "" if no request was read
	Target string // host:port asked for
	Status int    // status answered to the client; 0 if none was
	// Refused is set when the handler refused the client itself; a failed
	// dial leaves it empty (Err says why).
	Refused Refusal
	// Sent reports whether the reply carrying Status was written in full
	// to the client's socket. False with a Status means the client got no
	// reply or a cut one: it was gone, or did not read within the reply
	// timeout.
	Sent bool
	// ReplyErr is why the reply was not sent; nil when it was or when
	// there was none.
	ReplyErr error
	Err      error         // nil when the exchange ended cleanly
	Dial     time.Duration // time spent dialing the upstream
}

// Server is the HTTP proxy handler. The zero value serves without auth,
// dials directly and relays with io.Copy; the daemon sets Dial and Relay.
// A Server must not be modified while it serves.
type Server struct {
	// Auth, when set, is required from every client as Basic
	// Proxy-Authorization.
	Auth *httpconnect.Auth
	// Dial opens the upstream connection to host:port (the daemon passes a
	// dialer that honours netns.out and chains). Nil dials directly.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Relay moves bytes both ways between client and upstream until both
	// are done, closing both (the daemon passes the datapath's splice).
	// Nil uses io.Copy in both directions with half-close.
	Relay func(ctx context.Context, client, upstream net.Conn) error
	// Logger receives one line per failed connection. Nil uses slog.Default.
	Logger *slog.Logger
	// HandshakeTimeout bounds reading the request. Zero means
	// DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// DialTimeout bounds dialing the upstream; a dial that runs out is
	// answered 504. Zero means DefaultDialTimeout. Keep it below
	// HandshakeTimeout, for the reason given at DefaultDialTimeout.
	DialTimeout time.Duration
	// ReplyTimeout bounds writing each reply to the client, from when it
	// is ready. Zero means DefaultReplyTimeout.
	ReplyTimeout time.Duration
	// OnResult, when set, is called once per connection with its outcome
	// (for metrics). It must not block.
	OnResult func(r Result)
	// MaxClients caps the connections served at once, tunnels included;
	// a client over it is answered 503 and closed. Zero means no cap.
	MaxClients int
	// Self reports whether addr is one of ebpfwd's own listeners as seen
	// from where Dial dials. A target that is one is answered 508 Loop
	// Detected: an IP-literal target before it is dialed, any target once
	// the connection shows the address it reached. Nil checks nothing (a
	// chained Dial, whose connection leads to the first hop).
	Self func(addr netip.AddrPort) bool

	active atomic.Int64 // connections being served, for MaxClients
}

// requestError is a client error answered with a status before closing.
// err, when set, is the cause (a failed dial), kept for errors.Is so the
// daemon can count failures by reason.
type requestError struct {
	status int
	msg    string
	err    error
}

func (e *requestError) Error() string { return e.msg }

func (e *requestError) Unwrap() error { return e.err }

// ServeConn handles one accepted client connection and closes it when done.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) {
	var res Result
	if n := s.active.Add(1); s.MaxClients > 0 && n > int64(s.MaxClients) {
		res = s.refuseBusy(conn)
	} else {
		res = s.serve(ctx, conn)
	}
	s.active.Add(-1)
	// status_sent tells a status the client received from one it never
	// saw: the log must not claim a 504 that did not reach anyone.
	attrs := []any{"client", conn.RemoteAddr().String(),
		"method", res.Method, "target", res.Target,
		"status", res.Status, "status_sent", res.Sent}
	if res.ReplyErr != nil {
		attrs = append(attrs, "reply_error", res.ReplyErr)
	}
	if res.Err != nil {
		s.logger().Warn("http proxy request failed", append(attrs, "error", res.Err)...)
	} else {
		s.logger().Debug("http proxy request done", append(attrs, "dial", res.Dial)...)
	}
	if s.OnResult != nil {
		s.OnResult(res)
	}
	if res.Refused != RefusedBusy && lingers(res) {
		lingerClose(ctx, conn)
		conn.Close()
	}
}

// lingers reports whether serve left conn open for lingerClose: it
// answered an error.
func lingers(res Result) bool { return res.Sent && res.Status >= 400 }

// refuseBusy answers 503 to a client over MaxClients without reading its
// request, and closes it.
func (s *Server) refuseBusy(conn net.Conn) Result {
	defer conn.Close()
	res := Result{Status: http.StatusServiceUnavailable, Refused: RefusedBusy,
		Err: fmt.Errorf("%d clients already served (maxClients)", s.MaxClients)}
	if err := writeWithin(conn, []byte(statusReply(res.Status, nil)), busyReplyTimeout); err != nil {
		res.ReplyErr = fmt.Errorf("write 503 reply: %w", err)
	} else {
		res.Sent = true
	}
	return res
}

// serve runs one exchange. It owns conn: every path closes it, either
// directly or by handing it to Relay.
func (s *Server) serve(ctx context.Context, conn net.Conn) (res Result) {
	handedOff := false
	defer func() {
		// After an error reply ServeConn closes, once the result is
		// reported (see lingerClose).
		if !handedOff && !lingers(res) {
			conn.Close()
		}
	}()

	deadline := time.Now().Add(orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout))
	if err := conn.SetDeadline(deadline); err != nil {
		res.Err = fmt.Errorf("set handshake deadline: %w", err)
		return res
	}
	// Shutdown must not wait for a slow client: pulling the deadline into
	// the past unblocks the handshake's reads and writes.
	stopCancel := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stopCancel()

	// The limit keeps a client from streaming an endless header; it is
	// lifted once the header is in so request bodies are not truncated.
	limited := &io.LimitedReader{R: conn, N: maxRequestHeaderBytes}
	// rec keeps what the header's reads brought in: net/http drops the
	// framing it tolerates (a Content-Length beside Transfer-Encoding, a
	// repeated Content-Length) and the checks need the header as sent.
	rec := &recorder{r: limited}
	br := bufio.NewReaderSize(rec, readBufferSize)
	req, err := http.ReadRequest(br)
	raw := rec.stop(br.Buffered())
	if err != nil {
		if errors.Is(err, io.EOF) && len(raw) == 0 {
			// Connected and left without a byte: a health check or port
			// scan, not worth an error.
			return res
		}
		res.Err = fmt.Errorf("read request: %w", redact(err))
		switch {
		case (isTimeout(err) || rec.timedOut) && ctx.Err() == nil:
			if !isTimeout(err) {
				res.Err = fmt.Errorf("read request: header not complete at the header timeout (%w)", redact(err))
			}
			// A client that sent nothing gets nothing; one that was
			// sending a request hears it was too slow (RFC 9110 15.5.9).
			res.Refused = RefusedHeaderTimeout
			if len(raw) > 0 {
				s.answer(ctx, conn, &res, http.StatusRequestTimeout, nil)
			}
		case isTimeout(err) || len(raw) == 0:
			// Shutdown, or a read error before any byte: nothing useful
			// to answer to.
		case limited.N <= 0:
			res.Refused = RefusedTooLarge
			status := http.StatusRequestHeaderFieldsTooLarge
			if bytes.IndexByte(raw, '\n') < 0 || bytes.IndexByte(raw, '\n') > maxRequestLineBytes {
				status = http.StatusRequestURITooLong
			}
			s.answer(ctx, conn, &res, status, nil)
		default:
			res.Refused = RefusedMalformed
			s.answer(ctx, conn, &res, http.StatusBadRequest, nil)
		}
		return res
	}
	limited.N = math.MaxInt64
	res.Method = req.Method
	if status, err := checkFraming(raw); err != nil {
		res.Target = requestTarget(req)
		res.Err = err
		res.Refused = RefusedMalformed
		if status == http.StatusRequestURITooLong {
			res.Refused = RefusedTooLarge
		}
		s.answer(ctx, conn, &res, status, nil)
		return res
	}

	if err := s.authorize(req); err != nil {
		res.Target = requestTarget(req)
		res.Err = err
		res.Refused = RefusedAuth
		s.answer(ctx, conn, &res, http.StatusProxyAuthRequired,
			http.Header{"Proxy-Authenticate": {`Basic realm="` + realm + `"`}})
		return res
	}

	var upstream net.Conn
	if req.Method == http.MethodConnect {
		upstream, err = s.connect(ctx, conn, br, req, &res)
	} else {
		upstream, err = s.forward(ctx, conn, req, &res)
	}
	if err != nil {
		res.Err = err
		var re *requestError
		if errors.As(err, &re) && res.Status == 0 {
			switch {
			case errors.Is(err, ErrLoop):
				res.Refused = RefusedLoop
			case re.status == http.StatusBadRequest:
				res.Refused = RefusedMalformed
			}
			s.answer(ctx, conn, &res, re.status, nil)
		}
		return res
	}

	if !stopCancel() {
		upstream.Close()
		res.Err = fmt.Errorf("handshake: %w", ctx.Err())
		return res
	}
	// The handshake deadline must not cut the tunnel.
	_ = conn.SetDeadline(time.Time{})
	handedOff = true
	if err := s.relay()(ctx, conn, upstream); err != nil {
		res.Err = fmt.Errorf("relay %s: %w", res.Target, err)
	}
	return res
}

// connect dials a CONNECT target and answers 200. Bytes the client
// pipelined behind its request are written upstream before Relay starts, so
// none are lost and conn itself (not the bufio.Reader) can go to splice.
func (s *Server) connect(ctx context.Context, conn net.Conn, br *bufio.Reader, req *http.Request, res *Result) (net.Conn, error) {
	// For CONNECT, ReadRequest puts the authority-form target in URL.Host;
	// an origin-form target ("CONNECT /path") leaves it empty.
	target := req.URL.Host
	res.Target = target
	if host, port, err := net.SplitHostPort(target); err != nil || host == "" || port == "" {
		return nil, &requestError{status: http.StatusBadRequest, msg: fmt.Sprintf("CONNECT target %q is not host:port", redactedURI(req))}
	}

	upstream, err := s.dial(ctx, target, res)
	if err != nil {
		return nil, err
	}
	res.Status = http.StatusOK
	if err := s.writeReply(ctx, conn, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		upstream.Close()
		res.ReplyErr = fmt.Errorf("write 200 reply: %w", err)
		return nil, fmt.Errorf("reply 200 to client: %w", err)
	}
	res.Sent = true

	if n := br.Buffered(); n > 0 {
		early, _ := br.Peek(n) // cannot fail: n bytes are buffered
		if err := writeWithin(upstream, early, orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout)); err != nil {
			upstream.Close()
			return nil, fmt.Errorf("forward %d pipelined bytes to %s: %w", n, target, err)
		}
	}
	return upstream, nil
}

// forward sends one plain absolute-URI request to its origin in origin-form
// with `Connection: close`; Relay then copies the raw response back.
func (s *Server) forward(ctx context.Context, conn net.Conn, req *http.Request, res *Result) (net.Conn, error) {
	res.Target = requestTarget(req)
	if !req.URL.IsAbs() {
		return nil, &requestError{status: http.StatusBadRequest, msg: fmt.Sprintf("%s %q: a proxy request needs an absolute URI", req.Method, redactedURI(req))}
	}
	if req.URL.Scheme != "http" {
		return nil, &requestError{status: http.StatusBadRequest, msg: fmt.Sprintf("%s %q: scheme %q is not proxied, use CONNECT", req.Method, redactedURI(req), req.URL.Scheme)}
	}
	if req.URL.Host == "" {
		return nil, &requestError{status: http.StatusBadRequest, msg: fmt.Sprintf("%s %q: no host", req.Method, redactedURI(req))}
	}
	target := req.URL.Host
	if req.URL.Port() == "" {
		target = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	res.Target = target

	upgrade := isUpgrade(req.Header)
	expectContinue := strings.EqualFold(req.Header.Get("Expect"), "100-continue")
	removeHopByHop(req.Header)
	if upgrade != "" {
		// The relay is byte-transparent, so a protocol switch (WebSocket)
		// just works once the upstream agrees.
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", upgrade)
	} else {
		// One request per client connection: the upstream closing after
		// its response is what ends the relay.
		req.Close = true
	}

	upstream, err := s.dial(ctx, target, res)
	if err != nil {
		return nil, err
	}
	if expectContinue && req.ContentLength != 0 {
		// The client holds its body until it hears 100; req.Write sends
		// the body without waiting, so answer here and drop Expect.
		req.Header.Del("Expect")
		if err := s.writeReply(ctx, conn, "HTTP/1.1 100 Continue\r\n\r\n"); err != nil {
			upstream.Close()
			return nil, fmt.Errorf("reply 100 to client: %w", err)
		}
	}
	// The body streams from the client for as long as the upload takes,
	// like any tunnel, so the handshake deadline stops here. Shutdown still
	// interrupts: a cancellation hook that fires after the reset pulls the
	// deadline back; one that fired before is seen by the ctx check.
	_ = conn.SetDeadline(time.Time{})
	if err := ctx.Err(); err != nil {
		upstream.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	stopUpstream := context.AfterFunc(ctx, func() { _ = upstream.SetDeadline(time.Unix(1, 0)) })
	err = req.Write(upstream)
	if !stopUpstream() && err == nil {
		err = ctx.Err()
	}
	if err != nil {
		upstream.Close()
		return nil, &requestError{status: http.StatusBadGateway, msg: fmt.Sprintf("send %s request to %s: %v", req.Method, target, err), err: err}
	}
	// One request per connection: pipelined bytes that br already buffered
	// are dropped; later ones reach the upstream through Relay, which
	// ignores them after Connection: close.
	return upstream, nil
}

// dial opens the upstream and maps failures to 502/504.
func (s *Server) dial(ctx context.Context, target string, res *Result) (net.Conn, error) {
	dialCtx, cancel := context.WithTimeout(ctx, orDefault(s.DialTimeout, DefaultDialTimeout))
	defer cancel()
	dial := s.Dial
	if dial == nil {
		var d net.Dialer
		dial = d.DialContext
	}
	if ap, err := netip.ParseAddrPort(target); err == nil && s.isSelf(ap) {
		return nil, loopError(target, ap)
	}
	start := time.Now()
	upstream, err := dial(dialCtx, "tcp", target)
	res.Dial = time.Since(start)
	if err != nil {
		// A name that does not resolve is a 502 as soon as the resolver
		// says so; only a dial that ran out of time is a 504.
		status := http.StatusBadGateway
		if isTimeout(err) {
			status = http.StatusGatewayTimeout
		}
		return nil, &requestError{status: status, msg: fmt.Sprintf("dial %s: %v", target, err), err: err}
	}
	// A name may resolve to one of ebpfwd's own addresses: the address
	// reached tells.
	if ta, ok := upstream.RemoteAddr().(*net.TCPAddr); ok && s.isSelf(ta.AddrPort()) {
		upstream.Close()
		return nil, loopError(target, ta.AddrPort())
	}
	return upstream, nil
}

func (s *Server) isSelf(ap netip.AddrPort) bool {
	return s.Self != nil && s.Self(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
}

func loopError(target string, reached netip.AddrPort) error {
	return &requestError{status: http.StatusLoopDetected,
		msg: fmt.Sprintf("dial %s: %s is ebpfwd's own listener", target, reached), err: ErrLoop}
}

// checkFraming applies the rules of RFC 9112 that net/http's ReadRequest
// relaxes, to the header as the client sent it: a proxy forwards the
// request to a server that may frame it differently, so ambiguity is
// refused (request smuggling, RFC 9112 11.2). It returns the status to
// answer and why.
func checkFraming(raw []byte) (int, error) {
	tp := textproto.NewReader(bufio.NewReader(bytes.NewReader(raw)))
	line, err := tp.ReadLine()
	if err != nil {
		return http.StatusBadRequest, fmt.Errorf("re-read request line: %w", err)
	}
	if len(line) > maxRequestLineBytes {
		return http.StatusRequestURITooLong, fmt.Errorf("request line is %d bytes; at most %d", len(line), maxRequestLineBytes)
	}
	header, err := tp.ReadMIMEHeader()
	if err != nil {
		return http.StatusBadRequest, fmt.Errorf("re-read request header: %w", redact(err))
	}
	for name := range header {
		// RFC 9112 5.1: whitespace between a field name and its colon
		// MUST be refused with 400.
		if strings.ContainsAny(name, " \t") {
			return http.StatusBadRequest, fmt.Errorf("header field %q has whitespace before its colon", name)
		}
	}
	cl, te := header.Values("Content-Length"), header.Values("Transfer-Encoding")
	switch {
	case len(te) > 0 && strings.HasSuffix(line, " HTTP/1.0"):
		// RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
		// (net/http would ignore it and read the body some other way).
		return http.StatusBadRequest, errors.New("HTTP/1.0 request has Transfer-Encoding")
	case len(cl) > 0 && len(te) > 0:
		// RFC 9112 6.1: "ought to be handled as an error"; the
		// connection is closed after the 400, as 6.3 requires.
		return http.StatusBadRequest, errors.New("request has both Content-Length and Transfer-Encoding")
	case len(cl) > 1:
		return http.StatusBadRequest, fmt.Errorf("request has %d Content-Length fields", len(cl))
	}
	return 0, nil
}

// recorder keeps a copy of what is read through it until stop.
type recorder struct {
	r   io.Reader
	buf []byte
	off bool
	// timedOut: a read of the header ran into the handshake deadline.
	// bufio hands a partial line out before the error that ended it, so
	// net/http may report a line cut short by the deadline as malformed
	// ("missing colon"): this tells the two apart.
	timedOut bool
}

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if !r.off {
		r.buf = append(r.buf, p[:n]...)
		r.timedOut = r.timedOut || isTimeout(err)
	}
	return n, err
}

// stop ends the recording and returns what was consumed: what was read
// less the buffered bytes the reader on top has not handed out.
func (r *recorder) stop(buffered int) []byte {
	r.off = true
	raw := r.buf[:max(len(r.buf)-buffered, 0)]
	r.buf = nil
	return raw
}

// redactedErr replaces the message of an error that quotes a header line
// carrying credentials (net/textproto quotes a malformed line whole).
type redactedErr struct{ err error }

func (e redactedErr) Error() string {
	return "malformed header line carrying credentials (not logged)"
}

func (e redactedErr) Unwrap() error { return e.err }

func redact(err error) error {
	if strings.Contains(strings.ToLower(err.Error()), "authorization") {
		return redactedErr{err}
	}
	return err
}

// redactedURI is the request target for messages, without userinfo.
func redactedURI(req *http.Request) string {
	if req.URL != nil && req.URL.User != nil {
		return req.URL.Redacted()
	}
	return req.RequestURI
}

// authorize checks Basic Proxy-Authorization against s.Auth.
func (s *Server) authorize(req *http.Request) error {
	if s.Auth == nil {
		return nil
	}
	value := req.Header.Get("Proxy-Authorization")
	if value == "" {
		return errors.New("proxy authorization missing")
	}
	user, pass, ok := parseBasic(value)
	if !ok {
		return errors.New("proxy authorization is not valid Basic credentials")
	}
	// Both comparisons always run so the timing does not reveal which
	// part was wrong.
	userOK := subtle.ConstantTimeCompare([]byte(user), []byte(s.Auth.Username))
	passOK := subtle.ConstantTimeCompare([]byte(pass), []byte(s.Auth.Password))
	if userOK&passOK != 1 {
		// Neither part is logged: a password typed as the user name
		// would be.
		return errors.New("proxy authorization rejected: wrong user name or password")
	}
	return nil
}

// parseBasic decodes a `Basic base64(user:pass)` credential (RFC 7617).
func parseBasic(value string) (user, pass string, ok bool) {
	const prefix = "basic "
	if len(value) < len(prefix) || !strings.EqualFold(value[:len(prefix)], prefix) {
		return "", "", false
	}
	decoded, err := base64.StdEncoding.DecodeString(strings.TrimSpace(value[len(prefix):]))
	if err != nil {
		return "", "", false
	}
	user, pass, ok = strings.Cut(string(decoded), ":")
	if !ok {
		return "", "", false
	}
	return user, pass, true
}

// hopByHop are the headers that describe one connection, not the message
// (RFC 9110 7.6.1), plus the proxy credentials meant for this hop only.
var hopByHop = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authorization",
	"Proxy-Authenticate", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
}

// removeHopByHop deletes hop-by-hop headers, including those the
// Connection header names.
func removeHopByHop(h http.Header) {
	for _, value := range h.Values("Connection") {
		for name := range strings.SplitSeq(value, ",") {
			if name = textproto.TrimString(name); name != "" {
				h.Del(name)
			}
		}
	}
	for _, name := range hopByHop {
		h.Del(name)
	}
}

// isUpgrade returns the Upgrade header when the client asks to switch
// protocols, "" otherwise.
func isUpgrade(h http.Header) string {
	for _, value := range h.Values("Connection") {
		for token := range strings.SplitSeq(value, ",") {
			if strings.EqualFold(textproto.TrimString(token), "upgrade") {
				return h.Get("Upgrade")
			}
		}
	}
	return ""
}

// answer replies status to the client with a bodiless response and records
// in res what was answered and whether it reached the client. A failed
// write changes nothing else: the connection is closed next either way.
func (s *Server) answer(ctx context.Context, conn net.Conn, res *Result, status int, header http.Header) {
	res.Status = status
	if err := s.writeReply(ctx, conn, statusReply(status, header)); err != nil {
		res.ReplyErr = fmt.Errorf("write %d reply: %w", status, err)
		return
	}
	res.Sent = true
}

// writeReply writes one handshake reply under a write deadline of its own,
// counted from now, not from the handshake deadline: a reply that follows a
// slow dial (a 504 at the dial timeout, a 200 from a slow target) must not
// find the deadline already spent. Once ctx is done (shutdown) the deadline
// is left alone, so the cancellation hook's past deadline still holds.
// The caller closes conn or clears its deadlines next.
func (s *Server) writeReply(ctx context.Context, conn net.Conn, reply string) error {
	if ctx.Err() == nil {
		if err := conn.SetWriteDeadline(time.Now().Add(orDefault(s.ReplyTimeout, DefaultReplyTimeout))); err != nil {
			return fmt.Errorf("set reply deadline: %w", err)
		}
	}
	// The callers say which reply failed.
	_, err := io.WriteString(conn, reply)
	return err
}

// statusReply is a bodiless response with status and header.
func statusReply(status int, header http.Header) string {
	var b strings.Builder
	fmt.Fprintf(&b, "HTTP/1.1 %d %s\r\n", status, http.StatusText(status))
	for name, values := range header {
		for _, v := range values {
			fmt.Fprintf(&b, "%s: %s\r\n", name, v)
		}
	}
	b.WriteString("Content-Length: 0\r\nConnection: close\r\n\r\n")
	return b.String()
}

func (s *Server) relay() func(ctx context.Context, client, upstream net.Conn) error {
	if s.Relay != nil {
		return s.Relay
	}
	return CopyRelay
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

// CopyRelay is the Relay used when none is set: io.Copy in both directions,
// half-closing each write side when its source ends, closing both
// connections when both directions are done or ctx ends.
func CopyRelay(ctx context.Context, client, upstream net.Conn) error {
	stop := context.AfterFunc(ctx, func() {
		client.Close()
		upstream.Close()
	})
	defer stop()
	errc := make(chan error, 2)
	pipe := func(dst, src net.Conn, dir string) {
		_, err := io.Copy(dst, src)
		if err != nil {
			err = fmt.Errorf("%s: %w", dir, err)
			// The other direction cannot finish meaningfully.
			client.Close()
			upstream.Close()
		} else if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			// No half-close: closing is the only way to signal EOF.
			dst.Close()
		}
		errc <- err
	}
	go pipe(upstream, client, "client to upstream")
	go pipe(client, upstream, "upstream to client")
	err := errors.Join(<-errc, <-errc)
	client.Close()
	upstream.Close()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// requestTarget names what the client asked for, for logs.
func requestTarget(req *http.Request) string {
	if req.URL != nil && req.URL.Host != "" {
		return req.URL.Host
	}
	return req.Host
}

func isTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func orDefault(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// lingerClose ends a connection after an error reply the way RFC 9112 9.6
// asks: half-close, then read and discard what the client still sends for
// a moment. Closing with unread input makes the kernel send a reset, which
// can destroy the reply before the client reads it.
func lingerClose(ctx context.Context, conn net.Conn) {
	cw, ok := conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil || ctx.Err() != nil {
		return
	}
	_ = conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	_, _ = io.CopyN(io.Discard, conn, lingerBytes)
}

// writeWithin writes b to conn with a write deadline, then clears it.
func writeWithin(conn net.Conn, b []byte, timeout time.Duration) error {
	_ = conn.SetWriteDeadline(time.Now().Add(timeout))
	_, err := conn.Write(b)
	_ = conn.SetWriteDeadline(time.Time{})
	return err
}
