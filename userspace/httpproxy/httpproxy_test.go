package httpproxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

const testTimeout = 10 * time.Second

// startProxy serves srv on a loopback listener and returns its address and
// the results it reports. Everything is torn down in t.Cleanup.
func startProxy(t *testing.T, srv *Server) (string, <-chan Result) {
	t.Helper()
	results := make(chan Result, 16)
	srv.OnResult = func(r Result) {
		select {
		case results <- r:
		default:
		}
	}
	if srv.Logger == nil {
		srv.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return testutil.ServeLoopback(t, srv.ServeConn), results
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	t.Cleanup(func() { c.Close() })
	return c
}

func nextResult(t *testing.T, results <-chan Result) Result {
	t.Helper()
	select {
	case r := <-results:
		return r
	case <-time.After(testTimeout):
		t.Fatal("no result reported")
		return Result{}
	}
}

// rawExchange writes request to the proxy and parses its response.
func rawExchange(t *testing.T, proxy, request string) (*http.Response, *bufio.Reader, net.Conn) {
	t.Helper()
	c := dial(t, proxy)
	if _, err := io.WriteString(c, request); err != nil {
		t.Fatalf("write request: %v", err)
	}
	br := bufio.NewReader(c)
	method, _, _ := strings.Cut(request, " ")
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	return resp, br, c
}

func TestConnectAuth(t *testing.T) {
	creds := &httpconnect.Auth{Username: "alice", Password: "s3cret"}
	tests := []struct {
		name       string
		serverAuth *httpconnect.Auth
		clientAuth *httpconnect.Auth
		wantStatus int
	}{
		{name: "no auth", wantStatus: http.StatusOK},
		{name: "good credentials", serverAuth: creds, clientAuth: creds, wantStatus: http.StatusOK},
		{name: "unused credentials", clientAuth: creds, wantStatus: http.StatusOK},
		{name: "wrong password", serverAuth: creds, clientAuth: &httpconnect.Auth{Username: "alice", Password: "nope"}, wantStatus: http.StatusProxyAuthRequired},
		{name: "wrong user", serverAuth: creds, clientAuth: &httpconnect.Auth{Username: "bob", Password: "s3cret"}, wantStatus: http.StatusProxyAuthRequired},
		{name: "missing credentials", serverAuth: creds, wantStatus: http.StatusProxyAuthRequired},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			echo := testutil.ServeLoopback(t, testutil.Echo)
			proxy, results := startProxy(t, &Server{Auth: tt.serverAuth})
			c := dial(t, proxy)
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()

			tunnel, err := httpconnect.Handshake(ctx, c, echo, tt.clientAuth)
			if tt.wantStatus != http.StatusOK {
				if !errors.Is(err, httpconnect.ErrProxyAuthRequired) {
					t.Fatalf("Handshake error = %v, want ErrProxyAuthRequired", err)
				}
			} else {
				if err != nil {
					t.Fatalf("Handshake: %v", err)
				}
				_ = tunnel.SetDeadline(time.Now().Add(testTimeout))
				if _, err := io.WriteString(tunnel, "ping"); err != nil {
					t.Fatalf("write through tunnel: %v", err)
				}
				got := make([]byte, 4)
				if _, err := io.ReadFull(tunnel, got); err != nil || string(got) != "ping" {
					t.Fatalf("echo through tunnel = %q, %v; want %q", got, err, "ping")
				}
				tunnel.Close()
			}
			r := nextResult(t, results)
			if r.Method != http.MethodConnect || r.Target != echo || r.Status != tt.wantStatus {
				t.Fatalf("result = %+v, want CONNECT %s status %d", r, echo, tt.wantStatus)
			}
			if (r.Err != nil) != (tt.wantStatus != http.StatusOK) {
				t.Fatalf("result error = %v for status %d", r.Err, tt.wantStatus)
			}
		})
	}
}

func TestAuthChallenge(t *testing.T) {
	proxy, _ := startProxy(t, &Server{Auth: &httpconnect.Auth{Username: "u", Password: "p"}})
	resp, br, _ := rawExchange(t, proxy, "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
	if resp.StatusCode != http.StatusProxyAuthRequired {
		t.Fatalf("status = %d, want 407", resp.StatusCode)
	}
	if got, want := resp.Header.Get("Proxy-Authenticate"), `Basic realm="ebpfwd"`; got != want {
		t.Fatalf("Proxy-Authenticate = %q, want %q", got, want)
	}
	// The proxy closes after a 407.
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("read after 407 = %v, want EOF", err)
	}
}

