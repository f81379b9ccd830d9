package test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"gopkg.in/yaml.v3"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/userspace/httpconnect"
)

const (
	prometheusBin = "/usr/bin/prometheus"
	promtoolBin   = "/usr/bin/promtool"
	// dashboardFile is relative to this package's directory, where go test
	// runs.
	dashboardFile   = "../deploy/grafana/ebpfwd.json"
	provisioningDir = "../deploy/grafana/provisioning"
	metricsUser     = "scraper"
	metricsPassword = "s3cret-scrape"
	proxyUser       = "hopuser"
	proxyPassword   = "hoppass"
	prometheusReady = 30 * time.Second
	prometheusStop  = 10 * time.Second
	scrapeCatchUp   = 20 * time.Second
	httpTimeout     = 5 * time.Second
	trafficTimeout  = 30 * time.Second
	settleTimeout   = 10 * time.Second
)

// metricsTopology exercises every metric the userspace datapath has:
//   - tcp-svc: two nodes, node-dead first (fifo) with nothing listening, so
//     the first connection fails over and node-dead is marked down;
//   - udp-svc: a UDP session (flow table, dropped datagrams);
//   - proxy: an authenticating HTTP proxy, the hop of chain-1 (dial kind
//     "target");
//   - chain-svc: a tcp service whose node is reached through chain-1 (dial
//     kinds "node" and "hop", hop node state).
//
// Clients and services live in $C, targets in $T; the daemon itself, and
// with it the metrics endpoint, stays in the test's own namespace, where
// Prometheus runs too.
const metricsTopology = `services:
- name: tcp-svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    selector: {strategy: fifo, maxFails: 1, failTimeout: 1h}
    nodes:
    - {name: node-dead, addr: "127.0.0.1:9001"}
    - {name: node-live, addr: "127.0.0.1:9000"}
  metadata: {netns: $C, netns.out: $T}
- name: udp-svc
  addr: 127.0.0.1:8053
  handler: {type: udp}
  # The session must outlive the test (default ttl: 5s) so the flow table
  # has a known entry count when it is checked.
  listener: {type: udp, metadata: {ttl: 10m, keepAlive: true}}
  forwarder:
    nodes:
    - {name: udp-target, addr: "127.0.0.1:9053"}
  metadata: {netns: $C, netns.out: $T}
- name: proxy
  addr: 127.0.0.1:8080
  handler:
    type: http
    auth: {username: $PUSER, password: $PPASS}
  listener: {type: tcp}
  metadata: {netns: $C, netns.out: $T}
- name: chain-svc
  addr: 127.0.0.1:8001
  handler: {type: tcp, chain: chain-1}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: chained-target, addr: "127.0.0.1:9000"}
  metadata: {netns: $C}
- name: tc-svc
  addr: "10.33.1.1:8100"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: tc-target, addr: "10.33.2.2:9100"}
  metadata: {netns: $G, netns.out: $G, datapath: tc}
chains:
- name: chain-1
  hops:
  - name: hop-0
    metadata: {netns: $C}
    nodes:
    - name: proxy
      addr: 127.0.0.1:8080
      connector: {type: http, auth: {username: $PUSER, password: $PPASS}}
      dialer: {type: tcp}
metrics:
  addr: "$MADDR"
  path: /metrics
  auth: {username: $MUSER, password: $MPASS}
`

