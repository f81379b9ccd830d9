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
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

// hostileRequests are requests RFC 9112 says a proxy must refuse, with the
// status and counted reason each gets. They seed FuzzServeRequest too.
var hostileRequests = []struct {
	name    string
	request string
	status  int
	refused Refusal
}{
	{"Content-Length with Transfer-Encoding", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, RefusedMalformed},
	{"Transfer-Encoding before Content-Length", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n", 400, RefusedMalformed},
	{"HTTP/1.0 with Transfer-Encoding", "POST http://127.0.0.1:9/ HTTP/1.0\r\nHost: 127.0.0.1:9\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, RefusedMalformed},
	{"duplicate Content-Length, same value", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", 400, RefusedMalformed},
	{"duplicate Content-Length, differing", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd", 400, RefusedMalformed},
	{"Content-Length list", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 4, 4\r\n\r\nabcd", 400, RefusedMalformed},
	{"unknown transfer coding", "POST http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nTransfer-Encoding: gzip\r\n\r\n", 400, RefusedMalformed},
	{"whitespace before colon", "GET http://127.0.0.1:9/ HTTP/1.1\r\nHost : 127.0.0.1:9\r\n\r\n", 400, RefusedMalformed},
	{"obs-fold on the first header line", "GET http://127.0.0.1:9/ HTTP/1.1\r\n Host: 127.0.0.1:9\r\n\r\n", 400, RefusedMalformed},
	{"bare CR in a value", "GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nX: a\rb\r\n\r\n", 400, RefusedMalformed},
	{"garbage", "hello there\r\n\r\n", 400, RefusedMalformed},
	{"origin-form GET", "GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, RefusedMalformed},
	{"CONNECT without port", "CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n", 400, RefusedMalformed},
	{"request line too long", "GET http://127.0.0.1:9/" + strings.Repeat("a", maxRequestLineBytes) + " HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n", 414, RefusedTooLarge},
	{"request line without end", "GET http://127.0.0.1:9/" + strings.Repeat("a", maxRequestHeaderBytes), 414, RefusedTooLarge},
	{"header too large", "GET http://127.0.0.1:9/ HTTP/1.1\r\nX-Big: " + strings.Repeat("a", maxRequestHeaderBytes) + "\r\n\r\n", 431, RefusedTooLarge},
}

// neverDial fails the test if the handler dials: refused requests must not
// reach any target.
func neverDial(t *testing.T) func(context.Context, string, string) (net.Conn, error) {
	return func(_ context.Context, _, addr string) (net.Conn, error) {
		t.Errorf("dialed %s for a request that must be refused", addr)
		return nil, errors.New("test: no dial expected")
	}
}

// TestHostileRequests: every request RFC 9112 rules out gets its status,
// then the proxy's close, and is counted with its reason; none is dialed.
func TestHostileRequests(t *testing.T) {
	for _, tt := range hostileRequests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, results := startProxy(t, &Server{Dial: neverDial(t)})
			resp, br, _ := rawExchange(t, proxy, tt.request)
			if resp.StatusCode != tt.status {
				t.Fatalf("status = %d, want %d", resp.StatusCode, tt.status)
			}
			if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
				t.Fatalf("after the %d: %q, %v; want the proxy's close", tt.status, rest, err)
			}
			if r := nextResult(t, results); r.Status != tt.status || r.Refused != tt.refused || !r.Sent || r.Err == nil {
				t.Fatalf("result = %+v, want a sent %d refused as %s", r, tt.status, tt.refused)
			}
		})
	}
}

// originEcho is an origin that answers each request with what it saw.
func originEcho(t *testing.T) (host string, seen <-chan string) {
	t.Helper()
	ch := make(chan string, 4)
	origin := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		ch <- fmt.Sprintf("%s %s x=%q body=%q", r.Method, r.RequestURI, r.Header.Get("X"), body)
		fmt.Fprintf(w, "ok %s", r.URL.Path)
	}))
	t.Cleanup(origin.Close)
	return strings.TrimPrefix(origin.URL, "http://"), ch
}