func TestConnectPipelined(t *testing.T) {
	tests := []struct {
		name string
		size int
	}{
		{name: "small, inside the read buffer", size: 32},
		{name: "larger than the read buffer", size: 3 * readBufferSize},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			echo := testutil.ServeLoopback(t, testutil.Echo)
			proxy, _ := startProxy(t, &Server{})
			c := dial(t, proxy)
			payload := make([]byte, tt.size)
			for i := range payload {
				payload[i] = byte('a' + i%26)
			}
			// Request and first tunnel bytes in one write, before any reply.
			req := "CONNECT " + echo + " HTTP/1.1\r\nHost: " + echo + "\r\n\r\n"
			if _, err := c.Write(append([]byte(req), payload...)); err != nil {
				t.Fatalf("write: %v", err)
			}
			_ = c.(*net.TCPConn).CloseWrite()
			br := bufio.NewReader(c)
			resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("response = %v, %v; want 200", resp, err)
			}
			got, err := io.ReadAll(br)
			if err != nil {
				t.Fatalf("read tunnel: %v", err)
			}
			if string(got) != string(payload) {
				t.Fatalf("echo returned %d bytes, want the %d pipelined bytes intact", len(got), len(payload))
			}
		})
	}
}

func TestDialFailure(t *testing.T) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	refusedAddr := closed.Addr().String()
	closed.Close()

	tests := []struct {
		name       string
		srv        *Server
		wantStatus int
		wantCause  error // the dial's own error stays reachable for errors.Is
	}{
		{name: "refused", srv: &Server{}, wantStatus: http.StatusBadGateway, wantCause: syscall.ECONNREFUSED},
		{name: "timeout", srv: &Server{Dial: blockingDial, DialTimeout: 100 * time.Millisecond}, wantStatus: http.StatusGatewayTimeout,
			wantCause: context.DeadlineExceeded},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, results := startProxy(t, tt.srv)
			c := dial(t, proxy)
			ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
			defer cancel()
			_, err := httpconnect.Handshake(ctx, c, refusedAddr, nil)
			var se *httpconnect.StatusError
			if !errors.As(err, &se) || se.Code != tt.wantStatus {
				t.Fatalf("Handshake error = %v, want status %d", err, tt.wantStatus)
			}
			if r := nextResult(t, results); r.Status != tt.wantStatus || !errors.Is(r.Err, tt.wantCause) || r.Target != refusedAddr {
				t.Fatalf("result = %+v, want status %d with an error wrapping %v", r, tt.wantStatus, tt.wantCause)
			}
		})
	}
}

func TestBadRequests(t *testing.T) {
	tests := []struct {
		name    string
		request string
		want    int
	}{
		{name: "garbage", request: "hello there\r\n\r\n", want: http.StatusBadRequest},
		{name: "origin-form GET", request: "GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", want: http.StatusBadRequest},
		{name: "https absolute URI", request: "GET https://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", want: http.StatusBadRequest},
		{name: "absolute URI without host", request: "GET http:///x HTTP/1.1\r\nHost: \r\n\r\n", want: http.StatusBadRequest},
		{name: "CONNECT without port", request: "CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", want: http.StatusBadRequest},
		{name: "CONNECT origin-form", request: "CONNECT /tunnel HTTP/1.1\r\nHost: example.com\r\n\r\n", want: http.StatusBadRequest},
		{name: "header too large", request: "GET http://127.0.0.1:9/ HTTP/1.1\r\nX-Big: " + strings.Repeat("a", maxRequestHeaderBytes) + "\r\n\r\n", want: http.StatusRequestHeaderFieldsTooLarge},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, results := startProxy(t, &Server{})
			resp, _, _ := rawExchange(t, proxy, tt.request)
			if resp.StatusCode != tt.want {
				t.Fatalf("status = %d, want %d", resp.StatusCode, tt.want)
			}
			if r := nextResult(t, results); r.Status != tt.want || r.Err == nil {
				t.Fatalf("result = %+v, want status %d with an error", r, tt.want)
			}
		})
	}
}