// TestDashboardQueriesHaveData is the proof that the shipped Grafana
// dashboard works: real traffic crosses every kind of service, Debian's
// prometheus scrapes the daemon, and every panel query must return series
// with real numbers. The counters must also match the bytes sent exactly.
func TestDashboardQueriesHaveData(t *testing.T) {
	testutil.RequireRoot(t)
	for _, bin := range []string{prometheusBin, promtoolBin} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("%s is missing (apt-get install prometheus; .ci/run installs it): %v", bin, err)
		}
	}
	t.Parallel()
	dash := loadDashboard(t)

	c := testutil.NewNS(t, "e2e-metrics-c")
	tg := testutil.NewNS(t, "e2e-metrics-t")
	e2e.EchoIn(t, tg, "127.0.0.1:9000")
	e2e.UDPEchoIn(t, tg, "127.0.0.1:9053")
	// tc-svc is a gateway on the tc datapath: client namespace -> $G -> the
	// target namespace, over veths (its packets must cross interfaces).
	tcClient := testutil.NewNS(t, "e2e-metrics-tcc")
	gw := testutil.NewNS(t, "e2e-metrics-g")
	testutil.Veth(t, tcClient, "m0", "10.33.1.2/24", gw, "mg0", "10.33.1.1/24")
	testutil.Veth(t, gw, "mg1", "10.33.2.1/24", tg, "mt0", "10.33.2.2/24")
	e2e.EchoIn(t, tg, "10.33.2.2:9100")
	metricsAddr := testutil.FreeLoopbackAddr(t)
	e2e.Start(t, "metrics", e2e.Config(metricsTopology, map[string]string{
		"C": c.Name, "T": tg.Name, "G": gw.Name, "MADDR": metricsAddr,
		"MUSER": metricsUser, "MPASS": metricsPassword,
		"PUSER": proxyUser, "PPASS": proxyPassword,
	}), e2e.Options{})
	endpoint := "http://" + metricsAddr + "/metrics"
	checkAuthRequired(t, endpoint)

	prom := startPrometheus(t, metricsAddr)
	prom.waitTargetUp(t, prometheusReady)

	// Traffic goes after Prometheus is up, in two rounds: series such as
	// errors_total and the dial histogram only exist after their first
	// event, and rate() counts nothing until a series has two samples. The
	// second round makes every rate on the dashboard non-zero, as it would
	// be on a gateway in service.
	udpConn := dialUDP(t, c, "127.0.0.1:8053")
	var sent trafficTotals
	sent.add(trafficRound(t, c, tcClient, udpConn))
	prom.waitEverySeriesScraped(t, metricsAddr, 2)
	sent.add(trafficRound(t, c, tcClient, udpConn))

	want := []expectedSeries{
		{`ebpfwd_bytes_total{service="tcp-svc",direction="up"}`, sent.tcpUp, sent.tcpUp},
		{`ebpfwd_bytes_total{service="tcp-svc",direction="down"}`, sent.tcpDown, sent.tcpDown},
		{`ebpfwd_connections_opened_total{service="tcp-svc"}`, sent.tcpConns, sent.tcpConns},
		{`ebpfwd_connections_active{service="tcp-svc"}`, 0, 0},
		{`ebpfwd_bytes_total{service="chain-svc",direction="up"}`, sent.chainUp, sent.chainUp},
		{`ebpfwd_bytes_total{service="chain-svc",direction="down"}`, sent.chainDown, sent.chainDown},
		{`ebpfwd_connections_opened_total{service="chain-svc"}`, sent.chainConns, sent.chainConns},
		{`ebpfwd_connections_active{service="chain-svc"}`, 0, 0},
		// The HTTP proxy counts only the tunnelled bytes, after CONNECT, so
		// it moved exactly what chain-svc did; CONNECTs to the dead target
		// never open a connection.
		{`ebpfwd_bytes_total{service="proxy",direction="up"}`, sent.chainUp, sent.chainUp},
		{`ebpfwd_bytes_total{service="proxy",direction="down"}`, sent.chainDown, sent.chainDown},
		{`ebpfwd_connections_opened_total{service="proxy"}`, sent.chainConns, sent.chainConns},
		{`ebpfwd_errors_total{service="proxy",reason="dial_refused"}`, sent.proxyRefused, sent.proxyRefused},
		// A datagram resent after a lost reply may or may not have reached
		// the daemon, so UDP is exact only up to the resends.
		{`ebpfwd_bytes_total{service="udp-svc",direction="up"}`, sent.udp.distinct, sent.udp.written},
		{`ebpfwd_bytes_total{service="udp-svc",direction="down"}`, sent.udp.distinct, sent.udp.written},
		{`ebpfwd_connections_opened_total{service="udp-svc"}`, 1, 1},
		{`ebpfwd_flow_table_entries{service="udp-svc",table="udp_sessions"}`, 1, 1},
		{`ebpfwd_dropped_datagrams_total{service="udp-svc"}`, 0, 0},
		// node-dead fails once, then stays marked dead for failTimeout (1h).
		{`ebpfwd_node_up{service="tcp-svc",node="node-dead"}`, 0, 0},
		{`ebpfwd_node_up{service="tcp-svc",node="node-live"}`, 1, 1},
		{`ebpfwd_errors_total{service="tcp-svc",reason="dial_refused"}`, 1, 1},
		{`ebpfwd_hop_node_up{chain="chain-1",hop="hop-0",node="proxy"}`, 1, 1},
		{`ebpfwd_dial_duration_seconds_count{service="tcp-svc",kind="node",name="node-live",result="ok"}`, sent.tcpConns, sent.tcpConns},
		{`ebpfwd_dial_duration_seconds_count{service="tcp-svc",kind="node",name="node-dead",result="error"}`, 1, 1},
		{`ebpfwd_dial_duration_seconds_count{service="chain-svc",kind="hop",result="ok"}`, sent.chainConns, sent.chainConns},
		{`ebpfwd_dial_duration_seconds_count{service="proxy",kind="target",result="error"}`, sent.proxyRefused, sent.proxyRefused},
		{`ebpfwd_datapath_fallback{service="tcp-svc",from="tc",to="userspace"}`, 1, 1},
		{`ebpfwd_datapath_fallback{service="udp-svc",from="tc",to="userspace"}`, 1, 1},
		// tc counts the TCP payload of every packet it translates: exact
		// unless TCP retransmits (a loaded machine), which adds what was
		// sent again. Tolerance: 5% plus 64 KiB.
		{`ebpfwd_bytes_total{service="tc-svc",datapath="tc",direction="up"}`, sent.tcUp, retransmitTolerance(sent.tcUp)},
		{`ebpfwd_bytes_total{service="tc-svc",datapath="tc",direction="down"}`, sent.tcDown, retransmitTolerance(sent.tcDown)},
		{`ebpfwd_connections_opened_total{service="tc-svc",datapath="tc"}`, sent.tcConns, sent.tcConns},
		// At least a SYN, the data and a FIN per flow and direction.
		{`ebpfwd_packets_total{service="tc-svc",direction="up"}`, 3 * sent.tcConns, math.MaxFloat64},
		{`ebpfwd_packets_total{service="tc-svc",direction="down"}`, 3 * sent.tcConns, math.MaxFloat64},
		// Closed flows stay in conntrack for the closing timeout.
		{`ebpfwd_flow_table_entries{service="tc-svc",table="conntrack"}`, 0, sent.tcConns},
		{`ebpfwd_flow_table_capacity{service="tc-svc",table="conntrack"}`, 262144, 262144},
		// Its node answered every flow: a series per reason, at 0.
		{`ebpfwd_node_passive_failures_total{service="tc-svc",node="tc-target",reason="refused"}`, 0, 0},
		{`ebpfwd_node_passive_failures_total{service="tc-svc",node="tc-target",reason="syn_timeout"}`, 0, 0},
		{`ebpfwd_bpf_program_runs_total{program="ebpfwd_nat"}`, 6 * sent.tcConns, math.MaxFloat64},
		{`ebpfwd_config_last_reload_successful`, 1, 1},
		{`ebpfwd_build_info`, 1, 1},
	}
	// The exposition settles first (connections are counted closed a moment
	// after the client sees EOF), then Prometheus must have scraped it.
	scrape := waitExposition(t, endpoint, want)
	prom.waitQueriesEqual(t, want, metricsAddr)

	checkPromtool(t, scrape)
	checkDashboard(t, prom, dash)
}

