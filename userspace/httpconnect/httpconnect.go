// Package httpconnect is the client side of an HTTP CONNECT tunnel: GOST's
// `connector: http`. It asks an HTTP proxy to open a TCP tunnel to a target
// and hands back a net.Conn that carries the tunnel.
//
// The response is parsed by hand rather than with http.ReadResponse so that
// the header size is bounded and every byte the proxy sent after the header
// (the first tunnel bytes, which proxies may send in the same segment) is
// kept and delivered to the caller.
package httpconnect

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"
)

// MaxHeaderBytes bounds one proxy response header (status line, fields and
// the blank line). A proxy that sends more is treated as malformed rather than
// buffered without limit.
const MaxHeaderBytes = 16 << 10

// maxInterimResponses bounds how many 1xx responses are skipped before the
// final one, so a proxy cannot keep the handshake busy forever.
const maxInterimResponses = 8

// readChunk is the size of each read while waiting for the header. Modest on
// purpose: handshakes are many, headers are small.
const readChunk = 1024

// userAgent identifies ebpfwd to the proxy.
const userAgent = "ebpfwd"

var (
	// ErrProxyAuthRequired is matched (errors.Is) by the *StatusError of a
	// 407 response: the proxy wants credentials or rejected the ones sent.
	ErrProxyAuthRequired = errors.New("proxy authentication required")
	// ErrMalformedResponse means the proxy's reply is not a well-formed
	// HTTP/1.x response header of at most MaxHeaderBytes.
	ErrMalformedResponse = errors.New("malformed proxy response")
)

// Auth holds the credentials sent as `Proxy-Authorization: Basic ...`.
type Auth struct {
	Username, Password string
}

// StatusError is returned when the proxy answers CONNECT with a final status
// other than 2xx.
type StatusError struct {
	Target string // the CONNECT target
	Code   int    // e.g. 407
	Status string // status line after the version, e.g. "407 Proxy Authentication Required"
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("proxy refused CONNECT %s: %s", e.Target, e.Status)
}

// Is lets errors.Is(err, ErrProxyAuthRequired) match a 407.
func (e *StatusError) Is(target error) bool {
	return target == ErrProxyAuthRequired && e.Code == http.StatusProxyAuthRequired
}

// Conn is a tunnel whose first bytes arrived together with the proxy's
// response. Read returns those bytes before reading from the underlying
// connection. Like any net.Conn, Read must not be called concurrently with
// itself or WriteTo.
type Conn struct {
	net.Conn
	pending []byte
}

// Read drains the pending bytes first, then reads the underlying connection.
func (c *Conn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// WriteTo writes the pending bytes and then copies the underlying
// connection, so io.Copy(dst, c) can still reach dst.ReadFrom(*net.TCPConn)
// and with it splice(2).
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	var total int64
	if len(c.pending) > 0 {
		n, err := w.Write(c.pending)
		total += int64(n)
		c.pending = c.pending[n:]
		if err != nil {
			return total, err
		}
	}
	n, err := io.Copy(w, c.Conn)
	return total + n, err
}

// CloseWrite half-closes the underlying connection when it supports that,
// so half-close propagates through a tunnel built on this Conn.
func (c *Conn) CloseWrite() error {
	cw, ok := c.Conn.(interface{ CloseWrite() error })
	if !ok {
		return fmt.Errorf("half-close on %T: not supported", c.Conn)
	}
	return cw.CloseWrite()
}

// Pending returns the bytes not yet read by the caller. A relay that wants
// to splice writes these to the peer first and then uses NetConn.
func (c *Conn) Pending() []byte { return c.pending }

