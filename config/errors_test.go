package config

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

// want is one expected diagnostic: exact place and field, message substring.
type want struct {
	line, col int
	field     string
	msg       string
}

func (w want) matches(d Diagnostic) bool {
	return d.Line == w.line && d.Column == w.col && d.Field == w.field && strings.Contains(d.Message, w.msg)
}

func (w want) String() string {
	return fmt.Sprintf("%d:%d: %s: ...%s...", w.line, w.col, w.field, w.msg)
}

// checkDiagnostics asserts that got holds exactly the wanted diagnostics, in
// any order.
func checkDiagnostics(t *testing.T, kind string, got []Diagnostic, wants []want) {
	t.Helper()
	used := make([]bool, len(got))
	for _, w := range wants {
		found := false
		for i, d := range got {
			if !used[i] && w.matches(d) {
				used[i], found = true, true
				break
			}
		}
		if !found {
			t.Errorf("missing %s %v", kind, w)
		}
	}
	for i, d := range got {
		if !used[i] {
			t.Errorf("unexpected %s %q", kind, d.String())
		}
	}
}

// A valid base every error case varies one thing of (lines 1-8).
const base = `services:
- name: a
  addr: ":8000"
  handler:
    type: tcp
  forwarder:
    nodes:
    - addr: 10.0.0.2:80
`

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		errs  []want
		warns []want
	}{
		// Whole-file problems.
		{
			name: "empty file",
			yaml: "",
			errs: []want{{1, 1, "services", "no services"}},
		},
		{
			name: "comments only",
			yaml: "# nothing here\n",
			errs: []want{{1, 1, "services", "no services"}},
		},
		{
			name: "empty services list",
			yaml: "services: []\n",
			errs: []want{{1, 11, "services", "no services"}},
		},
		{
			name: "no services section",
			yaml: "log:\n  level: info\n",
			errs: []want{{1, 1, "services", "no services"}},
		},
		{
			name: "top level is a list",
			yaml: "- a\n- b\n",
			errs: []want{{1, 1, "", "the top level must be a mapping, not a list"}},
		},
		{
			name: "syntax error with line",
			yaml: "services:\n- name: a\n  addr: [\n",
			errs: []want{{3, 9, "", "YAML syntax error: did not find expected node content"}},
		},
		{
			name: "tab indentation",
			yaml: "services:\n\t- name: a\n",
			errs: []want{{2, 1, "", "found character that cannot start any token"}},
		},
		{
			name: "unknown anchor",
			yaml: "services: *nope\n",
			errs: []want{{1, 11, "", "unknown anchor 'nope' referenced"}},
		},
		{
			name: "two documents",
			yaml: base + "---\nservices: []\n",
			errs: []want{{9, 1, "", "more than one YAML document"}},
		},
		{
			name: "unsupported top-level section",
			yaml: base + "authers:\n- name: a\n",
			errs: []want{{9, 1, "authers", `"authers" is a GOST feature ebpfwd does not support`}},
		},
		{
			name: "unknown top-level key",
			yaml: strings.Replace(base, "services:", "servics:", 1),
			errs: []want{
				{1, 1, "servics", `unknown field "servics" (did you mean "services"?)`},
				{1, 1, "services", "no services"},
			},
		},
		{
			name: "duplicate key, also across case",
			yaml: base + "log:\n  level: info\n  Level: debug\n",
			errs: []want{{11, 3, "log.Level", `duplicate key "Level" (first at line 10)`}},
		},
		{
			name: "services is not a list",
			yaml: "services:\n  name: a\n",
			errs: []want{{2, 3, "services", "must be a list, not a mapping"}},
		},

		// Service addr.
		{
			name: "addr missing",
			yaml: strings.Replace(base, "  addr: \":8000\"\n", "", 1),
			errs: []want{{2, 3, "services[0].addr", "is required"}},
		},
		{
			name: "addr missing port",
			yaml: strings.Replace(base, `":8000"`, "10.0.0.1", 1),
			errs: []want{{3, 9, "services[0].addr", `missing port in address "10.0.0.1"`}},
		},
		{
			name: "addr port not numeric",
			yaml: strings.Replace(base, `":8000"`, `":http"`, 1),
			errs: []want{{3, 9, "services[0].addr", `port "http" must be a number from 1 to 65535`}},
		},
		{
			name: "addr port zero",
			yaml: strings.Replace(base, `":8000"`, `":0"`, 1),
			errs: []want{{3, 9, "services[0].addr", `port "0" must be a number from 1 to 65535`}},
		},
		{
			name: "addr port too large",
			yaml: strings.Replace(base, `":8000"`, `"10.0.0.1:65536"`, 1),
			errs: []want{{3, 9, "services[0].addr", `port "65536" must be a number`}},
		},
		{
			name: "addr listen host is a name",
			yaml: strings.Replace(base, `":8000"`, `localhost:8000`, 1),
			errs: []want{{3, 9, "services[0].addr", `listen host "localhost" in address "localhost:8000" must be empty or an IP address`}},
		},
		{
			name: "addr is a bare number",
			yaml: strings.Replace(base, `":8000"`, `8000`, 1),
			errs: []want{{3, 9, "services[0].addr", `must be host:port (for example ":8000"), not a number`}},
		},
		{
			name: "addr IPv6 without brackets",
			yaml: strings.Replace(base, `":8000"`, `"::1:8000"`, 1),
			errs: []want{{3, 9, "services[0].addr", "IPv6 addresses need brackets"}},
		},
		{
			name: "addr empty",
			yaml: strings.Replace(base, `":8000"`, `""`, 1),
			errs: []want{{3, 9, "services[0].addr", "must not be empty"}},
		},

		// Service keys.
		{
			name: "unsupported service key",
			yaml: base + "  bypass: bp-0\n",
			errs: []want{{9, 3, "services[0].bypass", `"bypass" is a GOST feature ebpfwd does not support`}},
		},
		{
			name: "misspelled service key",
			yaml: strings.Replace(base, "  addr:", "  adr:", 1),
			errs: []want{
				{3, 3, "services[0].adr", `unknown field "adr" (did you mean "addr"?)`},
				{2, 3, "services[0].addr", "is required"},
			},
		},
		{
			name: "name is a list",
			yaml: strings.Replace(base, "name: a", "name: [a]", 1),
			errs: []want{{2, 9, "services[0].name", "must be a string, not a list"}},
		},
		{
			name: "duplicate service names, explicit and default",
			yaml: base + `- addr: ":8001"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":80"}]}
- name: service-1
  addr: ":8002"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: ":80"}]}
`,
			errs: []want{{12, 3, "services[2].name", `duplicate service name "service-1" (first at line 9)`}},
		},

		// Handler and listener.
		{
			name: "handler missing",
			yaml: "services:\n- addr: :80\n",
			errs: []want{{2, 3, "services[0].handler", "is required"}},
		},
		{
			name: "handler type missing",
			yaml: strings.Replace(base, "    type: tcp\n", "    chain: c\n", 1),
			errs: []want{{5, 5, "services[0].handler.type", "is required (supported: tcp, udp, http)"}},
		},
		{
			name: "handler type not supported",
			yaml: strings.Replace(base, "type: tcp", "type: socks5", 1),
			errs: []want{{5, 11, "services[0].handler.type", `"socks5" is not supported by ebpfwd (supported: tcp, udp, http)`}},
		},
		{
			name: "handler type typo",
			yaml: strings.Replace(base, "type: tcp", "type: tpc", 1),
			errs: []want{{5, 11, "services[0].handler.type", `(did you mean "tcp"?)`}},
		},
		{
			name: "handler is a string",
			yaml: strings.Replace(base, "  handler:\n    type: tcp\n", "  handler: tcp\n", 1),
			errs: []want{{4, 12, "services[0].handler", "services[0].handler must be a mapping, not a string"}},
		},
		{
			name: "unsupported handler key",
			yaml: strings.Replace(base, "    type: tcp\n", "    type: tcp\n    retries: 3\n", 1),
			errs: []want{{6, 5, "services[0].handler.retries", "GOST feature ebpfwd does not support"}},
		},
		{
			name: "listener type not supported",
			yaml: base + "  listener:\n    type: kcp\n",
			errs: []want{{10, 11, "services[0].listener.type", `"kcp" is not supported by ebpfwd (supported: tcp, udp)`}},
		},
		{
			name: "tcp handler on udp listener",
			yaml: base + "  listener:\n    type: udp\n",
			errs: []want{{10, 11, "services[0].listener.type", `listener type "udp" cannot carry handler type "tcp"`}},
		},
		{
			name: "http handler on udp listener",
			yaml: "services:\n- addr: 127.0.0.1:80\n  handler: {type: http}\n  listener: {type: udp}\n",
			errs: []want{{4, 20, "services[0].listener.type", `cannot carry handler type "http"`}},
		},
		{
			name: "udp handler on tcp listener",
			yaml: strings.Replace(base, "type: tcp", "type: udp", 1) + "  listener:\n    type: tcp\n",
			errs: []want{{10, 11, "services[0].listener.type", `(use listener type "udp")`}},
		},
		{
			name: "listener tls is unsupported",
			yaml: base + "  listener:\n    type: tcp\n    tls:\n      certFile: a\n",
			errs: []want{{11, 5, "services[0].listener.tls", "GOST feature ebpfwd does not support"}},
		},
		{
			name: "listener ttl invalid",
			yaml: strings.Replace(base, "type: tcp", "type: udp", 1) + "  listener:\n    metadata:\n      ttl: soon\n",
			errs: []want{{11, 12, "services[0].listener.metadata.ttl", `invalid duration "soon"`}},
		},

		// Forwarder.
		{
			name: "tcp handler without forwarder",
			yaml: "services:\n- addr: :80\n  handler:\n    type: tcp\n",
			errs: []want{{2, 3, "services[0].forwarder.nodes", `handler type "tcp" needs at least one forwarder node`}},
		},
		{
			name: "udp handler with empty nodes",
			yaml: "services:\n- addr: :80\n  handler:\n    type: udp\n  forwarder:\n    nodes: []\n",
			errs: []want{{6, 12, "services[0].forwarder.nodes", `handler type "udp" needs at least one forwarder node`}},
		},
		{
			name: "forwarder node addr missing port",
			yaml: strings.Replace(base, "10.0.0.2:80", "10.0.0.2", 1),
			errs: []want{{8, 13, "services[0].forwarder.nodes[0].addr", `missing port in address "10.0.0.2"`}},
		},
		{
			name: "forwarder node addr missing",
			yaml: strings.Replace(base, "- addr: 10.0.0.2:80", "- name: x", 1),
			errs: []want{
				{8, 7, "services[0].forwarder.nodes[0].addr", "is required"},
			},
		},
		{
			name: "forwarder node bad IPv4",
			yaml: strings.Replace(base, "10.0.0.2:80", "10.0.0.256:80", 1),
			errs: []want{{8, 13, "services[0].forwarder.nodes[0].addr", `invalid IP address "10.0.0.256"`}},
		},
		{
			name: "forwarder node bad host name",
			yaml: strings.Replace(base, "10.0.0.2:80", "bad!host:80", 1),
			errs: []want{{8, 13, "services[0].forwarder.nodes[0].addr", `invalid host name "bad!host"`}},
		},
		{
			name: "duplicate forwarder node names",
			yaml: base + "    - addr: 10.0.0.3:80\n      name: node-0\n",
			errs: []want{{9, 7, "services[0].forwarder.nodes[1].name", `duplicate node name "node-0" (first at line 8)`}},
		},
		{
			name: "forwarder node unsupported key",
			yaml: base + "      tls:\n        serverName: x\n",
			errs: []want{{9, 7, "services[0].forwarder.nodes[0].tls", "GOST feature ebpfwd does not support"}},
		},
		{
			name: "forwarder node has no connector in GOST",
			yaml: base + "      connector:\n        type: http\n",
			errs: []want{{9, 7, "services[0].forwarder.nodes[0].connector", `unknown field "connector"`}},
		},

		// Selector.
		{
			name: "selector strategy unknown",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      strategy: weighted\n    nodes:\n", 1),
			errs: []want{{8, 17, "services[0].forwarder.selector.strategy", `invalid value "weighted" (must be one of: round, rand, fifo, hash)`}},
		},
		{
			name: "selector maxFails negative",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      maxFails: -1\n    nodes:\n", 1),
			errs: []want{{8, 17, "services[0].forwarder.selector.maxFails", "must not be negative"}},
		},
		{
			name: "selector maxFails not a number",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      maxFails: many\n    nodes:\n", 1),
			errs: []want{{8, 17, "services[0].forwarder.selector.maxFails", `must be a whole number, not "many"`}},
		},
		{
			name: "selector failTimeout invalid",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      failTimeout: 10 s\n    nodes:\n", 1),
			errs: []want{{8, 20, "services[0].forwarder.selector.failTimeout", `invalid duration "10 s"`}},
		},
		{
			name: "selector failTimeout negative",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      failTimeout: -5s\n    nodes:\n", 1),
			errs: []want{{8, 20, "services[0].forwarder.selector.failTimeout", "must not be negative"}},
		},
		{
			name: "selector maxLatency unsupported",
			yaml: strings.Replace(base, "    nodes:\n", "    selector:\n      maxLatency: 1s\n    nodes:\n", 1),
			errs: []want{{8, 7, "services[0].forwarder.selector.maxLatency", "GOST feature ebpfwd does not support"}},
		},

		// Service metadata.
		{
			name: "datapath invalid",
			yaml: base + "  metadata:\n    datapath: xdp\n",
			errs: []want{{10, 15, "services[0].metadata.datapath", `invalid value "xdp" (must be one of: auto, tc, userspace)`}},
		},
		{
			name: "datapath not built",
			yaml: base + "  metadata:\n    datapath: SockMap\n",
			errs: []want{{10, 15, "services[0].metadata.datapath", `datapath sockmap is not built yet (available: auto, tc, userspace)`}},
		},
		{
			name: "netns relative path",
			yaml: base + "  metadata:\n    netns: run/netns/a\n",
			errs: []want{{10, 12, "services[0].metadata.netns", `"run/netns/a" is a relative path`}},
		},
		{
			name: "netns empty",
			yaml: base + "  metadata:\n    netns: \"\"\n",
			errs: []want{{10, 12, "services[0].metadata.netns", "must be a non-empty string"}},
		},
		{
			name: "netns number",
			yaml: base + "  metadata:\n    netns: 1\n",
			errs: []want{{10, 12, "services[0].metadata.netns", "not a number (quote names that look like numbers)"}},
		},
		{
			name: "netns.out dot-dot",
			yaml: base + "  metadata:\n    netns.out: ..\n",
			errs: []want{{10, 16, "services[0].metadata.netns.out", `name ".." is not valid`}},
		},
		{
			name:  "netns set twice with different values",
			yaml:  base + "  netns: ns1\n  metadata:\n    netns: ns2\n",
			errs:  []want{{11, 12, "services[0].metadata.netns", `conflicts with the service-level netns "ns1" at line 9`}},
			warns: []want{{9, 3, "services[0].netns", "deprecated"}},
		},
		{
			name: "maxStreams zero",
			yaml: base + "  metadata:\n    maxStreams: 0\n",
			errs: []want{{10, 17, "services[0].metadata.maxStreams", "must be at least 1, not 0"}},
		},
		{
			name: "maxStreams not a number",
			yaml: base + "  metadata:\n    maxStreams: lots\n",
			errs: []want{{10, 17, "services[0].metadata.maxStreams", `must be a whole number, not "lots"`}},
		},
		{
			name: "healthCheck unknown",
			yaml: base + "  metadata:\n    healthCheck: probes\n",
			errs: []want{{10, 18, "services[0].metadata.healthCheck", `invalid value "probes" (must be one of: passive, probe) (did you mean "probe"?)`}},
		},
		{
			name: "idleTimeout negative",
			yaml: base + "  metadata:\n    idleTimeout: -1s\n",
			errs: []want{{10, 18, "services[0].metadata.idleTimeout", "must not be negative"}},
		},
		{
			name:  "metadata value undecodable",
			yaml:  base + "  metadata:\n    x: !!int nope\n",
			errs:  []want{{10, 8, "services[0].metadata.x", "cannot decode value"}},
			warns: []want{},
		},

		{
			name:  "metadata value contains itself",
			yaml:  base + "  metadata:\n    x: &m {y: *m}\n",
			errs:  []want{{10, 8, "services[0].metadata.x.y", "contains itself"}},
			warns: []want{},
		},
		{
			name:  "metadata list contains itself",
			yaml:  base + "  metadata:\n    x: &m [*m]\n",
			errs:  []want{{10, 8, "services[0].metadata.x[0]", "contains itself"}},
			warns: []want{},
		},
		{
			name:  "metadata merge contains itself",
			yaml:  base + "  metadata:\n    x: &m {<<: *m}\n",
			errs:  []want{{10, 16, "services[0].metadata.x", "refers to a mapping that contains it"}},
			warns: []want{{10, 5, "services[0].metadata.x", "unknown metadata key"}},
		},

		// Chains and hops.
		{
			name: "unknown chain",
			yaml: strings.Replace(base, "    type: tcp\n", "    type: tcp\n    chain: chain-1\n", 1) +
				"chains:\n- name: chain-0\n  hops:\n  - nodes: [{addr: \"10.0.0.9:8080\"}]\n",
			errs: []want{{6, 12, "services[0].handler.chain", `unknown chain "chain-1" (did you mean "chain-0"?)`}},
		},
		{
			name: "udp handler with chain",
			yaml: strings.Replace(base, "    type: tcp\n", "    type: udp\n    chain: c\n", 1) +
				"chains:\n- name: c\n  hops:\n  - nodes: [{addr: \"10.0.0.9:8080\"}]\n",
			errs: []want{{6, 12, "services[0].handler.chain", "a udp service cannot use a chain"}},
		},
		{
			name: "chain without name and hops",
			yaml: base + "chains:\n- metadata: {}\n",
			errs: []want{
				{10, 3, "chains[0].name", "is required"},
				{10, 3, "chains[0].hops", "a chain needs at least one hop"},
			},
		},
		{
			name: "duplicate chain names",
			yaml: base + "chains:\n- name: c\n  hops: [{nodes: [{addr: \":1\"}]}]\n- name: c\n  hops: [{nodes: [{addr: \":1\"}]}]\n",
			errs: []want{{12, 9, "chains[1].name", `duplicate chain name "c" (first at line 10)`}},
		},
		{
			name: "hop refers to unknown top-level hop",
			yaml: base + "hops:\n- name: edge\n  nodes: [{addr: \":1\"}]\nchains:\n- name: c\n  hops:\n  - name: egde\n",
			errs: []want{{15, 11, "chains[0].hops[0].name", `no top-level hop named "egde" (a hop without nodes refers to hops[] by name) (did you mean "edge"?)`}},
		},
		{
			name: "hop without nodes or name",
			yaml: base + "chains:\n- name: c\n  hops:\n  - selector: {strategy: fifo}\n",
			errs: []want{{12, 5, "chains[0].hops[0].nodes", "a hop needs nodes, or the name of a top-level hop"}},
		},
		{
			name:  "hop reference with its own settings",
			yaml:  base + "hops:\n- name: edge\n  nodes: [{addr: \":1\"}]\nchains:\n- name: c\n  hops:\n  - name: edge\n    selector: {strategy: fifo}\n",
			warns: []want{{16, 5, "chains[0].hops[0].selector", `this hop refers to top-level hop "edge"`}},
		},
		{
			name: "top-level hop without name or nodes",
			yaml: base + "hops:\n- selector: {strategy: hash}\n",
			errs: []want{
				{10, 3, "hops[0].name", "is required"},
				{10, 3, "hops[0].nodes", "a hop needs at least one node"},
			},
		},
		{
			name: "duplicate top-level hop names",
			yaml: base + "hops:\n- name: h\n  nodes: [{addr: \":1\"}]\n- name: h\n  nodes: [{addr: \":1\"}]\n",
			errs: []want{{12, 9, "hops[1].name", `duplicate hop name "h" (first at line 10)`}},
		},
		{
			name: "hop unsupported key and bad netns",
			yaml: base + "hops:\n- name: h\n  interface: eth0\n  metadata:\n    netns: a/b\n  nodes: [{addr: \":1\"}]\n",
			errs: []want{
				{11, 3, "hops[0].interface", `"interface" is a GOST feature ebpfwd does not support`},
				{13, 12, "hops[0].metadata.netns", "relative path"},
			},
		},
		{
			name: "hop node connector and dialer types",
			yaml: base + "hops:\n- name: h\n  nodes:\n  - addr: 10.0.0.9:1080\n    connector:\n      type: socks5\n    dialer:\n      type: kcp\n",
			errs: []want{
				{14, 13, "hops[0].nodes[0].connector.type", `"socks5" is not supported by ebpfwd (supported: http)`},
				{16, 13, "hops[0].nodes[0].dialer.type", `"kcp" is not supported by ebpfwd (supported: tcp)`},
			},
		},
		{
			name: "hop node unsupported keys",
			yaml: base + "hops:\n- name: h\n  nodes:\n  - addr: 10.0.0.9:1080\n    dialer:\n      type: tcp\n      tls: {secure: true}\n    sockopts: {mark: 1}\n",
			errs: []want{
				{15, 7, "hops[0].nodes[0].dialer.tls", "GOST feature ebpfwd does not support"},
				{16, 5, "hops[0].nodes[0].sockopts", "GOST feature ebpfwd does not support"},
			},
		},
		{
			name: "connector auth without username",
			yaml: base + "hops:\n- name: h\n  nodes:\n  - addr: 10.0.0.9:1080\n    connector:\n      auth:\n        password: x\n",
			errs: []want{{15, 9, "hops[0].nodes[0].connector.auth.username", "is required when auth is set"}},
		},
		{
			name: "duplicate hop node names",
			yaml: base + "hops:\n- name: h\n  nodes:\n  - {name: n, addr: \":1\"}\n  - {name: n, addr: \":2\"}\n",
			errs: []want{{13, 5, "hops[0].nodes[1].name", `duplicate node name "n" (first at line 12)`}},
		},

		// log and metrics.
		{
			name: "log level and format invalid",
			yaml: base + "log:\n  level: trace\n  format: xml\n  rotation: {maxSize: 1}\n",
			errs: []want{
				{10, 10, "log.level", `invalid value "trace" (must be one of: debug, info, warn, error)`},
				{11, 11, "log.format", `invalid value "xml" (must be one of: text, json)`},
				{12, 3, "log.rotation", "GOST feature ebpfwd does not support"},
			},
		},
		{
			name: "metrics without addr and with bad path",
			yaml: base + "metrics:\n  path: metrics\n  auther: a\n",
			errs: []want{
				{10, 3, "metrics.addr", "is required"},
				{10, 9, "metrics.path", `must start with "/"`},
				{11, 3, "metrics.auther", "GOST feature ebpfwd does not support"},
			},
		},

		// YAML structure edge cases.
		{
			name: "merge key that contains itself",
			yaml: base + "log: &l\n  <<: *l\n",
			errs: []want{{10, 7, "log", "refers to a mapping that contains it"}},
		},
		{
			name: "merge of a scalar",
			yaml: base + "log:\n  <<: text\n",
			errs: []want{{10, 7, "log", "a merge key (<<) needs a mapping"}},
		},
		{
			name: "non-scalar key",
			yaml: base + "log:\n  [a]: b\n",
			errs: []want{{10, 3, "log", "a key must be a plain string, not a list"}},
		},

		{
			name: "http handler without auth on every address is refused",
			yaml: "services:\n- addr: :3128\n  handler: {type: http}\n",
			errs: []want{{3, 19, "services[0].handler.auth", "is an open proxy into everything netns.out reaches"}},
		},
		{
			name: "http handler with allowOpenProxy false is refused at the key",
			yaml: "services:\n- addr: 10.0.0.1:3128\n  handler:\n    type: http\n    metadata:\n      allowopenproxy: false\n",
			errs: []want{{6, 23, "services[0].handler.metadata.allowOpenProxy", "set handler.metadata.allowOpenProxy: true"}},
		},
		{
			name: "http handler metadata values are checked",
			yaml: "services:\n- addr: 127.0.0.1:3128\n  handler:\n    type: http\n    metadata: {allowOpenProxy: yes please, maxClients: -1, headerTimeout: soon}\n",
			errs: []want{{5, 32, "services[0].handler.metadata.allowOpenProxy", "must be true or false"},
				{5, 56, "services[0].handler.metadata.maxClients", "must not be negative"},
				{5, 75, "services[0].handler.metadata.headerTimeout", "invalid duration"}},
		},

		// Warnings only.
		{
			name: "unknown metadata keys warn",
			yaml: strings.Replace(base, "    type: tcp\n", "    type: tcp\n    metadata:\n      readTimeout: 1s\n", 1) +
				"  metadata:\n    netns.outt: ns2\n",
			warns: []want{
				{7, 7, "services[0].handler.metadata.readTimeout", `unknown metadata key "readTimeout" is ignored (ebpfwd reads here: proxyProtocol, readBufferSize, udp.bufferSize)`},
				{12, 5, "services[0].metadata.netns.outt", `(did you mean "netns.out"?)`},
			},
		},
		{
			name:  "auth on tcp handler warns",
			yaml:  strings.Replace(base, "    type: tcp\n", "    type: tcp\n    auth: {username: u}\n", 1),
			warns: []want{{6, 5, "services[0].handler.auth", `auth only applies to the http handler`}},
		},
		{
			name:  "forwarder on http handler warns",
			yaml:  strings.Replace(base, "type: tcp", "type: http\n    auth: {username: u, password: p}", 1),
			warns: []want{{7, 3, "services[0].forwarder", "forwarder is ignored"}},
		},
		{
			name: "http handler without auth on a loopback address: no warning",
			yaml: "services:\n- addr: \"[::1]:3128\"\n  handler: {type: http}\n",
		},
		{
			name: "http handler with auth on any address: no warning",
			yaml: "services:\n- addr: :3128\n  handler: {type: http, auth: {username: u, password: p}}\n",
		},
		{
			name: "http handler with allowOpenProxy on every address: no warning",
			yaml: "services:\n- addr: :3128\n  handler: {type: http, metadata: {allowOpenProxy: true, maxClients: 100, headerTimeout: 3s}}\n",
		},
		{
			name: "names and strings are bounded",
			yaml: "services:\n- name: " + strings.Repeat("n", 129) + "\n  addr: \"" + strings.Repeat("h", 4097) + ":80\"\n  handler: {type: tcp}\n  forwarder: {nodes: [{addr: 10.0.0.2:80}]}\n",
			errs: []want{{2, 9, "services[0].name", "name is 129 bytes long; at most 128"},
				{3, 9, "services[0].addr", "at most 4096"}},
		},
		{
			name:  "ttl on tcp listener warns",
			yaml:  base + "  listener:\n    metadata:\n      ttl: 10s\n",
			warns: []want{{11, 7, "services[0].listener.metadata.ttl", "ttl applies only to udp listeners"}},
		},
		{
			name:  "deprecated forwarder name warns",
			yaml:  strings.Replace(base, "    nodes:\n", "    name: fw\n    nodes:\n", 1),
			warns: []want{{7, 5, "services[0].forwarder.name", "deprecated"}},
		},
		{
			name:  "chain metadata warns",
			yaml:  base + "chains:\n- name: c\n  metadata: {foo: 1}\n  hops: [{nodes: [{addr: \":1\"}]}]\n",
			warns: []want{{11, 14, "chains[0].metadata.foo", "unknown metadata key"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkParse(t, tt.yaml, tt.errs, tt.warns) })
	}
}

// checkParse parses yaml and asserts exactly the wanted errors (none:
// a config) and warnings.
func checkParse(t *testing.T, yaml string, errs, warns []want) {
	t.Helper()
	cfg, gotWarns, err := Parse("gost.yaml", []byte(yaml))
	if len(errs) == 0 {
		if err != nil {
			t.Fatalf("unexpected error:\n%v", err)
		}
		if cfg == nil {
			t.Fatal("nil config without error")
		}
	} else {
		var list *Errors
		if !errors.As(err, &list) {
			t.Fatalf("error = %v (%T), want *Errors", err, err)
		}
		if cfg != nil {
			t.Error("config returned together with errors")
		}
		checkDiagnostics(t, "error", list.List, errs)
	}
	checkDiagnostics(t, "warning", gotWarns, warns)
}
