package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func mustLoad(t *testing.T, path string) *Config {
	t.Helper()
	cfg, warns, err := Load(path)
	if err != nil {
		t.Fatalf("Load(%s): %v", path, err)
	}
	for _, w := range warns {
		t.Errorf("unexpected warning: %s", w)
	}
	if cfg.Path != path {
		t.Errorf("Path = %q, want %q", cfg.Path, path)
	}
	return cfg
}

// The seed is GOST's own netns example and must keep working unchanged.
func TestSeedConfig(t *testing.T) {
	cfg := mustLoad(t, "testdata/seed000.yaml")

	if len(cfg.Services) != 1 {
		t.Fatalf("got %d services, want 1", len(cfg.Services))
	}
	svc := cfg.Services[0]
	if svc.Name != "service-0" || svc.Addr != "10.0.0.1:8000" || svc.NetNS.Spec() != "ns1" || svc.NetNSOut.Spec() != "" {
		t.Errorf("service = %q at %q in netns %q out %q, want service-0 at 10.0.0.1:8000 in ns1",
			svc.Name, svc.Addr, svc.NetNS, svc.NetNSOut)
	}
	if svc.Handler.Type != "tcp" || svc.Handler.Chain != "chain-0" || svc.Listener.Type != "tcp" {
		t.Errorf("handler %+v listener %+v, want tcp via chain-0 on tcp", svc.Handler, svc.Listener)
	}
	if svc.Pos != (Pos{Line: 2, Column: 3}) {
		t.Errorf("service Pos = %+v, want 2:3", svc.Pos)
	}
	if svc.Forwarder == nil || len(svc.Forwarder.Nodes) != 1 {
		t.Fatalf("forwarder = %+v, want one node", svc.Forwarder)
	}
	target := svc.Forwarder.Nodes[0]
	if target.Name != "target-0" || target.Addr != "10.0.1.11:8000" || target.NetNS.Spec() != "" {
		t.Errorf("target = %+v, want target-0 10.0.1.11:8000", target)
	}

	if len(cfg.Chains) != 1 || cfg.Chains[0].Name != "chain-0" || len(cfg.Chains[0].Hops) != 1 {
		t.Fatalf("chains = %+v, want chain-0 with one hop", cfg.Chains)
	}
	hop := cfg.Chains[0].Hops[0]
	if hop.Name != "hop-0" || hop.NetNS.Spec() != "ns2" || len(hop.Nodes) != 1 {
		t.Fatalf("hop = %+v, want hop-0 in ns2 with one node", hop)
	}
	node := hop.Nodes[0]
	if node.Name != "node-0" || node.Addr != "10.0.1.1:8080" || node.Connector.Type != "http" || node.Dialer.Type != "tcp" {
		t.Errorf("hop node = %+v, want node-0 10.0.1.1:8080 http/tcp", node)
	}
	if node.NetNS.Spec() != "" {
		t.Errorf("hop node NetNS = %q, want \"\" (the hop's ns2 applies)", node.NetNS)
	}
	if len(cfg.Hops) != 0 {
		t.Errorf("top-level hops = %d, want 0", len(cfg.Hops))
	}
}

// The other two examples on GOST's netns page.
func TestNetNSExamples(t *testing.T) {
	tests := []struct {
		file       string
		netns, out string
	}{
		{"testdata/netns_listen.yaml", "ns1", ""},
		{"testdata/netns_out.yaml", "ns1", "ns2"},
	}
	for _, tt := range tests {
		t.Run(filepath.Base(tt.file), func(t *testing.T) {
			svc := mustLoad(t, tt.file).Services[0]
			if svc.Addr != ":8000" || svc.NetNS.Spec() != tt.netns || svc.NetNSOut.Spec() != tt.out {
				t.Errorf("service at %q netns %q out %q, want :8000 %q %q", svc.Addr, svc.NetNS, svc.NetNSOut, tt.netns, tt.out)
			}
			if got := svc.Forwarder.Nodes[0].Addr; got != ":8000" {
				t.Errorf("target addr = %q, want :8000", got)
			}
		})
	}
}