func TestPlainHTTP(t *testing.T) {
	type seen struct {
		requestURI, proxyAuth, proxyConn, connection, body, host string
	}
	seenc := make(chan seen, 1)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		seenc <- seen{
			requestURI: r.RequestURI,
			proxyAuth:  r.Header.Get("Proxy-Authorization"),
			proxyConn:  r.Header.Get("Proxy-Connection"),
			connection: r.Header.Get("Connection"),
			body:       string(body),
			host:       r.Host,
		}
		fmt.Fprintf(w, "hello from %s", r.URL.Path)
	}))
	t.Cleanup(origin.Close)
	originHost := strings.TrimPrefix(origin.URL, "http://")

	creds := &httpconnect.Auth{Username: "alice", Password: "s3cret"}
	proxy, results := startProxy(t, &Server{Auth: creds})

	t.Run("raw GET", func(t *testing.T) {
		req := "GET " + origin.URL + "/x?y=1 HTTP/1.1\r\nHost: " + originHost +
			"\r\nProxy-Authorization: " + httpconnect.BasicAuth(creds.Username, creds.Password) +
			"\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n"
		resp, br, c := rawExchange(t, proxy, req)
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK || string(body) != "hello from /x" {
			t.Fatalf("response %d %q, %v; want 200 %q", resp.StatusCode, body, err, "hello from /x")
		}
		// The proxy passes on the origin's close; the client closes in turn,
		// which ends the relay.
		if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
			t.Fatalf("read after response = %v, want EOF", err)
		}
		c.Close()
		s := <-seenc
		if s.requestURI != "/x?y=1" || s.proxyAuth != "" || s.proxyConn != "" || s.host != originHost {
			t.Fatalf("origin saw %+v, want origin-form /x?y=1, Host %s and no proxy headers", s, originHost)
		}
		if r := nextResult(t, results); r.Method != http.MethodGet || r.Target != originHost || r.Err != nil {
			t.Fatalf("result = %+v, want clean GET to %s", r, originHost)
		}
	})

	t.Run("http.Client POST with body", func(t *testing.T) {
		proxyURL := &url.URL{Scheme: "http", Host: proxy, User: url.UserPassword(creds.Username, creds.Password)}
		client := &http.Client{
			Transport: &http.Transport{Proxy: http.ProxyURL(proxyURL)},
			Timeout:   testTimeout,
		}
		defer client.CloseIdleConnections()
		resp, err := client.Post(origin.URL+"/upload", "text/plain", strings.NewReader("payload"))
		if err != nil {
			t.Fatalf("POST through proxy: %v", err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(body) != "hello from /upload" {
			t.Fatalf("body %q, %v; want %q", body, err, "hello from /upload")
		}
		if s := <-seenc; s.body != "payload" || s.requestURI != "/upload" || s.proxyAuth != "" {
			t.Fatalf("origin saw %+v, want body %q at /upload without Proxy-Authorization", s, "payload")
		}
		nextResult(t, results)
	})

	t.Run("missing credentials", func(t *testing.T) {
		resp, _, _ := rawExchange(t, proxy, "GET "+origin.URL+"/x HTTP/1.1\r\nHost: "+originHost+"\r\n\r\n")
		if resp.StatusCode != http.StatusProxyAuthRequired {
			t.Fatalf("status = %d, want 407", resp.StatusCode)
		}
		select {
		case s := <-seenc:
			t.Fatalf("origin was reached without credentials: %+v", s)
		default:
		}
		nextResult(t, results)
	})
}

func TestRemoveHopByHop(t *testing.T) {
	h := http.Header{
		"Connection":          {"keep-alive, X-Custom"},
		"X-Custom":            {"1"},
		"Keep-Alive":          {"timeout=5"},
		"Proxy-Authorization": {"Basic x"},
		"Proxy-Connection":    {"keep-alive"},
		"Te":                  {"trailers"},
		"Upgrade":             {"websocket"},
		"Accept":              {"*/*"},
	}
	removeHopByHop(h)
	if len(h) != 1 || h.Get("Accept") != "*/*" {
		t.Fatalf("headers after removal = %v, want only Accept", h)
	}
}

func TestParseBasic(t *testing.T) {
	tests := []struct {
		value, user, pass string
		ok                bool
	}{
		{value: httpconnect.BasicAuth("u", "p:w"), user: "u", pass: "p:w", ok: true},
		{value: "basic " + strings.TrimPrefix(httpconnect.BasicAuth("u", "p"), "Basic "), user: "u", pass: "p", ok: true},
		{value: "Bearer abc"},
		{value: "Basic !!!"},
		{value: "Basic dXNlcg=="}, // "user", no colon
		{value: "Basic"},
	}
	for _, tt := range tests {
		t.Run(tt.value, func(t *testing.T) {
			user, pass, ok := parseBasic(tt.value)
			if ok != tt.ok || user != tt.user || pass != tt.pass {
				t.Fatalf("parseBasic(%q) = %q, %q, %v; want %q, %q, %v", tt.value, user, pass, ok, tt.user, tt.pass, tt.ok)
			}
		})
	}
}

func TestServeConnHonoursCancel(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	srv := &Server{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	go func() {
		srv.ServeConn(ctx, server) // the client never sends a request
		close(done)
	}()
	time.AfterFunc(50*time.Millisecond, cancel)
	select {
	case <-done:
	case <-time.After(testTimeout):
		t.Fatal("ServeConn did not return after cancel")
	}
}