// retransmitTolerance is the most a kernel datapath may count for bytes
// sent once: TCP retransmissions cross it again.
func retransmitTolerance(sent float64) float64 { return sent*1.05 + 64<<10 }

// expectedSeries is one series selector and the inclusive range its value
// must be in.
type expectedSeries struct {
	selector string
	min, max float64
}

func (e expectedSeries) holds(v float64) bool { return v >= e.min && v <= e.max }

func (e expectedSeries) String() string {
	if e.min == e.max {
		return fmt.Sprintf("%s = %v", e.selector, e.min)
	}
	return fmt.Sprintf("%s in [%v, %v]", e.selector, e.min, e.max)
}

// trafficTotals is what the test sent, as the daemon should count it.
type trafficTotals struct {
	tcUp, tcDown, tcConns          float64
	tcpUp, tcpDown, tcpConns       float64
	chainUp, chainDown, chainConns float64
	proxyRefused                   float64
	udp                            udpResult
}

func (s *trafficTotals) add(o trafficTotals) {
	s.tcUp += o.tcUp
	s.tcDown += o.tcDown
	s.tcConns += o.tcConns
	s.tcpUp += o.tcpUp
	s.tcpDown += o.tcpDown
	s.tcpConns += o.tcpConns
	s.chainUp += o.chainUp
	s.chainDown += o.chainDown
	s.chainConns += o.chainConns
	s.proxyRefused += o.proxyRefused
	s.udp.distinct += o.udp.distinct
	s.udp.written += o.udp.written
}

// trafficRound sends verified traffic through every service: TCP streams
// of several sizes (0 and 1 byte included) through tcp-svc and chain-svc,
// datagrams through udp-svc, and a CONNECT to a dead target through the
// proxy.
func trafficRound(t *testing.T, c, tcClient *topo.NS, udpConn net.Conn) trafficTotals {
	t.Helper()
	var r trafficTotals
	for _, n := range []int{1 << 20, 4096, 1} {
		if err := e2e.Exchange(t, tcClient, "10.33.1.1:8100", n, trafficTimeout); err != nil {
			t.Fatalf("tc-svc, %d bytes: %v", n, err)
		}
		r.tcUp, r.tcDown, r.tcConns = r.tcUp+float64(n), r.tcDown+streamDown(n), r.tcConns+1
	}
	for _, n := range []int{1 << 20, 300000, 4096, 1, 0} {
		if err := e2e.Exchange(t, c, "127.0.0.1:8000", n, trafficTimeout); err != nil {
			t.Fatalf("tcp-svc, %d bytes: %v", n, err)
		}
		r.tcpUp, r.tcpDown, r.tcpConns = r.tcpUp+float64(n), r.tcpDown+streamDown(n), r.tcpConns+1
	}
	for _, n := range []int{512 << 10, 1000} {
		if err := e2e.Exchange(t, c, "127.0.0.1:8001", n, trafficTimeout); err != nil {
			t.Fatalf("chain-svc, %d bytes: %v", n, err)
		}
		r.chainUp, r.chainDown, r.chainConns = r.chainUp+float64(n), r.chainDown+streamDown(n), r.chainConns+1
	}
	connectRefused(t, c, "127.0.0.1:8080", "127.0.0.1:9001")
	r.proxyRefused++
	r.udp = udpTraffic(t, udpConn, []int{1, 100, 1400, 512, 1200, 7})
	return r
}