func TestHopsByNameAndValues(t *testing.T) {
	cfg := mustLoad(t, "testdata/hops_by_name.yaml")

	if len(cfg.Hops) != 1 || len(cfg.Chains) != 1 {
		t.Fatalf("hops %d chains %d, want 1 and 1", len(cfg.Hops), len(cfg.Chains))
	}
	chain := cfg.Chains[0]
	if len(chain.Hops) != 2 {
		t.Fatalf("chain hops = %d, want 2", len(chain.Hops))
	}
	if chain.Hops[0] != cfg.Hops[0] {
		t.Error("chain hop \"edge\" is not the top-level hop it names")
	}
	edge := chain.Hops[0]
	if edge.NetNS.Spec() != "ns-edge" || edge.Selector != (Selector{Strategy: "rand", MaxFails: 1, FailTimeout: time.Minute}) {
		t.Errorf("edge = netns %q selector %+v", edge.NetNS, edge.Selector)
	}
	if len(edge.Nodes) != 2 {
		t.Fatalf("edge nodes = %d, want 2", len(edge.Nodes))
	}
	// edge-1 merges edge-0 (<<: *proxy) and overrides name and addr.
	want := []struct {
		name, addr, netns string
	}{{"edge-0", "10.9.0.1:3128", ""}, {"edge-1", "10.9.0.2:3128", "ns-other"}}
	for i, w := range want {
		n := edge.Nodes[i]
		if n.Name != w.name || n.Addr != w.addr || n.NetNS.Spec() != w.netns {
			t.Errorf("edge node %d = %s %s %q, want %s %s %q", i, n.Name, n.Addr, n.NetNS, w.name, w.addr, w.netns)
		}
		if n.Connector.Type != "http" || n.Connector.Auth == nil || *n.Connector.Auth != (Auth{Username: "hop", Password: "secret"}) {
			t.Errorf("edge node %d connector = %+v", i, n.Connector)
		}
	}
	inner := chain.Hops[1]
	if inner.Name != "inner" || inner.Nodes[0].Name != "node-0" || inner.Nodes[0].Addr != "inner.example:8080" {
		t.Errorf("inner hop = %+v", inner)
	}

	web, dns, proxy := cfg.Services[0], cfg.Services[1], cfg.Services[2]
	if web.Forwarder.Selector != (Selector{Strategy: "round", MaxFails: 3, FailTimeout: 30 * time.Second}) {
		t.Errorf("web selector = %+v, want round/3/30s", web.Forwarder.Selector)
	}
	if web.Listener.Type != "tcp" || web.Listener.TTL != 0 || web.Datapath != "auto" {
		t.Errorf("web listener %+v datapath %q, want default tcp listener and auto", web.Listener, web.Datapath)
	}
	if dns.Listener.Type != "udp" || dns.Listener.TTL != 30*time.Second || dns.Datapath != "userspace" {
		t.Errorf("dns listener %+v datapath %q, want udp ttl 30s userspace", dns.Listener, dns.Datapath)
	}
	if dns.Forwarder.Nodes[0].Name != "node-0" {
		t.Errorf("dns node name = %q, want default node-0", dns.Forwarder.Nodes[0].Name)
	}
	if proxy.Handler.Auth == nil || *proxy.Handler.Auth != (Auth{Username: "user", Password: "1234"}) {
		t.Errorf("proxy auth = %+v, want user/1234 (number read as a string)", proxy.Handler.Auth)
	}
	if proxy.NetNS.Spec() != "/proc/1/ns/net" || proxy.IdleTimeout != 5*time.Minute || proxy.Forwarder != nil {
		t.Errorf("proxy netns %q idle %v forwarder %v", proxy.NetNS, proxy.IdleTimeout, proxy.Forwarder)
	}
	wantMeta := map[string]any{"netns": "/proc/1/ns/net", "idletimeout": "5m"}
	if !reflect.DeepEqual(proxy.Metadata, wantMeta) {
		t.Errorf("proxy metadata = %#v, want %#v (keys lower-cased as GOST does)", proxy.Metadata, wantMeta)
	}

	if cfg.Log != (Log{Level: "debug", Format: "json", Output: "/var/log/ebpfwd.log"}) {
		t.Errorf("log = %+v", cfg.Log)
	}
	if cfg.Metrics.Addr != "127.0.0.1:9000" || cfg.Metrics.Path != "/stats" || cfg.Metrics.Auth != nil {
		t.Errorf("metrics = %+v", cfg.Metrics)
	}
}

