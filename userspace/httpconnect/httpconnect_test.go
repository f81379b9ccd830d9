package httpconnect

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

const testTarget = "10.0.1.11:8000"

func dialProxy(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial proxy: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func TestHandshake(t *testing.T) {
	bs := func(s ...string) [][]byte {
		out := make([][]byte, len(s))
		for i := range s {
			out[i] = []byte(s[i])
		}
		return out
	}
	tests := []struct {
		name     string
		reply    testutil.ProxyReply
		ctxLimit time.Duration
		wantErr  func(error) bool
		wantSame bool   // tunnel must be the original *net.TCPConn
		wantData string // bytes the tunnel must yield after the response
	}{
		{
			name:     "200 without following bytes",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 Connection established\r\n\r\n")},
			wantSame: true,
		},
		{
			name:     "200 with following bytes in the same write",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 OK\r\n\r\nSSH-2.0-OpenSSH_9.6\r\n"), Close: true},
			wantData: "SSH-2.0-OpenSSH_9.6\r\n",
		},
		{
			name:     "200 with headers",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 Connection established\r\nProxy-Agent: gost/3.0\r\nX-Foo: bar\r\n\r\n")},
			wantSame: true,
		},
		{
			name:     "HTTP/1.0 200 with bare LF",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.0 200\n\nhello"), Close: true},
			wantData: "hello",
		},
		{
			name:     "100 Continue before 200 is skipped",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nafter"), Close: true},
			wantData: "after",
		},
		{
			name:     "response split across writes",
			reply:    testutil.ProxyReply{Chunks: bs("HTTP/1.1 20", "0 OK\r\nA: b\r", "\n\r\n")},
			wantSame: true,
		},
		{
			name:  "407",
			reply: testutil.ProxyReply{Chunks: bs("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n"), Close: true},
			wantErr: func(err error) bool {
				var se *StatusError
				return errors.Is(err, ErrProxyAuthRequired) && errors.As(err, &se) && se.Code == 407 &&
					err.Error() == "proxy refused CONNECT 10.0.1.11:8000: 407 Proxy Authentication Required"
			},
		},
		{
			name:  "502",
			reply: testutil.ProxyReply{Chunks: bs("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 3\r\n\r\nbad"), Close: true},
			wantErr: func(err error) bool {
				var se *StatusError
				return errors.As(err, &se) && se.Code == 502 && !errors.Is(err, ErrProxyAuthRequired) &&
					strings.Contains(err.Error(), "502 Bad Gateway")
			},
		},
		{
			name:  "503",
			reply: testutil.ProxyReply{Chunks: bs("HTTP/1.1 503 Service Unavailable\r\n\r\n"), Close: true},
			wantErr: func(err error) bool {
				var se *StatusError
				return errors.As(err, &se) && se.Code == 503
			},
		},
		{
			name:    "garbage reply",
			reply:   testutil.ProxyReply{Chunks: bs("SSH-2.0-OpenSSH_9.6\r\n\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
		{
			name:    "bad status code",
			reply:   testutil.ProxyReply{Chunks: bs("HTTP/1.1 2000 OK\r\n\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
		{
			name:    "HTTP/2 status line",
			reply:   testutil.ProxyReply{Chunks: bs("HTTP/2.0 200 OK\r\n\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
		{
			name:    "malformed header field",
			reply:   testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
		{
			name:    "closed mid-header",
			reply:   testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 OK\r\nProxy-Agent: x\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) },
		},
		{
			name:    "closed without a byte",
			reply:   testutil.ProxyReply{Close: true},
			wantErr: func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) },
		},
		{
			name:     "timeout",
			reply:    testutil.ProxyReply{Hang: true},
			ctxLimit: 200 * time.Millisecond,
			wantErr: func(err error) bool {
				return errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.DeadlineExceeded)
			},
		},
		{
			name:    "oversized header",
			reply:   testutil.ProxyReply{Chunks: bs("HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", MaxHeaderBytes) + "\r\n\r\n"), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
		{
			name:    "endless interim responses",
			reply:   testutil.ProxyReply{Chunks: bs(strings.Repeat("HTTP/1.1 100 Continue\r\n\r\n", maxInterimResponses+1)), Close: true},
			wantErr: func(err error) bool { return errors.Is(err, ErrMalformedResponse) },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, reqs := testutil.StartScriptedProxy(t, tt.reply)
			conn := dialProxy(t, addr)
			limit := tt.ctxLimit
			if limit == 0 {
				limit = 5 * time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), limit)
			defer cancel()

			start := time.Now()
			tunnel, err := Handshake(ctx, conn, testTarget, nil)
			if tt.wantErr != nil {
				if err == nil || !tt.wantErr(err) {
					t.Fatalf("Handshake error = %v, does not match expectation", err)
				}
				if tt.ctxLimit > 0 && time.Since(start) > tt.ctxLimit+2*time.Second {
					t.Fatalf("Handshake took %v with a %v deadline", time.Since(start), tt.ctxLimit)
				}
				return
			}
			if err != nil {
				t.Fatalf("Handshake: %v", err)
			}
			if req := <-reqs; req == nil || req.Method != http.MethodConnect || req.RequestURI != testTarget {
				t.Fatalf("proxy saw request %+v, want CONNECT %s", req, testTarget)
			}
			if tt.wantSame {
				if tunnel != net.Conn(conn) {
					t.Fatalf("tunnel is %T, want the original *net.TCPConn", tunnel)
				}
				return
			}
			tc, ok := tunnel.(*Conn)
			if !ok {
				t.Fatalf("tunnel is %T, want *Conn carrying early bytes", tunnel)
			}
			if string(tc.Pending()) != tt.wantData {
				t.Fatalf("Pending() = %q, want %q", tc.Pending(), tt.wantData)
			}
			if tc.NetConn() != net.Conn(conn) {
				t.Fatalf("NetConn() is not the original connection")
			}
			_ = tunnel.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(tunnel)
			if err != nil {
				t.Fatalf("read tunnel: %v", err)
			}
			if string(got) != tt.wantData {
				t.Fatalf("tunnel yielded %q, want %q", got, tt.wantData)
			}
		})
	}
}

func TestHandshakeRequest(t *testing.T) {
	tests := []struct {
		name     string
		auth     *Auth
		wantAuth string
	}{
		{name: "no auth"},
		{name: "auth", auth: &Auth{Username: "user", Password: "pa:ss word"}, wantAuth: "Basic " + base64.StdEncoding.EncodeToString([]byte("user:pa:ss word"))},
		{name: "empty password", auth: &Auth{Username: "u"}, wantAuth: "Basic dTo="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			addr, reqs := testutil.StartScriptedProxy(t, testutil.ProxyReply{Chunks: [][]byte{[]byte("HTTP/1.1 200 OK\r\n\r\n")}})
			conn := dialProxy(t, addr)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := Handshake(ctx, conn, testTarget, tt.auth); err != nil {
				t.Fatalf("Handshake: %v", err)
			}
			req := <-reqs
			if req == nil {
				t.Fatal("proxy could not parse the request")
			}
			checks := []struct{ field, got, want string }{
				{"method", req.Method, http.MethodConnect},
				{"request target", req.RequestURI, testTarget},
				{"Host", req.Host, testTarget},
				{"Proxy-Authorization", req.Header.Get("Proxy-Authorization"), tt.wantAuth},
				{"Proxy-Connection", req.Header.Get("Proxy-Connection"), "keep-alive"},
				{"User-Agent", req.Header.Get("User-Agent"), "ebpfwd"},
				{"proto", req.Proto, "HTTP/1.1"},
			}
			for _, c := range checks {
				if c.got != c.want {
					t.Errorf("%s = %q, want %q", c.field, c.got, c.want)
				}
			}
			if tt.auth != nil {
				// Request.BasicAuth decodes Authorization; feed it the proxy header.
				r := &http.Request{Header: http.Header{"Authorization": {req.Header.Get("Proxy-Authorization")}}}
				user, pass, ok := r.BasicAuth()
				if !ok || user != tt.auth.Username || pass != tt.auth.Password {
					t.Errorf("decoded credentials %q:%q ok=%v, want %q:%q", user, pass, ok, tt.auth.Username, tt.auth.Password)
				}
			}
		})
	}
}

func TestHandshakeRejectsBadTarget(t *testing.T) {
	tests := []string{"", "no-port", "host:", ":80", "a b:80", "evil:80\r\nX-Injected: 1"}
	for _, target := range tests {
		t.Run(target, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			defer server.Close()
			if _, err := Handshake(context.Background(), client, target, nil); err == nil {
				t.Fatalf("Handshake accepted target %q", target)
			}
		})
	}
}

func TestHandshakeCancel(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	go func() { _, _ = io.Copy(io.Discard, server) }() // reads, never answers

	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	errc := make(chan error, 1)
	go func() {
		_, err := Handshake(ctx, client, testTarget, nil)
		errc <- err
	}()
	select {
	case err := <-errc:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Handshake error = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Handshake did not return after cancellation")
	}
}

func TestConnCloseWrite(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		b, _ := io.ReadAll(c) // returns at the peer's half-close
		got <- b
	}()
	raw := dialProxy(t, ln.Addr().String())
	c := &Conn{Conn: raw, pending: []byte("x")}
	if _, err := c.Write([]byte("data")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	select {
	case b := <-got:
		if string(b) != "data" {
			t.Fatalf("peer read %q, want %q", b, "data")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("peer never saw the half-close")
	}

	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	if err := (&Conn{Conn: client}).CloseWrite(); err == nil {
		t.Fatal("CloseWrite on net.Pipe succeeded, want an unsupported error")
	}
}

func TestConnWriteTo(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	go func() {
		_, _ = server.Write([]byte(" world"))
		server.Close()
	}()
	c := &Conn{Conn: client, pending: []byte("hello")}
	var out bytes.Buffer
	_ = client.SetDeadline(time.Now().Add(5 * time.Second))
	n, err := io.Copy(&out, c)
	if err != nil {
		t.Fatalf("copy: %v", err)
	}
	if out.String() != "hello world" || n != int64(len("hello world")) {
		t.Fatalf("copied %d bytes %q, want %q", n, out.String(), "hello world")
	}
	if len(c.Pending()) != 0 {
		t.Fatalf("Pending() = %q after WriteTo, want empty", c.Pending())
	}
}

// replayConn is an in-memory proxy connection: writes are discarded, reads
// return reply in pieces of at most step bytes, then io.EOF. It cannot hang.
type replayConn struct {
	net.Conn // nil: only the methods below are used
	reply    []byte
	step     int
}

func (r *replayConn) Read(p []byte) (int, error) {
	if len(r.reply) == 0 {
		return 0, io.EOF
	}
	n := min(len(p), r.step, len(r.reply))
	copy(p, r.reply[:n])
	r.reply = r.reply[n:]
	return n, nil
}
func (r *replayConn) Write(p []byte) (int, error)      { return len(p), nil }
func (r *replayConn) SetDeadline(time.Time) error      { return nil }
func (r *replayConn) SetReadDeadline(time.Time) error  { return nil }
func (r *replayConn) SetWriteDeadline(time.Time) error { return nil }
func (r *replayConn) Close() error                     { return nil }
func (r *replayConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (r *replayConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }

func FuzzReadResponse(f *testing.F) {
	seeds := []string{
		"HTTP/1.1 200 Connection established\r\n\r\n",
		"HTTP/1.1 200 OK\r\n\r\ntunnel bytes",
		"HTTP/1.0 200\n\n",
		"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
		"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n",
		"HTTP/1.1 502 Bad Gateway\r\n\r\n",
		"\r\n\r\n",
		"garbage",
		"HTTP/1.1 200 OK\r\n",
	}
	for _, s := range seeds {
		f.Add([]byte(s), uint8(7))
	}
	f.Fuzz(func(t *testing.T, reply []byte, step uint8) {
		conn := &replayConn{reply: bytes.Clone(reply), step: int(step)%64 + 1}
		tunnel, err := Handshake(context.Background(), conn, testTarget, nil)
		if err != nil {
			if tunnel != nil {
				t.Fatal("non-nil tunnel with an error")
			}
			var se *StatusError
			if !errors.Is(err, ErrMalformedResponse) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.As(err, &se) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		// Success: the early bytes plus what is still unread must be a
		// suffix of the reply, i.e. nothing after the header was lost.
		rest, _ := io.ReadAll(tunnel)
		if !bytes.HasSuffix(reply, rest) {
			t.Fatalf("tunnel yielded %q, not a suffix of the reply %q", rest, reply)
		}
		if !bytes.HasPrefix(reply, []byte("HTTP/1.")) {
			t.Fatalf("accepted a reply that is not HTTP/1.x: %q", reply)
		}
	})
}

func BenchmarkHandshake(b *testing.B) {
	response := []byte("HTTP/1.1 200 Connection established\r\n\r\n")
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		client, server := net.Pipe()
		go func() {
			defer server.Close()
			br := bufio.NewReader(server)
			if _, err := http.ReadRequest(br); err != nil {
				return
			}
			_, _ = server.Write(response)
		}()
		if _, err := Handshake(ctx, client, testTarget, nil); err != nil {
			b.Fatalf("Handshake: %v", err)
		}
		client.Close()
	}
}

// A proxy may answer 200 and close at once (an empty tunnel). net.Pipe then
// refuses deadline changes; the handshake must still succeed.
func TestHandshakePeerClosesAfterResponse(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	go func() {
		defer server.Close()
		if _, err := http.ReadRequest(bufio.NewReader(server)); err != nil {
			return
		}
		_, _ = server.Write([]byte("HTTP/1.1 200 OK\r\n\r\n"))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tunnel, err := Handshake(ctx, client, testTarget, nil)
	if err != nil {
		t.Fatalf("Handshake: %v", err)
	}
	if tunnel != client {
		t.Fatalf("tunnel is %T, want the original conn", tunnel)
	}
	if _, err := tunnel.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("read on closed tunnel = %v, want io.EOF", err)
	}
}
