package tc

import (
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/userspace/netns"
)

func TestApplicable(t *testing.T) {
	base := datapath.Service{
		Name: "s", Network: "tcp", Addr: "10.0.0.1:80", ListenNS: "/var/run/netns/gw", OutNS: "/var/run/netns/gw",
		Nodes: []datapath.Node{{Name: "n", Addr: "10.0.1.2:8080"}},
	}
	tests := []struct {
		name    string
		mutate  func(*datapath.Service)
		wantErr string // "" = applicable
	}{
		{name: "direct tcp", mutate: func(*datapath.Service) {}},
		{name: "udp", mutate: func(s *datapath.Service) { s.Network = "udp" }},
		{name: "ipv6", mutate: func(s *datapath.Service) {
			s.Addr, s.Nodes[0].Addr = "[fd00::1]:80", "[fd00:1::2]:8080"
		}},
		{name: "hash", mutate: func(s *datapath.Service) { s.Strategy = "hash" }},
		{name: "chained", mutate: func(s *datapath.Service) { s.Chained = true }, wantErr: "proxy hops"},
		{name: "netns.out elsewhere", mutate: func(s *datapath.Service) { s.OutNS = "" }, wantErr: "netns.out differs"},
		{name: "wildcard listen", mutate: func(s *datapath.Service) { s.Addr = ":80" }, wantErr: "not a single IP"},
		{name: "unspecified listen", mutate: func(s *datapath.Service) { s.Addr = "0.0.0.0:80" }, wantErr: "never crosses an interface"},
		{name: "loopback listen", mutate: func(s *datapath.Service) { s.Addr = "127.0.0.1:80" }, wantErr: "never crosses an interface"},
		{name: "hostname node", mutate: func(s *datapath.Service) { s.Nodes[0].Addr = "db.internal:5432" }, wantErr: "not an IP address"},
		{name: "mixed families", mutate: func(s *datapath.Service) { s.Nodes[0].Addr = "[fd00::2]:8080" }, wantErr: "IP version"},
		{name: "fifo", mutate: func(s *datapath.Service) { s.Strategy = "fifo" }, wantErr: `"fifo" is not implemented in BPF`},
		{name: "no nodes", mutate: func(s *datapath.Service) { s.Nodes = nil }, wantErr: "no forward nodes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := base
			svc.Nodes = append([]datapath.Node(nil), base.Nodes...)
			tt.mutate(&svc)
			err := Applicable(svc)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("not applicable: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestPinName(t *testing.T) {
	d := &Datapath{Instance: "gw"}
	tests := []struct{ spec, want string }{
		{"", "gw"},
		{"ns1", "gw-ns1"},
		{"/var/run/netns/ns1", "gw-ns1"},
		{"/proc/42/ns/net", "gw-proc_42_ns_net"},
	}
	for _, tt := range tests {
		ns, err := netns.Parse(tt.spec)
		if err != nil {
			t.Fatal(err)
		}
		if got := d.pinName(ns); got != tt.want {
			t.Errorf("pinName(%q) = %q, want %q", tt.spec, got, tt.want)
		}
	}
}