func TestDefaults(t *testing.T) {
	const yaml = `services:
- addr: :53
  handler:
    type: udp
  forwarder:
    nodes:
    - addr: 10.0.0.53:53
- addr: 127.0.0.1:8080
  handler:
    type: http
    chain: c
chains:
- name: c
  hops:
  - nodes:
    - addr: proxy:3128
`
	cfg, warns, err := Parse("defaults.yaml", []byte(yaml))
	if err != nil || len(warns) > 0 {
		t.Fatalf("Parse: %v (warnings %v)", err, warns)
	}
	udp, http := cfg.Services[0], cfg.Services[1]
	if udp.Name != "service-0" || http.Name != "service-1" {
		t.Errorf("names = %q %q, want service-0 service-1", udp.Name, http.Name)
	}
	if udp.Listener.Type != "udp" || udp.Listener.TTL != 5*time.Second {
		t.Errorf("udp listener = %+v, want udp with 5s ttl", udp.Listener)
	}
	if http.Listener.Type != "tcp" {
		t.Errorf("http listener = %+v, want tcp", http.Listener)
	}
	for _, svc := range cfg.Services {
		if svc.Datapath != "auto" || svc.IdleTimeout != 0 || svc.NetNS.Spec() != "" || svc.NetNSOut.Spec() != "" {
			t.Errorf("%s: datapath %q idle %v netns %q/%q, want auto, 0 and the daemon's namespace",
				svc.Name, svc.Datapath, svc.IdleTimeout, svc.NetNS, svc.NetNSOut)
		}
	}
	defaultSel := Selector{Strategy: "round", MaxFails: 1, FailTimeout: 10 * time.Second}
	if udp.Forwarder.Selector != defaultSel {
		t.Errorf("forwarder selector = %+v, want %+v", udp.Forwarder.Selector, defaultSel)
	}
	hop := cfg.Chains[0].Hops[0]
	if hop.Name != "hop-0" || hop.Selector != defaultSel {
		t.Errorf("hop = %q %+v, want hop-0 with default selector", hop.Name, hop.Selector)
	}
	node := hop.Nodes[0]
	if node.Name != "node-0" || node.Connector.Type != "http" || node.Dialer.Type != "tcp" {
		t.Errorf("hop node = %+v, want node-0 http/tcp", node)
	}
	if cfg.Log != (Log{Level: "info", Format: "text", Output: "stderr"}) {
		t.Errorf("log = %+v", cfg.Log)
	}
	if cfg.Metrics != (Metrics{Path: "/metrics"}) {
		t.Errorf("metrics = %+v, want disabled with path /metrics", cfg.Metrics)
	}
}