// streamDown is what the daemon sends a client of peer.Exchange with n
// bytes: the echo, then the echo server's digest trailer. The trailer is
// the only difference allowed between the two directions.
func streamDown(n int) float64 { return float64(n + peer.TrailerSize) }

// connectRefused asks the proxy to CONNECT to a port where nothing
// listens and expects 502 Bad Gateway: an error and a failed target dial
// for the dashboard.
func connectRefused(t *testing.T, ns *topo.NS, proxy, target string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	conn, err := e2e.DialFrom(ctx, t, ns, "tcp", proxy)
	if err != nil {
		t.Fatalf("dial proxy %s: %v", proxy, err)
	}
	defer conn.Close()
	_, err = httpconnect.Handshake(ctx, conn, target, &httpconnect.Auth{Username: proxyUser, Password: proxyPassword})
	var refused *httpconnect.StatusError
	if !errors.As(err, &refused) || refused.Code != http.StatusBadGateway {
		t.Fatalf("CONNECT %s (nothing listening) via %s: %v, want a 502 Bad Gateway refusal", target, proxy, err)
	}
}

var httpClient = &http.Client{Timeout: httpTimeout}

// checkAuthRequired makes sure the endpoint is not open to anyone: the
// metrics reveal the gateway's topology and traffic.
func checkAuthRequired(t *testing.T, endpoint string) {
	t.Helper()
	tests := []struct {
		name       string
		user, pass string
		want       int
	}{
		{"no credentials", "", "", http.StatusUnauthorized},
		{"wrong password", metricsUser, "wrong", http.StatusUnauthorized},
		{"right credentials", metricsUser, metricsPassword, http.StatusOK},
	}
	for _, tc := range tests {
		req, err := http.NewRequest(http.MethodGet, endpoint, nil)
		if err != nil {
			t.Fatal(err)
		}
		if tc.user != "" {
			req.SetBasicAuth(tc.user, tc.pass)
		}
		resp, err := httpClient.Do(req)
		if err != nil {
			t.Fatalf("GET %s (%s): %v", endpoint, tc.name, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("GET %s with %s: status %d, want %d", endpoint, tc.name, resp.StatusCode, tc.want)
		}
	}
}

// scrapeMetrics fetches the exposition with the right credentials.
func scrapeMetrics(endpoint string) ([]byte, error) {
	req, err := http.NewRequest(http.MethodGet, endpoint, nil)
	if err != nil {
		return nil, err
	}
	req.SetBasicAuth(metricsUser, metricsPassword)
	resp, err := httpClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: %w", endpoint, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("scrape %s: read body: %w", endpoint, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape %s: status %d: %s", endpoint, resp.StatusCode, body)
	}
	return body, nil
}

// parseExposition reads the Prometheus text format (what client_golang
// serves without content negotiation) into one sample per exposition
// line: histograms come out as their _bucket, _sum and _count series,
// which is what the expectations name.
func parseExposition(data []byte) (model.Vector, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("parse exposition: %w", err)
	}
	samples, err := expfmt.ExtractSamples(&expfmt.DecodeOptions{Timestamp: model.Now()}, slices.Collect(maps.Values(families))...)
	if err != nil {
		return nil, fmt.Errorf("exposition samples: %w", err)
	}
	return samples, nil
}

// selectorRE splits the simple selectors expectedSeries use:
// name{label="value",...}.
var selectorRE = regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$`)

// sumMatching adds up the samples a simple equality selector matches, and
// says whether any did.
func sumMatching(samples model.Vector, selector string) (float64, bool) {
	m := selectorRE.FindStringSubmatch(selector)
	if m == nil {
		return 0, false
	}
	want := map[string]string{}
	if m[2] != "" {
		for _, pair := range strings.Split(m[2], ",") {
			k, v, _ := strings.Cut(pair, "=")
			want[k] = strings.Trim(v, `"`)
		}
	}
	var sum float64
	found := false
	for _, s := range samples {
		if string(s.Metric[model.MetricNameLabel]) != m[1] {
			continue
		}
		match := true
		for k, v := range want {
			if string(s.Metric[model.LabelName(k)]) != v {
				match = false
				break
			}
		}
		if match {
			sum += float64(s.Value)
			found = true
		}
	}
	return sum, found
}

