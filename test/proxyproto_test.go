package test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// nginxAddr is where nginx listens, inside its own namespace.
const nginxAddr = "127.0.0.1:8080"

// startNginx runs Debian's nginx in ns with `listen ... proxy_protocol` at
// nginxAddr, logging $proxy_protocol_addr:$proxy_protocol_port of every
// request, and returns the access log's path. It stops in t's cleanup.
func startNginx(t *testing.T, ns *topo.NS) string {
	t.Helper()
	bin, err := exec.LookPath("nginx")
	if err != nil {
		t.Fatalf("nginx is needed for this test (apt-get install nginx; .ci/run installs it): %v", err)
	}
	dir := t.TempDir()
	access := filepath.Join(dir, "access.log")
	conf := fmt.Sprintf(`daemon off;
master_process off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log info;
events {}
http {
  log_format pp 'pp=$proxy_protocol_addr:$proxy_protocol_port peer=$remote_addr "$request"';
  access_log %[2]s pp;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  server {
    listen %[3]s proxy_protocol;
    location / { return 200 "nginx ok\n"; }
  }
}
`, dir, access, nginxAddr)
	confPath := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	cmd := exec.Command("nsenter", "--net="+ns.Path(), bin, "-e", filepath.Join(dir, "error.log"), "-p", dir, "-c", confPath)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("start nginx: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			errLog, _ := os.ReadFile(filepath.Join(dir, "error.log"))
			t.Logf("nginx output:\n%s\nerror.log:\n%s", &out, errLog)
		}
	})
	// Ready when it accepts (the connection sends nothing: nginx logs a
	// broken header and closes it).
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		c, err := e2e.DialFrom(ctx, t, ns, "tcp", nginxAddr)
		if err == nil {
			c.Close()
			return access
		}
		select {
		case <-exited:
			t.Fatalf("nginx exited: %s", &out)
		case <-ctx.Done():
			t.Fatalf("nginx did not listen on %s: %v", nginxAddr, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// get sends an HTTP request on c (after prefix, a PROXY header the client
// itself sends) and returns the response.
func get(t *testing.T, c net.Conn, prefix, path string) string {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, prefix+"GET "+path+" HTTP/1.0\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read response to %s: %v", path, err)
	}
	return string(resp)
}

// waitLine waits (bounded) until the file has a line matching re.
func waitLine(t *testing.T, path string, re *regexp.Regexp) {
	t.Helper()
	var data []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		data, _ = os.ReadFile(path)
		if re.Match(data) {
			return
		}
	}
	t.Fatalf("%s has no line matching %s:\n%s", path, re, data)
}

