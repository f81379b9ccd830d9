package test

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

// hostileTimeout bounds every exchange of these tests (a deadline, not a
// measurement).
const hostileTimeout = 10 * time.Second

// TestHTTPProxyHostileClients runs an http proxy service beside a tcp
// service in one namespace and checks, against the real daemon: a slowloris
// client is cut at the header timeout (408) while another client is served;
// a CONNECT to the daemon's own listeners (the tcp service, the proxy
// itself) is answered 508 without reaching them; a name that does not
// resolve is a 502 at once; and the proxy credentials appear neither in the
// daemon's log nor in `ebpfwd conns`.
func TestHTTPProxyHostileClients(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-hostile-c")
	e2e.EchoIn(t, c, "127.0.0.1:9000")
	// The namespace's resolver: every name is NXDOMAIN.
	dns, err := e2e.Handle(t, c).ListenPacket(context.Background(), "udp", "127.0.0.1:53")
	if err != nil {
		t.Fatalf("listen dns in %s: %v", c.Name, err)
	}
	t.Cleanup(func() { dns.Close() })
	testutil.ServeNXDOMAIN(dns)
	testutil.WriteNSEtc(t, c.Name, "resolv.conf", "nameserver 127.0.0.1\n")

	const user, pass = "hostile-user", "hostile-secret-pw"
	yaml := e2e.Config(`services:
- name: proxy
  addr: 127.0.0.1:8080
  handler:
    type: http
    auth: {username: $USER, password: $PASS}
    metadata: {headerTimeout: 1s}
  listener: {type: tcp}
  metadata: {netns: $C, netns.out: $C}
- name: fwd
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: echo, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $C, datapath: userspace}
`, map[string]string{"C": c.Name, "USER": user, "PASS": pass})
	d := e2e.Start(t, "hostile", yaml, e2e.Options{})
	auth := &httpconnect.Auth{Username: user, Password: pass}

	ctx, cancel := context.WithTimeout(context.Background(), 3*hostileTimeout)
	defer cancel()
	dialProxy := func(t *testing.T) *bufio.ReadWriter {
		t.Helper()
		conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8080")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		_ = conn.SetDeadline(time.Now().Add(hostileTimeout))
		return bufio.NewReadWriter(bufio.NewReader(conn), bufio.NewWriter(conn))
	}
	request := func(t *testing.T, rw *bufio.ReadWriter, req string) *http.Response {
		t.Helper()
		if _, err := rw.WriteString(req); err != nil {
			t.Fatal(err)
		}
		if err := rw.Flush(); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(rw.Reader, &http.Request{Method: strings.Fields(req)[0]})
		if err != nil {
			t.Fatalf("response to %q: %v", req, err)
		}
		return resp
	}
	authHeader := "Proxy-Authorization: " + httpconnect.BasicAuth(user, pass) + "\r\n"

	t.Run("slowloris is cut while another client is served", func(t *testing.T) {
		slow := dialProxy(t)
		if _, err := slow.WriteString("CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: "); err != nil {
			t.Fatal(err)
		}
		if err := slow.Flush(); err != nil {
			t.Fatal(err)
		}
		conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8080")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(hostileTimeout))
		tunnel, err := httpconnect.Handshake(ctx, conn, "127.0.0.1:9000", auth)
		if err != nil {
			t.Fatalf("client beside the slowloris: %v", err)
		}
		if _, err := io.WriteString(tunnel, "ping"); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, 4)
		if _, err := io.ReadFull(tunnel, got); err != nil || string(got) != "ping" {
			t.Fatalf("echo through the tunnel: %q, %v", got, err)
		}
		resp, err := http.ReadResponse(slow.Reader, nil)
		if err != nil || resp.StatusCode != http.StatusRequestTimeout {
			t.Fatalf("slowloris got %v, %v; want 408", resp, err)
		}
	})

	t.Run("CONNECT to the daemon's own listeners is 508", func(t *testing.T) {
		for _, target := range []string{"127.0.0.1:8000", "127.0.0.1:8080", "localhost:8000"} {
			rw := dialProxy(t)
			resp := request(t, rw, "CONNECT "+target+" HTTP/1.1\r\nHost: "+target+"\r\n"+authHeader+"\r\n")
			if resp.StatusCode != http.StatusLoopDetected {
				t.Fatalf("CONNECT %s: %d, want 508", target, resp.StatusCode)
			}
		}
		rw := dialProxy(t)
		resp := request(t, rw, "GET http://127.0.0.1:8000/ HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"+authHeader+"\r\n")
		if resp.StatusCode != http.StatusLoopDetected {
			t.Fatalf("GET to the tcp service: %d, want 508", resp.StatusCode)
		}
		d.WaitLog(t, hostileTimeout, "http proxy request failed", "status=508")
	})

	t.Run("unresolvable name is 502", func(t *testing.T) {
		for _, req := range []string{
			"GET http://no-such-host.test/ HTTP/1.1\r\nHost: no-such-host.test\r\n" + authHeader + "\r\n",
			"CONNECT no-such-host.test:443 HTTP/1.1\r\nHost: no-such-host.test:443\r\n" + authHeader + "\r\n",
		} {
			// The proxy's dial timeout (5s) is beyond this deadline: a
			// resolver wait would show as a timeout here, not a 502.
			rw := dialProxy(t)
			resp := request(t, rw, req)
			if resp.StatusCode != http.StatusBadGateway {
				t.Fatalf("%q: %d, want 502", req, resp.StatusCode)
			}
		}
	})

	t.Run("credentials stay out of the log and conns", func(t *testing.T) {
		rw := dialProxy(t)
		resp := request(t, rw, "CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"+authHeader+"\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("CONNECT: %d, want 200", resp.StatusCode)
		}
		// A wrong password and a malformed credential line, logged as
		// failures.
		for _, bad := range []string{
			"Proxy-Authorization: " + httpconnect.BasicAuth(user, pass+"x") + "\r\n",
			"Proxy-Authorization " + httpconnect.BasicAuth(user, pass) + "\r\n",
		} {
			request(t, dialProxy(t), "CONNECT 127.0.0.1:9000 HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n"+bad+"\r\n")
		}
		out, err := exec.CommandContext(ctx, e2e.Bin, "conns", "--instance", d.Instance).CombinedOutput()
		if err != nil {
			t.Fatalf("ebpfwd conns: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), "proxy") {
			t.Fatalf("conns does not list the open tunnel:\n%s", out)
		}
		d.WaitLog(t, hostileTimeout, "http proxy request failed", "status=400")
		encoded := strings.TrimPrefix(httpconnect.BasicAuth(user, pass), "Basic ")
		for _, secret := range []string{pass, encoded} {
			if strings.Contains(string(out), secret) {
				t.Errorf("ebpfwd conns shows %q:\n%s", secret, out)
			}
			if strings.Contains(d.Output.String(), secret) {
				t.Errorf("the daemon's log shows %q:\n%s", secret, d.Output)
			}
		}
	})
}