// mismatches lists the expectations the samples do not meet.
func mismatches(want []expectedSeries, value func(string) (float64, bool)) []string {
	var bad []string
	for _, w := range want {
		got, ok := value(w.selector)
		switch {
		case !ok:
			bad = append(bad, fmt.Sprintf("%s: no such series", w.selector))
		case !w.holds(got):
			bad = append(bad, fmt.Sprintf("%s = %v, want %s", w.selector, got, w))
		}
	}
	return bad
}

// waitExposition scrapes the daemon until every expectation holds and
// returns that scrape.
func waitExposition(t *testing.T, endpoint string, want []expectedSeries) []byte {
	t.Helper()
	deadline := time.Now().Add(settleTimeout)
	for {
		body, err := scrapeMetrics(endpoint)
		var bad []string
		if err == nil {
			var samples model.Vector
			samples, err = parseExposition(body)
			if err == nil {
				bad = mismatches(want, func(sel string) (float64, bool) { return sumMatching(samples, sel) })
				if len(bad) == 0 {
					return body
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon's /metrics did not reach the expected values within %v (error: %v):\n  %s\nlast scrape:\n%s",
				settleTimeout, err, strings.Join(bad, "\n  "), body)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkPromtool runs `promtool check metrics` on a scrape: it lints names,
// suffixes, units and help text the way Prometheus's own tooling does.
func checkPromtool(t *testing.T, scrape []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, promtoolBin, "check", "metrics")
	cmd.Stdin = bytes.NewReader(scrape)
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics (%v) reports problems with the exposition:\n%s", err, out)
	}
}

// udpResult is what udpTraffic sent: the bytes of each distinct datagram,
// and every byte written including resends.
type udpResult struct{ distinct, written float64 }

// dialUDP opens the client socket of the test's one UDP session; it is
// closed in t.Cleanup.
func dialUDP(t *testing.T, ns *topo.NS, addr string) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), trafficTimeout)
	defer cancel()
	conn, err := e2e.DialFrom(ctx, t, ns, "udp", addr)
	if err != nil {
		t.Fatalf("udp dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// udpTraffic sends one datagram of each size on conn, one at a time,
// waiting for each echo. A datagram without a reply is resent a few
// times, as peer.UDPExchange does, since a forwarder setting up its first
// session may lose one.
func udpTraffic(t *testing.T, conn net.Conn, sizes []int) udpResult {
	t.Helper()
	const (
		replyTimeout = 2 * time.Second
		attempts     = 3
	)
	var res udpResult
	reply := make([]byte, 64<<10)
	for seq, size := range sizes {
		// Random content: a late echo of any other datagram never matches.
		msg := make([]byte, size)
		_, _ = rand.Read(msg)
		res.distinct += float64(size)
		echoed := false
		for try := 0; try < attempts && !echoed; try++ {
			if _, err := conn.Write(msg); err != nil {
				t.Fatalf("udp datagram %d (%d bytes): write: %v", seq, size, err)
			}
			res.written += float64(size)
			_ = conn.SetReadDeadline(time.Now().Add(replyTimeout))
			// Skip late echoes of earlier datagrams.
			for {
				n, err := conn.Read(reply)
				if err != nil {
					break
				}
				if bytes.Equal(reply[:n], msg) {
					echoed = true
					break
				}
			}
		}
		if !echoed {
			t.Fatalf("udp datagram %d (%d bytes): no echo after %d attempts of %v", seq, size, attempts, replyTimeout)
		}
	}
	return res
}

// prometheus is a running Debian prometheus server.
type prometheus struct {
	api    string // http://127.0.0.1:PORT
	output *syncbuf.Buffer
}

// startPrometheus runs prometheus scraping target every second with the
// metrics credentials, on a free loopback port with a throwaway TSDB. It
// is stopped (SIGTERM, then SIGKILL after prometheusStop) in t.Cleanup.
func startPrometheus(t *testing.T, target string) *prometheus {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	conf := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
- job_name: ebpfwd
  metrics_path: /metrics
  basic_auth:
    username: %s
    password: %s
  static_configs:
  - targets: [%q]
`, metricsUser, metricsPassword, target)
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatalf("write prometheus config: %v", err)
	}
	listen := testutil.FreeLoopbackAddr(t)
	p := &prometheus{api: "http://" + listen, output: &syncbuf.Buffer{}}
	cmd := exec.Command(prometheusBin,
		"--config.file="+cfg,
		"--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+listen,
		"--log.level=warn",
	)
	cmd.Stdout, cmd.Stderr = p.output, p.output
	// Should the test binary die, prometheus must not outlive it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", prometheusBin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(prometheusStop):
			_ = cmd.Process.Kill()
			<-exited
			t.Errorf("prometheus did not exit within %v of SIGTERM; killed", prometheusStop)
		}
		if t.Failed() {
			t.Logf("prometheus (%s) output:\n%s\nconfig:\n%s", strings.Join(cmd.Args, " "), p.output, conf)
		}
	})
	return p
}

// apiResponse is the envelope of every Prometheus HTTP API answer.
type apiResponse struct {
	Status    string          `json:"status"`
	Data      json.RawMessage `json:"data"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Warnings  []string        `json:"warnings"`
}

// get calls an API path with query parameters and decodes data into out.
func (p *prometheus) get(path string, params url.Values, out any) error {
	u := p.api + path
	if len(params) > 0 {
		u += "?" + params.Encode()
	}
	resp, err := httpClient.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	var r apiResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("%s: status %d, not an API response: %.200s", path, resp.StatusCode, body)
	}
	if r.Status != "success" {
		return fmt.Errorf("%s: %s: %s", path, r.ErrorType, r.Error)
	}
	return json.Unmarshal(r.Data, out)
}

// waitTargetUp waits until the one scrape target has been scraped
// successfully.
func (p *prometheus) waitTargetUp(t *testing.T, timeout time.Duration) {
	t.Helper()
	var targets struct {
		Active []struct {
			Health    string `json:"health"`
			LastError string `json:"lastError"`
			ScrapeURL string `json:"scrapeUrl"`
		} `json:"activeTargets"`
	}
	deadline := time.Now().Add(timeout)
	last := "prometheus not answering yet"
	for {
		err := p.get("/api/v1/targets", url.Values{"state": {"active"}}, &targets)
		switch {
		case err != nil:
			last = err.Error()
		case len(targets.Active) != 1:
			last = fmt.Sprintf("%d active targets, want 1", len(targets.Active))
		case targets.Active[0].Health == "up":
			return
		default:
			a := targets.Active[0]
			last = fmt.Sprintf("target %s is %q (last error: %q)", a.ScrapeURL, a.Health, a.LastError)
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus target not up within %v: %s\nprometheus output:\n%s", timeout, last, p.output)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// vectorSample is one series of an instant vector result.
type vectorSample struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"` // [unix time, "value"]
}

func (s vectorSample) float() float64 {
	str, _ := s.Value[1].(string)
	v, err := strconv.ParseFloat(str, 64)
	if err != nil {
		return math.NaN()
	}
	return v
}

// query evaluates an instant query now.
func (p *prometheus) query(expr string) ([]vectorSample, error) {
	var data struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := p.get("/api/v1/query", url.Values{"query": {expr}}, &data); err != nil {
		return nil, err
	}
	switch data.ResultType {
	case "vector":
		var v []vectorSample
		err := json.Unmarshal(data.Result, &v)
		return v, err
	case "scalar":
		var s [2]any
		if err := json.Unmarshal(data.Result, &s); err != nil {
			return nil, err
		}
		return []vectorSample{{Metric: map[string]string{}, Value: s}}, nil
	}
	return nil, fmt.Errorf("result type %q, want vector or scalar", data.ResultType)
}

// waitQueriesEqual waits until Prometheus has scraped the final counters:
// the same expectations, this time summed through PromQL.
func (p *prometheus) waitQueriesEqual(t *testing.T, want []expectedSeries, instance string) {
	t.Helper()
	value := func(sel string) (float64, bool) {
		m := selectorRE.FindStringSubmatch(sel)
		if m == nil {
			return 0, false
		}
		labels := `instance="` + instance + `"`
		if m[2] != "" {
			labels += "," + m[2]
		}
		res, err := p.query(fmt.Sprintf("sum(%s{%s})", m[1], labels))
		// sum() of nothing is an empty vector, which is "no such series".
		if err != nil || len(res) != 1 {
			return 0, false
		}
		return res[0].float(), true
	}
	deadline := time.Now().Add(scrapeCatchUp)
	for {
		bad := mismatches(want, value)
		if len(bad) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus did not see the expected values within %v:\n  %s", scrapeCatchUp, strings.Join(bad, "\n  "))
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// waitEverySeriesScraped waits until every ebpfwd_* series of instance has
// at least n samples in Prometheus, so that rate() over them is defined.
func (p *prometheus) waitEverySeriesScraped(t *testing.T, instance string, n int) {
	t.Helper()
	// count_over_time would drop the metric names and collide, so the raw
	// samples are counted here.
	expr := fmt.Sprintf(`{__name__=~"ebpfwd_.+",instance=%q}[5m]`, instance)
	deadline := time.Now().Add(scrapeCatchUp)
	for {
		var data struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Values [][2]any          `json:"values"`
			} `json:"result"`
		}
		err := p.get("/api/v1/query", url.Values{"query": {expr}}, &data)
		short := "no series"
		if err == nil && len(data.Result) > 0 {
			short = ""
			for _, r := range data.Result {
				if len(r.Values) < n {
					short = fmt.Sprintf("%v has %d samples", r.Metric, len(r.Values))
					break
				}
			}
			if short == "" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus did not scrape every ebpfwd series %d times within %v (%s: %s, err %v)", n, scrapeCatchUp, expr, short, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// dashboard is the part of a Grafana dashboard the test evaluates.
type dashboard struct {
	SchemaVersion int                       `json:"schemaVersion"`
	UID           string                    `json:"uid"`
	Panels        []panel                   `json:"panels"`
	Templating    struct{ List []variable } `json:"templating"`
}

type panel struct {
	ID         int            `json:"id"`
	Type       string         `json:"type"`
	Title      string         `json:"title"`
	Datasource *datasourceRef `json:"datasource"`
	Targets    []panelTarget  `json:"targets"`
	Panels     []panel        `json:"panels"` // a collapsed row's panels
}

type panelTarget struct {
	RefID      string         `json:"refId"`
	Expr       string         `json:"expr"`
	Datasource *datasourceRef `json:"datasource"`
}

type datasourceRef struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type variable struct {
	Name       string          `json:"name"`
	Type       string          `json:"type"`
	Query      json.RawMessage `json:"query"`
	Multi      bool            `json:"multi"`
	IncludeAll bool            `json:"includeAll"`
	AllValue   string          `json:"allValue"`
}

// queryText is a query variable's query: Grafana writes it either as a
// string or as {"query": "..."}.
func (v variable) queryText() string {
	var s string
	if json.Unmarshal(v.Query, &s) == nil {
		return s
	}
	var q struct {
		Query string `json:"query"`
	}
	_ = json.Unmarshal(v.Query, &q)
	return q.Query
}

// datasourceVar is the dashboard's data source variable; every query
// names it, so the dashboard works whatever the Prometheus source is called.
const datasourceVar = "${datasource}"

func loadDashboard(t *testing.T) dashboard {
	t.Helper()
	data, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatalf("read dashboard: %v", err)
	}
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("parse %s: %v", dashboardFile, err)
	}
	return d
}

// allPanels flattens rows.
func (d dashboard) allPanels() []panel {
	var out []panel
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			out = append(out, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	return out
}

func (d dashboard) variable(name string) (variable, bool) {
	for _, v := range d.Templating.List {
		if v.Name == name {
			return v, true
		}
	}
	return variable{}, false
}

// labelValuesRE parses Grafana's label_values(selector, label).
var labelValuesRE = regexp.MustCompile(`^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$`)

// labelValues runs a label_values variable query the way Grafana does:
// through the label values API, restricted to the selector's series.
func (p *prometheus) labelValues(q string) ([]string, error) {
	m := labelValuesRE.FindStringSubmatch(strings.TrimSpace(q))
	if m == nil {
		return nil, fmt.Errorf("%q is not label_values(selector, label)", q)
	}
	var values []string
	err := p.get("/api/v1/label/"+m[2]+"/values", url.Values{"match[]": {m[1]}}, &values)
	return values, err
}

// promQLRegexLiteral escapes a label value as Grafana does for a regex
// matcher, written inside a PromQL double-quoted string.
func promQLRegexLiteral(v string) string {
	return strings.ReplaceAll(regexp.QuoteMeta(v), `\`, `\\`)
}

// dashboardWindows replace Grafana's interval variables. The data is a few
// seconds old at most and scraped every second, so a minute covers it.
var dashboardWindows = strings.NewReplacer("$__rate_interval", "1m", "$__range", "5m", "$__interval", "15s")

// checkDashboard checks the dashboard's structure, resolves its instance
// and service variables through Prometheus, then evaluates every panel
// query and fails listing every one that errors, returns no series, or
// returns nothing but NaN (what a histogram_quantile over no observations
// gives, and Grafana draws as no data).
func checkDashboard(t *testing.T, p *prometheus, d dashboard) {
	t.Helper()
	if d.SchemaVersion < 36 || d.UID == "" {
		t.Errorf("dashboard schemaVersion %d, uid %q: want a schemaVersion of at least 36 and a fixed uid", d.SchemaVersion, d.UID)
	}
	if v, ok := d.variable("datasource"); !ok || v.Type != "datasource" || v.queryText() != "prometheus" {
		t.Errorf("dashboard lacks a `datasource` variable of type datasource for prometheus (got %+v)", v)
	}

	// Resolve the variables the way Grafana would: instance to the one
	// instance found, service to "All".
	instVar, okI := d.variable("instance")
	svcVar, okS := d.variable("service")
	if !okI || !okS {
		t.Fatalf("dashboard lacks the instance and service variables")
	}
	for _, v := range []variable{instVar, svcVar} {
		if v.Type != "query" || !v.Multi || !v.IncludeAll || v.AllValue != ".*" {
			t.Errorf("variable %s: type %q multi %v includeAll %v allValue %q; want a multi-value query variable with All = .*",
				v.Name, v.Type, v.Multi, v.IncludeAll, v.AllValue)
		}
	}
	instances, err := p.labelValues(instVar.queryText())
	if err != nil || len(instances) != 1 {
		t.Fatalf("variable instance (%s): %v, err %v; want the daemon's one instance", instVar.queryText(), instances, err)
	}
	vars := strings.NewReplacer("$instance", promQLRegexLiteral(instances[0]), "$service", svcVar.AllValue)
	services, err := p.labelValues(vars.Replace(svcVar.queryText()))
	if err != nil {
		t.Fatalf("variable service (%s): %v", svcVar.queryText(), err)
	}
	if wantSvc := []string{"chain-svc", "proxy", "tc-svc", "tcp-svc", "udp-svc"}; !slices.Equal(services, wantSvc) {
		t.Errorf("variable service offers %v, want %v", services, wantSvc)
	}

	var failures []string
	queries := 0
	for _, pn := range d.allPanels() {
		if pn.Type == "row" || pn.Type == "text" {
			continue
		}
		where := fmt.Sprintf("panel %d %q", pn.ID, pn.Title)
		if len(pn.Targets) == 0 {
			failures = append(failures, where+": no queries")
		}
		if pn.Datasource == nil || pn.Datasource.UID != datasourceVar {
			failures = append(failures, where+": panel datasource is not "+datasourceVar)
		}
		for _, tg := range pn.Targets {
			where := fmt.Sprintf("%s query %s", where, tg.RefID)
			if tg.Datasource == nil || tg.Datasource.UID != datasourceVar {
				failures = append(failures, where+": datasource is not "+datasourceVar)
			}
			expr := dashboardWindows.Replace(vars.Replace(tg.Expr))
			if strings.Contains(expr, "$") {
				failures = append(failures, fmt.Sprintf("%s: unresolved variable in %s", where, expr))
				continue
			}
			queries++
			res, err := p.query(expr)
			switch {
			case err != nil:
				failures = append(failures, fmt.Sprintf("%s: %s: %v", where, expr, err))
			case len(res) == 0:
				failures = append(failures, fmt.Sprintf("%s: no series: %s", where, expr))
			case allNaN(res):
				failures = append(failures, fmt.Sprintf("%s: only NaN in %d series: %s", where, len(res), expr))
			default:
				t.Logf("%s: %d series, e.g. %v = %s", where, len(res), res[0].Metric, res[0].Value[1])
			}
		}
	}
	if len(failures) > 0 {
		t.Errorf("%d dashboard queries lack data (of %d evaluated):\n  %s", len(failures), queries, strings.Join(failures, "\n  "))
	}
}

func allNaN(res []vectorSample) bool {
	for _, s := range res {
		if !math.IsNaN(s.float()) {
			return false
		}
	}
	return true
}

// TestGrafanaProvisioning checks that the provisioning files are what
// Grafana reads from /etc/grafana/provisioning: a Prometheus data source
// and a file dashboards provider. Grafana itself is not needed.
func TestGrafanaProvisioning(t *testing.T) {
	tests := []struct {
		file  string
		list  string // the top-level list Grafana reads
		check func(item map[string]any) error
	}{
		{"datasources/ebpfwd.yaml", "datasources", func(item map[string]any) error {
			if item["type"] != "prometheus" || item["url"] == nil || item["name"] == nil {
				return fmt.Errorf("want a named prometheus data source with a url, got %v", item)
			}
			return nil
		}},
		{"dashboards/ebpfwd.yaml", "providers", func(item map[string]any) error {
			opts, _ := item["options"].(map[string]any)
			path, _ := opts["path"].(string)
			if item["type"] != "file" || !filepath.IsAbs(path) {
				return fmt.Errorf("want a file provider with an absolute options.path, got %v", item)
			}
			return nil
		}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			data, err := os.ReadFile(filepath.Join(provisioningDir, tc.file))
			if err != nil {
				t.Fatal(err)
			}
			var doc map[string]any
			if err := yaml.Unmarshal(data, &doc); err != nil {
				t.Fatalf("parse %s: %v", tc.file, err)
			}
			if v, _ := doc["apiVersion"].(int); v != 1 {
				t.Errorf("apiVersion = %v, want 1", doc["apiVersion"])
			}
			items, _ := doc[tc.list].([]any)
			if len(items) != 1 {
				t.Fatalf("%s has %d entries, want 1", tc.list, len(items))
			}
			item, _ := items[0].(map[string]any)
			if err := tc.check(item); err != nil {
				t.Error(err)
			}
		})
	}
}