// TestTolerated: what RFC 9112 lets a recipient accept is accepted and
// forwarded in the standard form: bare LF line ends (2.2), obs-fold replaced
// by a space (5.2), a chunked body (re-chunked upstream).
func TestTolerated(t *testing.T) {
	origin, seen := originEcho(t)
	tests := []struct{ name, request, want string }{
		{"bare LF", "GET http://" + origin + "/lf HTTP/1.1\nHost: " + origin + "\nX: 1\n\n", `GET /lf x="1" body=""`},
		{"obs-fold", "GET http://" + origin + "/fold HTTP/1.1\r\nHost: " + origin + "\r\nX: a\r\n b\r\n\r\n", `GET /fold x="a b" body=""`},
		{"chunked body", "POST http://" + origin + "/c HTTP/1.1\r\nHost: " + origin + "\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n", `POST /c x="" body="abcd"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, _ := startProxy(t, &Server{})
			resp, _, _ := rawExchange(t, proxy, tt.request)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("status = %d, want 200", resp.StatusCode)
			}
			select {
			case got := <-seen:
				if got != tt.want {
					t.Fatalf("origin saw %s, want %s", got, tt.want)
				}
			case <-time.After(testTimeout):
				t.Fatal("origin saw nothing")
			}
		})
	}
}

// TestPipelinedRequestsCloseAfterFirst: a second request pipelined behind
// the first is not answered: one response, then the close.
func TestPipelinedRequestsCloseAfterFirst(t *testing.T) {
	origin, seen := originEcho(t)
	proxy, _ := startProxy(t, &Server{})
	one := "GET http://" + origin + "/one HTTP/1.1\r\nHost: " + origin + "\r\n\r\n"
	two := "GET http://" + origin + "/two HTTP/1.1\r\nHost: " + origin + "\r\n\r\n"
	resp, br, _ := rawExchange(t, proxy, one+two)
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK || string(body) != "ok /one" {
		t.Fatalf("first response %d %q, %v; want 200 %q", resp.StatusCode, body, err, "ok /one")
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		t.Fatalf("after the first response: %q, %v; want the close", rest, err)
	}
	if got := <-seen; !strings.HasPrefix(got, "GET /one") {
		t.Fatalf("origin saw %s first", got)
	}
	select {
	case got := <-seen:
		t.Fatalf("origin also served %s", got)
	default:
	}
}

// TestExpectContinue: a client that waits for 100 Continue gets it, then
// its body reaches the origin.
func TestExpectContinue(t *testing.T) {
	origin, seen := originEcho(t)
	proxy, _ := startProxy(t, &Server{})
	c := dial(t, proxy)
	if _, err := io.WriteString(c, "PUT http://"+origin+"/up HTTP/1.1\r\nHost: "+origin+"\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusContinue {
		t.Fatalf("first reply %v, %v; want 100 Continue before the body", resp, err)
	}
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	resp, err = http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("final reply %v, %v; want 200", resp, err)
	}
	if got := <-seen; got != `PUT /up x="" body="hello"` {
		t.Fatalf("origin saw %s", got)
	}
}

// TestHeaderTimeout: a client that trickles its header (slowloris) is cut
// at the header timeout with 408, one that sends nothing is closed, and
// other clients are served meanwhile.
func TestHeaderTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	echo := testutil.ServeLoopback(t, testutil.Echo)
	proxy, results := startProxy(t, &Server{HandshakeTimeout: timeout})

	slow := dial(t, proxy)
	silent := dial(t, proxy)
	if _, err := io.WriteString(slow, "CONNECT "+echo+" HTTP/1.1\r\nHost: "); err != nil {
		t.Fatal(err)
	}
	// Another client is served while both hold their connections.
	fast := dial(t, proxy)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	if _, err := httpconnect.Handshake(ctx, fast, echo, nil); err != nil {
		t.Fatalf("client beside the slow ones: %v", err)
	}
	fast.Close()

	resp, err := http.ReadResponse(bufio.NewReader(slow), nil)
	if err != nil || resp.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("slow client got %v, %v; want 408", resp, err)
	}
	if n, err := silent.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("silent client read %d, %v; want the close without a reply", n, err)
	}
	timeouts := 0
	for range 3 {
		if r := nextResult(t, results); r.Refused == RefusedHeaderTimeout {
			timeouts++
		}
	}
	if timeouts != 2 {
		t.Fatalf("%d header timeouts counted, want 2", timeouts)
	}
}

// TestHeaderTimeoutMidLine: a header cut short by the header timeout is a
// timeout (408, counted as one) wherever the cut falls, including inside a
// line net/http would call malformed if it were complete.
func TestHeaderTimeoutMidLine(t *testing.T) {
	const timeout = 300 * time.Millisecond
	proxy, results := startProxy(t, &Server{HandshakeTimeout: timeout})
	for _, sent := range []string{
		"CONNECT 127.0.0.1:9",                           // inside the request line
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost",          // inside a field name
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-Slow: aaaa",  // inside a value
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nX-Slow: a\r\n", // between lines
	} {
		t.Run(sent, func(t *testing.T) {
			c := dial(t, proxy)
			if _, err := io.WriteString(c, sent); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil || resp.StatusCode != http.StatusRequestTimeout {
				t.Fatalf("header cut after %q: %v, %v; want 408", sent, resp, err)
			}
			if r := nextResult(t, results); r.Refused != RefusedHeaderTimeout {
				t.Fatalf("header cut after %q counted as %q (%v), want %q", sent, r.Refused, r.Err, RefusedHeaderTimeout)
			}
		})
	}
}

// TestMaxClients: a client over the cap gets 503 at once and is counted;
// once a slot is free the next client is served.
func TestMaxClients(t *testing.T) {
	echo := testutil.ServeLoopback(t, testutil.Echo)
	proxy, results := startProxy(t, &Server{MaxClients: 1})
	holder := dial(t, proxy)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	if _, err := httpconnect.Handshake(ctx, holder, echo, nil); err != nil {
		t.Fatalf("first client: %v", err)
	}
	resp, _, _ := rawExchange(t, proxy, "CONNECT "+echo+" HTTP/1.1\r\nHost: "+echo+"\r\n\r\n")
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("second client got %d, want 503", resp.StatusCode)
	}
	if r := nextResult(t, results); r.Refused != RefusedBusy || r.Status != http.StatusServiceUnavailable {
		t.Fatalf("result = %+v, want a 503 counted as busy", r)
	}
	holder.Close()
	nextResult(t, results) // the first client's tunnel ended
	if _, err := httpconnect.Handshake(ctx, dial(t, proxy), echo, nil); err != nil {
		t.Fatalf("client after the slot freed: %v", err)
	}
}

// TestLoopDetected: a CONNECT or an absolute-URI request to one of
// ebpfwd's own listeners is answered 508 and counted, by IP literal before
// any dial and by name once the dial shows where it went.
func TestLoopDetected(t *testing.T) {
	own := testutil.ServeLoopback(t, testutil.Echo) // stands for another service's listener
	ownAP := netip.MustParseAddrPort(own)
	self := func(ap netip.AddrPort) bool { return ap == ownAP }
	port := fmt.Sprint(ownAP.Port())
	tests := []struct {
		name, request string
		dialed        bool
	}{
		{"CONNECT to an own listener", "CONNECT " + own + " HTTP/1.1\r\nHost: " + own + "\r\n\r\n", false},
		{"absolute URI to an own listener", "GET http://" + own + "/ HTTP/1.1\r\nHost: " + own + "\r\n\r\n", false},
		{"CONNECT by a name that resolves to one", "CONNECT localhost:" + port + " HTTP/1.1\r\nHost: localhost:" + port + "\r\n\r\n", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dialed := false
			srv := &Server{Self: self, Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				dialed = true
				// localhost may be ::1 first; the listener is 127.0.0.1.
				host, p, _ := net.SplitHostPort(addr)
				if host == "localhost" {
					addr = net.JoinHostPort("127.0.0.1", p)
				}
				var d net.Dialer
				return d.DialContext(ctx, network, addr)
			}}
			proxy, results := startProxy(t, srv)
			resp, _, _ := rawExchange(t, proxy, tt.request)
			if resp.StatusCode != http.StatusLoopDetected {
				t.Fatalf("status = %d, want 508", resp.StatusCode)
			}
			r := nextResult(t, results)
			if r.Refused != RefusedLoop || !errors.Is(r.Err, ErrLoop) {
				t.Fatalf("result = %+v, want a loop refusal", r)
			}
			if dialed != tt.dialed {
				t.Fatalf("dialed = %v, want %v", dialed, tt.dialed)
			}
		})
	}
	// Any other target is not a loop.
	proxy, _ := startProxy(t, &Server{Self: self})
	c := dial(t, proxy)
	other := testutil.ServeLoopback(t, testutil.Echo)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	if _, err := httpconnect.Handshake(ctx, c, other, nil); err != nil {
		t.Fatalf("CONNECT to another address: %v", err)
	}
}

// nxdomainServer runs a loopback nameserver that answers NXDOMAIN and
// returns its address.
func nxdomainServer(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	testutil.ServeNXDOMAIN(pc)
	return pc.LocalAddr().String()
}

// TestUnresolvableTargetIs502: a name the resolver says does not exist is
// answered 502 as soon as it says so, not 504 at the dial timeout.
func TestUnresolvableTargetIs502(t *testing.T) {
	dns := nxdomainServer(t)
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, dns)
	}}
	// The dial timeout is the test's deadline: a 504 would mean the
	// resolver's answer was not taken.
	srv := &Server{DialTimeout: testTimeout / 2, Dial: (&net.Dialer{Resolver: resolver}).DialContext}
	proxy, results := startProxy(t, srv)
	for _, request := range []string{
		"GET http://no-such-host.test/ HTTP/1.1\r\nHost: no-such-host.test\r\n\r\n",
		"CONNECT no-such-host.test:443 HTTP/1.1\r\nHost: no-such-host.test:443\r\n\r\n",
	} {
		resp, _, _ := rawExchange(t, proxy, request)
		if resp.StatusCode != http.StatusBadGateway {
			t.Fatalf("%q: status = %d, want 502", request, resp.StatusCode)
		}
		var dnsErr *net.DNSError
		if r := nextResult(t, results); !errors.As(r.Err, &dnsErr) || !dnsErr.IsNotFound || r.Refused != "" {
			t.Fatalf("result = %+v, want a not-found DNS error", r)
		}
	}
}

// TestCredentialsNotLogged: neither a client's credentials (right, wrong or
// malformed) nor userinfo in a request URI appear in the handler's log.
func TestCredentialsNotLogged(t *testing.T) {
	const user, pass = "alice-user", "hunter2-pass"
	encoded := strings.TrimPrefix(httpconnect.BasicAuth(user, pass), "Basic ")
	var logs syncbuf.Buffer
	srv := &Server{
		Auth:   &httpconnect.Auth{Username: "alice-user", Password: "other"},
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	proxy, results := startProxy(t, srv)
	for _, request := range []string{
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: Basic " + encoded + "\r\n\r\n",
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization Basic " + encoded + "\r\n\r\n",
		"GET https://" + user + ":" + pass + "@127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
	} {
		rawExchange(t, proxy, request)
		nextResult(t, results)
	}
	for _, secret := range []string{user, pass, encoded} {
		if strings.Contains(logs.String(), secret) {
			t.Fatalf("log shows %q:\n%s", secret, logs.String())
		}
	}
	if n := strings.Count(logs.String(), "http proxy request failed"); n != 3 {
		t.Fatalf("%d failures logged, want 3:\n%s", n, logs.String())
	}
}

// FuzzServeRequest feeds arbitrary bytes to the handler as a client's
// request. Whatever they are, the handler must answer within its bounds
// with a well-formed status line (or close without one), never panic,
// and never dial for a request it refused.
func FuzzServeRequest(f *testing.F) {
	for _, tt := range hostileRequests {
		f.Add([]byte(tt.request))
	}
	for _, seed := range []string{
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
		"GET http://127.0.0.1:9/ HTTP/1.1\nHost: 127.0.0.1:9\n\n",
		"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nX: a\r\n b\r\n\r\n",
		"PUT http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
		"GET http://127.0.0.1:9/a HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\nGET http://127.0.0.1:9/b HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
		"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
		"CONNECT [::1]:9 HTTP/1.1\r\n\r\n",
		"GET http://u:p@127.0.0.1:9/ HTTP/1.0\r\n\r\n",
		"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(serveFuzzInput)
}

// serveFuzzInput is FuzzServeRequest's body.
func serveFuzzInput(t *testing.T, request []byte) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	client, server := net.Pipe()
	defer client.Close()
	// Every dial "succeeds" into a target that answers nothing and
	// closes, so accepted requests end quickly too.
	var dialed atomic.Bool
	dialFn := func(context.Context, string, string) (net.Conn, error) {
		dialed.Store(true)
		a, b := net.Pipe()
		b.Close()
		return a, nil
	}
	results := make(chan Result, 1)
	srv := &Server{
		Dial: dialFn, Logger: quiet, HandshakeTimeout: 200 * time.Millisecond, ReplyTimeout: 200 * time.Millisecond,
		Auth:     &httpconnect.Auth{Username: "u", Password: "p"},
		Self:     func(ap netip.AddrPort) bool { return ap.Port() == 7 },
		OnResult: func(r Result) { results <- r },
	}
	go srv.ServeConn(context.Background(), server)
	_ = client.SetDeadline(time.Now().Add(5 * time.Second))
	go func() {
		_, _ = client.Write(request)
	}()
	reply, _ := io.ReadAll(client)
	var r Result
	select {
	case r = <-results:
	case <-time.After(5 * time.Second):
		t.Fatalf("no result for %q", request)
	}
	if r.Sent && r.Status != http.StatusOK {
		if !strings.Contains(string(reply), fmt.Sprintf("HTTP/1.1 %d ", r.Status)) {
			t.Fatalf("result %d sent, but the client read %q", r.Status, reply)
		}
	}
	if r.Status >= 400 && r.Status < 500 && r.Refused == "" {
		t.Fatalf("status %d without a counted refusal: %+v", r.Status, r)
	}
	// A loop by name is seen once dialed; every other refusal comes first.
	if dialed.Load() && r.Refused != "" && r.Refused != RefusedLoop {
		t.Fatalf("dialed for a request refused as %s: %q", r.Refused, request)
	}
}