// NetConn returns the underlying connection.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// Handshake sends `CONNECT target HTTP/1.1` over conn and reads the proxy's
// response within ctx's deadline. On a 2xx it returns the tunnel: conn itself
// when nothing followed the response header (so a *net.TCPConn keeps
// splice(2)), otherwise a *Conn that yields the early bytes first.
//
// Handshake never closes conn; on error the caller does. Errors are a
// *StatusError for a non-2xx status, ErrMalformedResponse, an error wrapping
// io.ErrUnexpectedEOF when the proxy closed before a full response, or a
// timeout matching os.ErrDeadlineExceeded / context.DeadlineExceeded.
func Handshake(ctx context.Context, conn net.Conn, target string, auth *Auth) (net.Conn, error) {
	if err := validateTarget(target); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("CONNECT %s: %w", target, err)
	}

	if deadline, ok := ctx.Deadline(); ok {
		if err := conn.SetDeadline(deadline); err != nil {
			return nil, fmt.Errorf("CONNECT %s: set deadline: %w", target, err)
		}
	}
	// Cancellation without a deadline cannot be expressed as a deadline up
	// front; pulling the deadline into the past unblocks Read/Write instead.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	leftover, err := handshake(conn, target, auth)
	if !stop() {
		// The cancellation hook ran (or is running) and may move the
		// deadline after any reset below, so the conn cannot be handed
		// back as a healthy tunnel whatever handshake returned.
		ctxErr := ctx.Err()
		if err == nil {
			return nil, fmt.Errorf("CONNECT %s: %w", target, ctxErr)
		}
		if !errors.Is(err, ctxErr) {
			return nil, fmt.Errorf("%w (%w)", err, ctxErr)
		}
		return nil, err
	}
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			// The deadline fired in the conn before the context noticed.
			return nil, fmt.Errorf("%w (%w)", err, ctxErr)
		}
		return nil, err
	}
	// The tunnel's lifetime is the caller's business from here on. The
	// error is ignored on purpose: some conns (net.Pipe) refuse deadlines
	// once the peer has closed, which is a legitimate end of a tunnel whose
	// early bytes are already in hand; a broken conn shows on the next I/O.
	_ = conn.SetDeadline(time.Time{})
	if len(leftover) == 0 {
		return conn, nil
	}
	return &Conn{Conn: conn, pending: leftover}, nil
}

func handshake(conn net.Conn, target string, auth *Auth) ([]byte, error) {
	if _, err := conn.Write(buildRequest(target, auth)); err != nil {
		return nil, fmt.Errorf("send CONNECT %s: %w", target, err)
	}
	return readResponse(conn, target)
}

// buildRequest renders the CONNECT request. The target has been validated,
// so it cannot inject header lines.
func buildRequest(target string, auth *Auth) []byte {
	var b bytes.Buffer
	b.Grow(128)
	b.WriteString("CONNECT ")
	b.WriteString(target)
	b.WriteString(" HTTP/1.1\r\nHost: ")
	b.WriteString(target)
	b.WriteString("\r\nUser-Agent: " + userAgent + "\r\n")
	if auth != nil {
		b.WriteString("Proxy-Authorization: ")
		b.WriteString(BasicAuth(auth.Username, auth.Password))
		b.WriteString("\r\n")
	}
	b.WriteString("Proxy-Connection: keep-alive\r\n\r\n")
	return b.Bytes()
}

// BasicAuth returns the value of a Basic authorization header (RFC 7617).
func BasicAuth(username, password string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(username+":"+password))
}

// validateTarget accepts host:port with a non-empty port and nothing that
// could break the request line or smuggle header lines.
func validateTarget(target string) error {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return fmt.Errorf("CONNECT target %q: %w", target, err)
	}
	if host == "" || port == "" {
		return fmt.Errorf("CONNECT target %q: host and port are required", target)
	}
	for i := 0; i < len(target); i++ {
		if c := target[i]; c <= ' ' || c == 0x7f {
			return fmt.Errorf("CONNECT target %q: contains whitespace or control characters", target)
		}
	}
	return nil
}

// readResponse reads response headers until a final (non-1xx) one and
// returns the bytes that followed it. Reading happens in small chunks straight
// from conn; whatever was read past the header is returned, never dropped.
func readResponse(conn io.Reader, target string) ([]byte, error) {
	buf := make([]byte, 0, readChunk)
	for interim := 0; ; interim++ {
		end, rest, err := readHeader(conn, buf, target)
		if err != nil {
			return nil, err
		}
		code, status, err := parseHeader(rest[:end])
		if err != nil {
			return nil, fmt.Errorf("CONNECT %s: %w", target, err)
		}
		leftover := rest[end:]
		switch {
		case code >= 200 && code <= 299:
			if len(leftover) == 0 {
				return nil, nil
			}
			// Own the bytes: rest's backing array is a read buffer.
			return bytes.Clone(leftover), nil
		case code >= 100 && code <= 199 && code != http.StatusSwitchingProtocols:
			// Interim response (e.g. 100 Continue): a final one follows.
			if interim+1 >= maxInterimResponses {
				return nil, fmt.Errorf("CONNECT %s: more than %d interim responses: %w", target, maxInterimResponses, ErrMalformedResponse)
			}
			buf = append(buf[:0], leftover...)
		default:
			return nil, &StatusError{Target: target, Code: code, Status: status}
		}
	}
}

