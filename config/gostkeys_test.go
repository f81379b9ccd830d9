package config

import (
	"errors"
	"testing"
	"time"
)

const udpBase = `services:
- name: u
  addr: ":53"
  handler:
    type: udp
  listener:
    type: udp
    metadata:
`

func TestGOSTMetadataValues(t *testing.T) {
	udp := func(lines string) string { return udpBase + lines + "  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n" }
	tests := []struct {
		name  string
		yaml  string
		check func(t *testing.T, c *Config)
	}{
		{"service proxyProtocol 1", base + "  metadata: {proxyProtocol: 1}\n", func(t *testing.T, c *Config) {
			if c.Services[0].ProxyProtocol != 1 {
				t.Fatalf("ProxyProtocol = %d", c.Services[0].ProxyProtocol)
			}
		}},
		{"service proxyprotocol as a string, any case", base + "  metadata: {PROXYPROTOCOL: \"2\"}\n", func(t *testing.T, c *Config) {
			if c.Services[0].ProxyProtocol != 2 {
				t.Fatalf("ProxyProtocol = %d", c.Services[0].ProxyProtocol)
			}
		}},
		{"handler proxyProtocol", "services:\n- addr: :80\n  handler: {type: tcp, metadata: {proxyProtocol: 2}}\n  forwarder: {nodes: [{addr: 10.0.0.2:80}]}\n",
			func(t *testing.T, c *Config) {
				if c.Services[0].Handler.ProxyProtocol != 2 {
					t.Fatalf("Handler.ProxyProtocol = %d", c.Services[0].Handler.ProxyProtocol)
				}
			}},
		{"udp defaults: one-reply sessions, 5s, whole datagrams", udp(""), func(t *testing.T, c *Config) {
			l := c.Services[0].Listener
			if l.KeepAlive || l.TTL != 5*time.Second || l.ReadBufferSize != 0 {
				t.Fatalf("listener = %+v", l)
			}
		}},
		{"udp keepAlive, ttl, readBufferSize", udp("      keepAlive: true\n      ttl: 30s\n      readBufferSize: 1500\n"), func(t *testing.T, c *Config) {
			l := c.Services[0].Listener
			if !l.KeepAlive || l.TTL != 30*time.Second || l.ReadBufferSize != 1500 {
				t.Fatalf("listener = %+v", l)
			}
		}},
		{"GOST's second spellings", udp("      keepalive: \"1\"\n      keepalive.ttl: 7s\n      udp.bufferSize: 512\n"), func(t *testing.T, c *Config) {
			l := c.Services[0].Listener
			if !l.KeepAlive || l.TTL != 7*time.Second || l.ReadBufferSize != 512 {
				t.Fatalf("listener = %+v", l)
			}
		}},
		{"a buffer of the largest datagram or more cuts nothing", udp("      readBufferSize: 65536\n"), func(t *testing.T, c *Config) {
			if n := c.Services[0].Listener.ReadBufferSize; n != 0 {
				t.Fatalf("ReadBufferSize = %d", n)
			}
		}},
		{"hop proxyProtocol reaches its nodes, a node's own wins", `services:
- addr: :80
  handler: {type: tcp, chain: c}
  forwarder: {nodes: [{addr: 10.0.0.2:80}]}
chains:
- name: c
  hops:
  - name: h
    metadata: {proxyProtocol: 1}
    nodes:
    - {name: a, addr: 10.0.1.1:8080}
    - {name: b, addr: 10.0.1.2:8080, metadata: {proxyProtocol: 2}}
    - {name: z, addr: 10.0.1.3:8080, metadata: {proxyProtocol: 0}}
`, func(t *testing.T, c *Config) {
			nodes := c.Chains[0].Hops[0].Nodes
			if nodes[0].ProxyProtocol != 1 || nodes[1].ProxyProtocol != 2 || nodes[2].ProxyProtocol != 0 {
				t.Fatalf("node versions %d %d %d, want 1 2 0", nodes[0].ProxyProtocol, nodes[1].ProxyProtocol, nodes[2].ProxyProtocol)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, warns, err := Parse("gost.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range warns {
				t.Errorf("unexpected warning %s", w)
			}
			tt.check(t, c)
		})
	}
}

func TestGOSTMetadataDiagnostics(t *testing.T) {
	tests := []struct {
		name        string
		yaml        string
		errs, warns []want
	}{
		{name: "proxyProtocol 3", yaml: base + "  metadata:\n    proxyProtocol: 3\n",
			errs: []want{{10, 20, "services[0].metadata.proxyProtocol", "must be 1 or 2"}}},
		{name: "proxyProtocol not a number", yaml: base + "  metadata:\n    proxyProtocol: v2\n",
			errs: []want{{10, 20, "services[0].metadata.proxyProtocol", "must be a whole number"}}},
		{name: "keepAlive not a bool", yaml: udpBase + "      keepAlive: sometimes\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n",
			errs: []want{{9, 18, "services[0].listener.metadata.keepAlive", "must be true or false"}}},
		{name: "negative buffer", yaml: udpBase + "      readBufferSize: -1\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n",
			errs: []want{{9, 23, "services[0].listener.metadata.readBufferSize", "must not be negative"}}},
		{name: "both spellings of ttl", yaml: udpBase + "      ttl: 1s\n      keepalive.ttl: 2s\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n",
			errs: []want{{10, 7, "services[0].listener.metadata.keepalive.ttl", "another spelling of ttl"}}},
		{name: "udp handler cannot send a PROXY header",
			yaml: "services:\n- addr: :53\n  handler:\n    type: udp\n    metadata: {proxyProtocol: 1}\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n",
			errs: []want{{5, 31, "services[0].handler.metadata.proxyProtocol", "a udp handler cannot send a PROXY protocol header"}}},
		{name: "udp listener reads no PROXY header",
			yaml:  "services:\n- addr: :53\n  handler: {type: udp}\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n  metadata:\n    proxyProtocol: 1\n",
			warns: []want{{6, 5, "services[0].metadata.proxyProtocol", "a udp listener reads no PROXY protocol header"}}},
		{name: "udp keys on a tcp listener",
			yaml: base + "  listener:\n    metadata:\n      keepAlive: true\n      readBufferSize: 100\n",
			warns: []want{{11, 7, "services[0].listener.metadata.keepAlive", "applies only to udp listeners"},
				{12, 7, "services[0].listener.metadata.readBufferSize", "applies only to udp listeners"}}},
		{name: "http handler sends no PROXY header",
			yaml:  "services:\n- addr: 127.0.0.1:3128\n  handler:\n    type: http\n    metadata: {proxyProtocol: 1}\n",
			warns: []want{{5, 16, "services[0].handler.metadata.proxyProtocol", "the http handler sends no PROXY protocol header"}}},
		{name: "handler readBufferSize changes nothing",
			yaml:  "services:\n- addr: :53\n  handler:\n    type: udp\n    metadata: {readBufferSize: 600}\n  forwarder: {nodes: [{addr: 10.0.0.2:53}]}\n",
			warns: []want{{5, 16, "services[0].handler.metadata.readBufferSize", "only the datagram it sniffs"}}},
		{name: "forward node proxyProtocol",
			yaml:  "services:\n- addr: :80\n  handler: {type: tcp}\n  forwarder:\n    nodes:\n    - addr: 10.0.0.2:80\n      metadata: {proxyProtocol: 1}\n",
			warns: []want{{7, 18, "services[0].forwarder.nodes[0].metadata.proxyProtocol", "a forward node's proxyProtocol sends nothing"}}},
		{name: "proxyProtocol on a later hop",
			yaml: "services:\n- addr: :80\n  handler: {type: tcp, chain: c}\n  forwarder: {nodes: [{addr: 10.0.0.2:80}]}\n" +
				"chains:\n- name: c\n  hops:\n  - nodes: [{addr: 10.0.1.1:8080}]\n  - metadata: {proxyProtocol: 2}\n    nodes: [{addr: 10.0.2.1:8080}]\n",
			warns: []want{{9, 5, "chains[0].hops[1]", "sent only to the first hop's nodes"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, warns, err := Parse("gost.yaml", []byte(tt.yaml))
			var list *Errors
			switch {
			case len(tt.errs) == 0 && err != nil:
				t.Fatalf("unexpected error:\n%v", err)
			case len(tt.errs) > 0 && !errors.As(err, &list):
				t.Fatalf("error = %v, want *Errors", err)
			}
			if list != nil {
				checkDiagnostics(t, "error", list.List, tt.errs)
			}
			checkDiagnostics(t, "warning", warns, tt.warns)
		})
	}
}
