package tc

import (
	"bytes"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// testNode is a node as config gives it: the address as written, and as a
// value when it is an IP literal.
func testNode(name, addr string) datapath.Node {
	ip, _ := netip.ParseAddrPort(addr)
	return datapath.Node{Name: name, Addr: addr, IP: ip}
}

// listenAt sets a service's listen address as config does.
func listenAt(s *datapath.Service, addr string) {
	s.Addr = addr
	s.Listen, _ = netip.ParseAddrPort(addr)
}

func TestApplicable(t *testing.T) {
	base := datapath.Service{Name: "s", Network: "tcp", Nodes: []datapath.Node{testNode("n", "10.0.1.2:8080")}}
	listenAt(&base, "10.0.0.1:80")
	tests := []struct {
		name    string
		mutate  func(*datapath.Service)
		wantErr string // "" = applicable
	}{
		{name: "direct tcp", mutate: func(*datapath.Service) {}},
		{name: "udp kept alive", mutate: func(s *datapath.Service) { s.Network, s.PacketKeepAlive = "udp", true }},
		{name: "udp one-reply sessions", mutate: func(s *datapath.Service) { s.Network = "udp" }, wantErr: "set keepAlive: true"},
		{name: "udp read buffer", mutate: func(s *datapath.Service) {
			s.Network, s.PacketKeepAlive, s.PacketReadSize = "udp", true, 1500
		}, wantErr: "readBufferSize cuts longer datagrams"},
		{name: "accepts a PROXY header", mutate: func(s *datapath.Service) { s.AcceptProxyHeader = true }, wantErr: "reads a PROXY protocol header"},
		{name: "sends a PROXY header", mutate: func(s *datapath.Service) { s.SendProxyHeader = 2 }, wantErr: "cannot carry one"},
		{name: "ipv6", mutate: func(s *datapath.Service) {
			listenAt(s, "[fd00::1]:80")
			s.Nodes[0] = testNode("n", "[fd00:1::2]:8080")
		}},
		{name: "hash", mutate: func(s *datapath.Service) { s.Strategy = "hash" }},
		{name: "chained", mutate: func(s *datapath.Service) { s.Chained = true }, wantErr: "proxy hops"},
		{name: "http proxy", mutate: func(s *datapath.Service) { s.Proxy = true }, wantErr: "http proxy"},
		{name: "wildcard listen", mutate: func(s *datapath.Service) { listenAt(s, ":80") }, wantErr: "not a single IP"},
		{name: "unspecified listen", mutate: func(s *datapath.Service) { listenAt(s, "0.0.0.0:80") }, wantErr: "never crosses an interface"},
		{name: "loopback listen", mutate: func(s *datapath.Service) { listenAt(s, "127.0.0.1:80") }, wantErr: "never crosses an interface"},
		{name: "hostname node", mutate: func(s *datapath.Service) { s.Nodes[0] = testNode("n", "db.internal:5432") }, wantErr: "not an IP address"},
		{name: "mixed families", mutate: func(s *datapath.Service) { s.Nodes[0] = testNode("n", "[fd00::2]:8080") }, wantErr: "IP version"},
		{name: "fifo", mutate: func(s *datapath.Service) { s.Strategy = "fifo" }, wantErr: `"fifo" is not implemented in BPF`},
		{name: "no nodes", mutate: func(s *datapath.Service) { s.Nodes = nil }, wantErr: "no forward nodes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := base
			svc.Nodes = append([]datapath.Node(nil), base.Nodes...)
			tt.mutate(&svc)
			err := applicable(svc)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("not applicable: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestLoaderServiceOverSpliceLink(t *testing.T) {
	listenMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	outMAC := net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
	link := &splice.Link{
		Name: "ebs0123456789ab",
		Listen: splice.End{Ifindex: 7, MAC: listenMAC,
			Addr4: netip.MustParseAddr("169.254.200.1"), Addr6: netip.MustParseAddr("fd65:6270:6677::1")},
		Out: splice.End{Ifindex: 3, MAC: outMAC,
			Addr4: netip.MustParseAddr("169.254.200.2"), Addr6: netip.MustParseAddr("fd65:6270:6677::2")},
	}
	noV6 := *link
	noV6.Listen.Addr6 = netip.Addr{}
	tests := []struct {
		name     string
		addr     string
		node     string
		link     *splice.Link
		wantSNAT string // "" with link nil: left to the route lookup
		wantErr  string
	}{
		{name: "same namespace", addr: "10.0.0.1:80", node: "10.0.1.11:8000"},
		{name: "IPv4 over the link", addr: "10.0.0.1:80", node: "10.0.1.11:8000", link: link, wantSNAT: "169.254.200.1"},
		{name: "IPv6 over the link", addr: "[fd00::1]:80", node: "[fd00:1::11]:8000", link: link, wantSNAT: "fd65:6270:6677::1"},
		{name: "IPv6 over a link without IPv6", addr: "[fd00::1]:80", node: "[fd00:1::11]:8000", link: &noV6, wantErr: "no address of"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			svc := datapath.Service{Name: "s", Network: "tcp", Nodes: []datapath.Node{testNode("n", tt.node)}}
			listenAt(&svc, tt.addr)
			got, err := loaderService(svc, tt.link)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			n := got.Nodes[0]
			if tt.link == nil {
				if n.Egress != nil || n.SNAT.IsValid() {
					t.Fatalf("node %+v: want no egress and no SNAT", n)
				}
				return
			}
			if n.SNAT != netip.MustParseAddr(tt.wantSNAT) {
				t.Errorf("SNAT %s, want %s", n.SNAT, tt.wantSNAT)
			}
			if n.Egress == nil || n.Egress.Ifindex != 7 || !bytes.Equal(n.Egress.SrcMAC, listenMAC) || !bytes.Equal(n.Egress.DstMAC, outMAC) {
				t.Errorf("egress %+v, want ifindex 7 from %s to %s", n.Egress, listenMAC, outMAC)
			}
		})
	}
}