// readHeader reads from r, appending to buf (which may already hold bytes),
// until buf contains a complete header. It returns the header length and the
// buffer, which may hold more bytes after the header.
func readHeader(r io.Reader, buf []byte, target string) (int, []byte, error) {
	scanned := 0 // bytes already known not to end the header
	for {
		end, next := headerEnd(buf, scanned)
		if end >= 0 {
			if end > MaxHeaderBytes {
				return 0, nil, fmt.Errorf("CONNECT %s: response header larger than %d bytes: %w", target, MaxHeaderBytes, ErrMalformedResponse)
			}
			return end, buf, nil
		}
		scanned = next
		if len(buf) > MaxHeaderBytes {
			return 0, nil, fmt.Errorf("CONNECT %s: response header larger than %d bytes: %w", target, MaxHeaderBytes, ErrMalformedResponse)
		}
		if len(buf) == cap(buf) {
			buf = append(buf, make([]byte, readChunk)...)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if n > 0 && errors.Is(err, io.EOF) {
				continue // look at the final bytes before reporting EOF
			}
			if errors.Is(err, io.EOF) {
				return 0, nil, fmt.Errorf("CONNECT %s: proxy closed the connection before responding: %w", target, io.ErrUnexpectedEOF)
			}
			return 0, nil, fmt.Errorf("CONNECT %s: read response: %w", target, err)
		}
	}
}

// headerEnd looks for the blank line ending a header, starting at from (the
// start of a line not yet known to be complete). It returns the offset just
// past the blank line, or -1 and the offset where the next scan should start.
// Bare LF line endings are accepted, as in net/textproto.
func headerEnd(buf []byte, from int) (end, next int) {
	lineStart := from
	for {
		i := bytes.IndexByte(buf[lineStart:], '\n')
		if i < 0 {
			return -1, lineStart
		}
		line := buf[lineStart : lineStart+i]
		if lineStart > 0 && (len(line) == 0 || (len(line) == 1 && line[0] == '\r')) {
			return lineStart + i + 1, 0
		}
		lineStart += i + 1
	}
}

// parseHeader validates one response header and returns its status code and
// status text ("407 Proxy Authentication Required").
func parseHeader(header []byte) (int, string, error) {
	statusLine, fields, _ := bytes.Cut(header, []byte("\n"))
	statusLine = bytes.TrimSuffix(statusLine, []byte("\r"))

	proto, status, ok := strings.Cut(string(statusLine), " ")
	if !ok {
		return 0, "", fmt.Errorf("status line %q: %w", truncate(statusLine), ErrMalformedResponse)
	}
	if major, _, ok := http.ParseHTTPVersion(proto); !ok || major != 1 {
		return 0, "", fmt.Errorf("status line %q: not HTTP/1.x: %w", truncate(statusLine), ErrMalformedResponse)
	}
	status = strings.TrimLeft(status, " ")
	codeText, _, _ := strings.Cut(status, " ")
	code, err := strconv.Atoi(codeText)
	if len(codeText) != 3 || err != nil || code < 100 || code > 599 {
		return 0, "", fmt.Errorf("status line %q: bad status code: %w", truncate(statusLine), ErrMalformedResponse)
	}
	if strings.ContainsFunc(status, func(r rune) bool { return r < ' ' && r != '\t' || r == 0x7f }) {
		return 0, "", fmt.Errorf("status line %q: control characters: %w", truncate(statusLine), ErrMalformedResponse)
	}

	// The fields are not needed for CONNECT, but a response whose fields do
	// not parse is not HTTP and must not be trusted as a tunnel.
	tr := textproto.NewReader(bufio.NewReaderSize(bytes.NewReader(fields), 256))
	if _, err := tr.ReadMIMEHeader(); err != nil {
		return 0, "", fmt.Errorf("header fields: %v: %w", err, ErrMalformedResponse)
	}
	return code, status, nil
}

// truncate keeps error messages readable when a proxy sends megabytes of
// garbage on one line.
func truncate(b []byte) string {
	const limit = 64
	if len(b) > limit {
		return string(b[:limit]) + "..."
	}
	return string(b)
}
