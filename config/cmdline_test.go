package config

import (
	"strings"
	"testing"
)

// TestCommandLine: GOST's -L/-F forms become the configuration GOST would
// run, and URLs ebpfwd cannot run are refused naming the part at fault.
func TestCommandLine(t *testing.T) {
	tests := []struct {
		name    string
		cl      CommandLine
		check   func(*testing.T, *Config)
		wantErr string
	}{
		{name: "forward with netns and netns.out",
			cl: CommandLine{Services: []string{"tcp://:8000/10.0.0.2:7000,10.0.0.3:7000?netns=ns1&netns.out=ns2"}},
			check: func(t *testing.T, c *Config) {
				s := c.Services[0]
				if s.Addr != ":8000" || s.NetNS.Spec() != "ns1" || s.NetNSOut.Spec() != "ns2" || s.Handler.Type != "tcp" ||
					len(s.Forwarder.Nodes) != 2 || s.Forwarder.Nodes[1].Addr != "10.0.0.3:7000" || s.Forwarder.Nodes[1].Name != "target-1" {
					t.Fatalf("service %+v", s)
				}
			}},
		{name: "udp with a listener ttl",
			cl: CommandLine{Services: []string{"udp://:53/10.0.0.53:53?ttl=30s"}},
			check: func(t *testing.T, c *Config) {
				if s := c.Services[0]; s.Listener.Type != "udp" || s.Listener.TTL.String() != "30s" {
					t.Fatalf("service %+v", s)
				}
			}},
		{name: "http proxy with auth, two services, a two-hop chain, debug",
			cl: CommandLine{Services: []string{"http://u:p@127.0.0.1:8080", "tcp://:8000/10.0.0.2:80"},
				Hops: []string{"http://a:b@10.0.1.1:8080?netns=ns2", "http+tcp://10.0.2.1:3128"}, Debug: true},
			check: func(t *testing.T, c *Config) {
				if len(c.Services) != 2 || c.Services[0].Handler.Auth == nil || c.Services[0].Handler.Auth.Password != "p" {
					t.Fatalf("services %+v", c.Services)
				}
				if c.Services[1].Handler.Chain != "chain-0" || len(c.Chains) != 1 || len(c.Chains[0].Hops) != 2 {
					t.Fatalf("chains %+v", c.Chains)
				}
				h := c.Chains[0].Hops[0]
				if h.NetNS.Spec() != "ns2" || h.Nodes[0].Connector.Auth == nil || h.Nodes[0].Connector.Auth.Username != "a" {
					t.Fatalf("first hop %+v", h)
				}
				if c.Log.Level != "debug" {
					t.Fatalf("log level %q, want debug", c.Log.Level)
				}
			}},
		{name: "limiters as GOST's options",
			cl: CommandLine{Services: []string{"tcp://:8000/10.0.0.2:80?climiter=10&rlimiter=2.5&limiter.in=1MB&limiter.conn.out=64KB"}},
			check: func(t *testing.T, c *Config) {
				l := c.Services[0].Limits
				if l.Conns == nil || l.Conns.Rules[0].N != 10 || l.Rate == nil || l.Rate.Rules[0].N != 2.5 ||
					l.Traffic == nil || len(l.Traffic.Rules) != 2 || l.Traffic.Rules[0].In != 1<<20 || l.Traffic.Rules[1].Out != 64<<10 {
					t.Fatalf("limits %+v", describeLimits(l))
				}
			}},
		{name: "no -L", cl: CommandLine{}, wantErr: "no service"},
		{name: "unsupported handler", cl: CommandLine{Services: []string{"socks5://:1080"}}, wantErr: `scheme "socks5"`},
		{name: "unsupported listener", cl: CommandLine{Services: []string{"tcp+tls://:443/10.0.0.2:80"}}, wantErr: `listener "tls"`},
		{name: "forward without target", cl: CommandLine{Services: []string{"tcp://:8000"}}, wantErr: "no target"},
		{name: "proxy with targets", cl: CommandLine{Services: []string{"http://:8080/10.0.0.2:80"}}, wantErr: "takes no targets"},
		{name: "hop that is no HTTP proxy", cl: CommandLine{Services: []string{"tcp://:8000/10.0.0.2:80"},
			Hops: []string{"socks5://10.0.1.1:1080"}}, wantErr: `-F "socks5://10.0.1.1:1080": scheme "socks5"`},
		{name: "no port", cl: CommandLine{Services: []string{"tcp:8000"}}, wantErr: "want scheme://"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc, err := tt.cl.YAML()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			cfg, _, err := Parse("command line", doc)
			if err != nil {
				t.Fatalf("the YAML of the command line does not parse: %v\n%s", err, doc)
			}
			tt.check(t, cfg)
		})
	}
}