func TestSelectorValues(t *testing.T) {
	tests := []struct {
		selector string
		want     Selector
	}{
		{"{}", Selector{"round", 1, 10 * time.Second}},
		{"{strategy: rr}", Selector{"round", 1, 10 * time.Second}},
		{"{strategy: random}", Selector{"rand", 1, 10 * time.Second}},
		{"{strategy: ha}", Selector{"fifo", 1, 10 * time.Second}},
		{"{strategy: hash, maxFails: 0, failTimeout: 0}", Selector{"hash", 1, 10 * time.Second}},
		{"{maxFails: 5, failTimeout: 90}", Selector{"round", 5, 90 * time.Second}},
		{`{maxFails: "2", failTimeout: "15"}`, Selector{"round", 2, 15 * time.Second}},
		{"{failTimeout: 1m30s}", Selector{"round", 1, 90 * time.Second}},
		{"{Strategy: fifo, MAXFAILS: 4}", Selector{"fifo", 4, 10 * time.Second}},
	}
	for _, tt := range tests {
		t.Run(tt.selector, func(t *testing.T) {
			yaml := "services:\n- addr: :1\n  handler: {type: tcp}\n  forwarder:\n    selector: " + tt.selector + "\n    nodes: [{addr: \":2\"}]\n"
			cfg, _, err := Parse("sel.yaml", []byte(yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := cfg.Services[0].Forwarder.Selector; got != tt.want {
				t.Errorf("selector = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// Keys are matched case-insensitively, as GOST's loader does.
func TestKeysAreCaseInsensitive(t *testing.T) {
	const yaml = `Services:
- Name: s
  ADDR: ":80"
  Handler: {Type: tcp}
  Forwarder: {Nodes: [{Addr: ":81"}]}
  Metadata: {NetNS: ns1, IDLETIMEOUT: 3}
`
	cfg, warns, err := Parse("case.yaml", []byte(yaml))
	if err != nil || len(warns) > 0 {
		t.Fatalf("Parse: %v (warnings %v)", err, warns)
	}
	svc := cfg.Services[0]
	if svc.Name != "s" || svc.Addr != ":80" || svc.NetNS.Spec() != "ns1" || svc.IdleTimeout != 3*time.Second {
		t.Errorf("service = %+v", svc)
	}
}

// healthCheck is passive unless a service asks for probes, in any case.
func TestHealthCheck(t *testing.T) {
	const yaml = `services:
- name: web
  addr: ":80"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":81"}]}
  metadata: {healthCheck: Probe}
- name: dns
  addr: ":53"
  handler: {type: udp}
  forwarder: {nodes: [{addr: ":54"}]}
  metadata: {healthcheck: passive}
- name: plain
  addr: ":82"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":81"}]}
`
	cfg, warns, err := Parse("health.yaml", []byte(yaml))
	if err != nil || len(warns) > 0 {
		t.Fatalf("Parse: %v (warnings %v)", err, warns)
	}
	for i, want := range []string{HealthProbe, HealthPassive, HealthPassive} {
		if got := cfg.Services[i].HealthCheck; got != want {
			t.Errorf("services[%d].HealthCheck = %q, want %q", i, got, want)
		}
	}
}

// maxStreams caps a service's concurrent streams or sessions; written as a
// number or a digit string (as GOST's loader converts), any case.
func TestMaxStreams(t *testing.T) {
	const yaml = `services:
- name: web
  addr: ":80"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":81"}]}
  metadata: {maxStreams: 100}
- name: dns
  addr: ":53"
  handler: {type: udp}
  forwarder: {nodes: [{addr: ":54"}]}
  metadata: {MAXSTREAMS: "2000"}
- name: plain
  addr: ":82"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":81"}]}
`
	cfg, warns, err := Parse("max.yaml", []byte(yaml))
	if err != nil || len(warns) > 0 {
		t.Fatalf("Parse: %v (warnings %v)", err, warns)
	}
	for i, want := range []int{100, 2000, 0} {
		if got := cfg.Services[i].MaxStreams; got != want {
			t.Errorf("services[%d].MaxStreams = %d, want %d", i, got, want)
		}
	}
}

// All problems are reported at once, sorted by position.
func TestMultipleErrorsSorted(t *testing.T) {
	path := "testdata/invalid_multi.yaml"
	cfg, warns, err := Load(path)
	if cfg != nil {
		t.Error("config returned for an invalid file")
	}
	var list *Errors
	if !errors.As(err, &list) {
		t.Fatalf("error = %v (%T), want *Errors", err, err)
	}
	wantErrs := []string{
		path + `:2:3: services[0].addr: is required (the host:port to listen on, e.g. ":8080")`,
		path + `:4:11: services[0].handler.type: "socks5" is not supported by ebpfwd (supported: tcp, udp, http)`,
		path + `:7:9: services[1].addr: missing port in address "10.0.0.1"`,
		path + `:12:13: services[1].forwarder.nodes[0].addr: port "99999" must be a number from 1 to 65535 in address ":99999"`,
		path + `:14:15: services[1].metadata.datapath: invalid value "ebpf" (must be one of: auto, tc, userspace)`,
		path + `:16:1: tls: "tls" is a GOST feature ebpfwd does not support`,
	}
	var got []string
	for _, d := range list.List {
		got = append(got, d.String())
	}
	if !reflect.DeepEqual(got, wantErrs) {
		t.Errorf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantErrs, "\n"))
	}
	if err.Error() != strings.Join(wantErrs, "\n") {
		t.Errorf("Error() = %q", err.Error())
	}
	// Warnings still come back for an invalid file.
	wantWarn := path + `:15:5: services[1].metadata.so_mark: unknown metadata key "so_mark" is ignored (ebpfwd reads here: netns, netns.out, datapath, idleTimeout, maxStreams, healthCheck, proxyProtocol, limiter.refreshInterval, limiter.scope, limiter.in, limiter.out, limiter.conn.in, limiter.conn.out, climiter, rlimiter)`
	if len(warns) != 1 || warns[0].String() != wantWarn {
		t.Errorf("warnings = %v, want [%s]", warns, wantWarn)
	}
}

func TestDiagnosticString(t *testing.T) {
	tests := []struct {
		d    Diagnostic
		want string
	}{
		{Diagnostic{"gost.yaml", 12, 13, "services[0].forwarder.nodes[1].addr", `missing port in address "10.0.0.1"`},
			`gost.yaml:12:13: services[0].forwarder.nodes[1].addr: missing port in address "10.0.0.1"`},
		{Diagnostic{"gost.yaml", 3, 0, "", "YAML syntax error: x"}, "gost.yaml:3: YAML syntax error: x"},
		{Diagnostic{"gost.yaml", 1, 1, "", "m"}, "gost.yaml:1:1: m"},
	}
	for _, tt := range tests {
		if got := tt.d.String(); got != tt.want {
			t.Errorf("String() = %q, want %q", got, tt.want)
		}
		if got := tt.d.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
}

func TestLoadMissingFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "absent.yaml")
	_, _, err := Load(missing)
	if !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Load(%s) error = %v, want a wrapped os.ErrNotExist", missing, err)
	}
	if !strings.Contains(err.Error(), missing) {
		t.Errorf("error %q does not name the file", err)
	}
}

// A few kilobytes of aliases must not expand into millions of entries.
func TestAliasExpansionIsBounded(t *testing.T) {
	// 100 chains × 100 hops × 100 nodes, all through aliases.
	var b strings.Builder
	b.WriteString("services:\n- {addr: \":1\", handler: {type: tcp}, forwarder: {nodes: &n [")
	for i := range 100 {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("{addr: \":1\"}")
	}
	b.WriteString("]}}\nchains:\n- {name: c0, hops: &h [")
	for i := range 100 {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString("{nodes: *n}")
	}
	b.WriteString("]}\n")
	for i := 1; i < 100; i++ {
		fmt.Fprintf(&b, "- {name: c%d, hops: *h}\n", i)
	}
	done := make(chan error, 1)
	go func() {
		_, _, err := Parse("bomb.yaml", []byte(b.String()))
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "expands to more than") {
			t.Fatalf("error = %v, want the expansion limit", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Parse did not finish within 10s")
	}
}

// TestValuesAnyCase: enumerated values are read in any case, as GOST reads
// its strategy names.
func TestValuesAnyCase(t *testing.T) {
	yaml := "services:\n- addr: :80\n  handler: {type: tcp}\n  forwarder:\n    selector: {strategy: Round}\n    nodes: [{addr: 10.0.0.2:80}]\n  metadata: {datapath: TC}\n"
	cfg, _, err := Parse("case.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	if s := cfg.Services[0]; s.Datapath != "tc" || s.Forwarder.Selector.Strategy != "round" {
		t.Fatalf("datapath %q strategy %q, want tc and round", s.Datapath, s.Forwarder.Selector.Strategy)
	}
}

// TestForwarderTargets: GOST's older forwarder.targets is a list of
// addresses, read as nodes target-N.
func TestForwarderTargets(t *testing.T) {
	yaml := "services:\n- addr: :80\n  handler: {type: tcp}\n  forwarder:\n    targets: [10.0.0.2:80, \"db.internal:5432\"]\n"
	cfg, _, err := Parse("targets.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	nodes := cfg.Services[0].Forwarder.Nodes
	if len(nodes) != 2 || nodes[0].Name != "target-0" || nodes[0].Addr != "10.0.0.2:80" || !nodes[0].IP.IsValid() ||
		nodes[1].Name != "target-1" || nodes[1].Addr != "db.internal:5432" {
		t.Fatalf("nodes %+v", nodes)
	}
	both := "services:\n- addr: :80\n  handler: {type: tcp}\n  forwarder:\n    nodes: [{addr: 10.0.0.3:80}]\n    targets: [10.0.0.2:80]\n"
	if _, _, err := Parse("both.yaml", []byte(both)); err == nil || !strings.Contains(err.Error(), "not both") {
		t.Fatalf("nodes and targets: err = %v, want a refusal", err)
	}
}

// TestHTTPHandlerMetadata: ebpfwd's own keys of an http handler decode to
// HTTPHandler, in any case as GOST lower-cases metadata keys.
func TestHTTPHandlerMetadata(t *testing.T) {
	const yaml = `services:
- addr: 10.0.0.1:3128
  handler:
    type: http
    metadata: {allowopenproxy: true, maxClients: 100, HEADERTIMEOUT: 3s}
`
	cfg, warns, err := Parse("http.yaml", []byte(yaml))
	if err != nil || len(warns) > 0 {
		t.Fatalf("Parse: %v (warnings %v)", err, warns)
	}
	want := HTTPHandler{AllowOpenProxy: true, MaxClients: 100, HeaderTimeout: 3 * time.Second}
	if got := cfg.Services[0].Handler.HTTP; got != want {
		t.Fatalf("http handler metadata = %+v, want %+v", got, want)
	}
}