// TestProxyProtocolToNginx: nginx with `listen ... proxy_protocol` behind
// ebpfwd sees the real client in $proxy_protocol_addr: the one ebpfwd
// accepted from (handler proxyProtocol 1 and 2), and the one a client's
// own PROXY header named to a proxyProtocol service, passed on.
func TestProxyProtocolToNginx(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-ppn-c")
	svc := testutil.NewNS(t, "e2e-ppn-s")
	backend := testutil.NewNS(t, "e2e-ppn-n")
	testutil.Veth(t, client, "ppc0", "10.77.0.2/24", svc, "pps0", "10.77.0.1/24")
	access := startNginx(t, backend)
	yaml := e2e.Config(`services:
- name: send-v1
  addr: 10.77.0.1:8001
  handler: {type: tcp, metadata: {proxyProtocol: 1}}
  forwarder: {nodes: [{name: nginx, addr: "$NGINX"}]}
  metadata: {netns: $S, netns.out: $N}
- name: send-v2
  addr: 10.77.0.1:8002
  handler: {type: tcp, metadata: {proxyProtocol: 2}}
  forwarder: {nodes: [{name: nginx, addr: "$NGINX"}]}
  metadata: {netns: $S, netns.out: $N}
- name: pass-on
  addr: 10.77.0.1:8003
  handler: {type: tcp, metadata: {proxyProtocol: 2}}
  forwarder: {nodes: [{name: nginx, addr: "$NGINX"}]}
  metadata: {netns: $S, netns.out: $N, proxyProtocol: 1}
`, map[string]string{"S": svc.Name, "N": backend.Name, "NGINX": nginxAddr})
	e2e.Start(t, "ppnginx", yaml, e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, port := range []string{"8001", "8002"} {
		c, err := e2e.DialFrom(ctx, t, client, "tcp", "10.77.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		local := c.LocalAddr().String() // 10.77.0.2:PORT, as nginx must see it
		path := "/direct-" + port
		if resp := get(t, c, "", path); !strings.Contains(resp, " 200 ") || !strings.Contains(resp, "nginx ok") {
			t.Fatalf("GET %s through ebpfwd: %q", path, resp)
		}
		c.Close()
		waitLine(t, access, regexp.MustCompile(`(?m)^pp=`+regexp.QuoteMeta(local)+` peer=127\.0\.0\.1 "GET `+path+` `))
	}

	c, err := e2e.DialFrom(ctx, t, client, "tcp", "10.77.0.1:8003")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if resp := get(t, c, "PROXY TCP4 203.0.113.9 10.77.0.1 40000 8003\r\n", "/passed-on"); !strings.Contains(resp, " 200 ") {
		t.Fatalf("GET through a proxyProtocol service: %q", resp)
	}
	waitLine(t, access, regexp.MustCompile(`(?m)^pp=203\.0\.113\.9:40000 peer=127\.0\.0\.1 "GET /passed-on `))
}

// TestProxyProtocolClientInConns: a client that opens with a PROXY header
// to a proxyProtocol service is listed by `ebpfwd conns` at the address the
// header names, and its bytes reach the node without the header; a client
// that sends no header is closed and counted.
func TestProxyProtocolClientInConns(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-ppc-c")
	target := testutil.NewNS(t, "e2e-ppc-t")
	e2e.EchoIn(t, target, "127.0.0.1:9000")
	yaml := e2e.Config(`services:
- name: pp-svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  forwarder: {nodes: [{name: target-0, addr: "127.0.0.1:9000"}]}
  metadata: {netns: $C, netns.out: $T, proxyProtocol: 2}
`, map[string]string{"C": c.Name, "T": target.Name})
	d := e2e.Start(t, "ppconns", yaml, e2e.Options{})

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, header := range []string{
		"PROXY TCP4 198.51.100.7 127.0.0.1 41000 8000\r\n",
		// version 2, TCP over IPv6: fd00::7 port 41001 to fd00::1 port 8000
		"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" +
			"\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x07" +
			"\xfd\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01" +
			"\xa0\x29\x1f\x40",
	} {
		want := "198.51.100.7:41000"
		if strings.HasPrefix(header, "\r") {
			want = "[fd00::7]:41001"
		}
		conn, err := e2e.DialFrom(ctx, t, c, "tcp", "127.0.0.1:8000")
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		// The header and the first bytes in one write: what follows the
		// header in the same segment must reach the node too.
		if _, err := io.WriteString(conn, header+"hello"); err != nil {
			t.Fatal(err)
		}
		// The echo server answers with the bytes it got: not a byte of the
		// header may be among them.
		echo := make([]byte, 5)
		if _, err := io.ReadFull(conn, echo); err != nil || string(echo) != "hello" {
			t.Fatalf("echo through the service: %q, %v", echo, err)
		}
		re := regexp.MustCompile(`(?m)^pp-svc\s+userspace\s+tcp\s+` + regexp.QuoteMeta(want) + `\s+target-0\s`)
		var out string
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			b, err := exec.CommandContext(ctx, e2e.Bin, "conns", "--instance", d.Instance).CombinedOutput()
			if err != nil {
				t.Fatalf("ebpfwd conns: %v\n%s", err, b)
			}
			if out = string(b); re.MatchString(out) {
				break
			}
		}
		if !re.MatchString(out) {
			t.Fatalf("conns does not list the client at %s:\n%s", want, out)
		}
	}

	// No header: closed before any byte reaches the node, and said why.
	e2e.ExpectClosedNoData(t, c, "127.0.0.1:8000")
	d.WaitLog(t, 10*time.Second, "no valid PROXY protocol header", "proxy_header_missing")
}

// TestPlanSaysWhyTCCannot: `ebpfwd plan` puts a proxyProtocol service and a
// udp service with one-reply sessions (GOST's default) on the relay and
// says why tc does not apply; asking for tc for such a service is refused.
func TestPlanSaysWhyTCCannot(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	a := testutil.NewNS(t, "e2e-ppp-a")
	b := testutil.NewNS(t, "e2e-ppp-b")
	testutil.Veth(t, a, "pppa0", "10.78.0.1/24", b, "pppb0", "10.78.0.2/24")
	dir := t.TempDir()
	plan := func(name, body string) (string, error) {
		path := filepath.Join(dir, name+".yaml")
		yaml := e2e.Config(body, map[string]string{"A": a.Name})
		if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(e2e.Bin, "plan", path).CombinedOutput()
		return string(out), err
	}
	out, err := plan("auto", `services:
- name: pp
  addr: 10.78.0.1:8000
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.78.0.2:9000"}]}
  metadata: {netns: $A, netns.out: $A, proxyProtocol: 1}
- name: send-pp
  addr: 10.78.0.1:8001
  handler: {type: tcp, metadata: {proxyProtocol: 2}}
  forwarder: {nodes: [{addr: "10.78.0.2:9000"}]}
  metadata: {netns: $A, netns.out: $A}
- name: one-reply
  addr: 10.78.0.1:8002
  handler: {type: udp}
  forwarder: {nodes: [{addr: "10.78.0.2:9000"}]}
  metadata: {netns: $A, netns.out: $A}
`)
	if err != nil {
		t.Fatalf("ebpfwd plan: %v\n%s", err, out)
	}
	for _, want := range []string{
		"pp\tuserspace\ttc does not apply: the service reads a PROXY protocol header",
		"send-pp\tuserspace\ttc does not apply: the nodes get a PROXY protocol header",
		"one-reply\tuserspace\ttc does not apply: udp sessions end with their first reply",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("plan lacks %q:\n%s", want, out)
		}
	}
	out, err = plan("tc", `services:
- name: pp
  addr: 10.78.0.1:8000
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.78.0.2:9000"}]}
  metadata: {netns: $A, netns.out: $A, proxyProtocol: 2, datapath: tc}
`)
	if err == nil || !strings.Contains(out, "services[0].metadata.datapath: datapath tc cannot carry this service: the service reads a PROXY protocol header") {
		t.Fatalf("datapath: tc with proxyProtocol: %v\n%s", err, out)
	}
}
