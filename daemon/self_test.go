package daemon

import (
	"net/netip"
	"testing"

	"github.com/ebpfwd/ebpfwd/config"
)

func TestIsOwnListener(t *testing.T) {
	svc := func(addr, network string) *service {
		return &service{cfg: &config.Service{Addr: addr, Listener: config.Listener{Type: network}}}
	}
	d := &Daemon{services: []*service{
		svc("127.0.0.1:8080", "tcp"),
		svc(":3128", "tcp"),
		svc("127.0.0.1:5353", "udp"), // a proxy dials TCP only
	}}
	tests := []struct {
		addr string
		want bool
	}{
		{"127.0.0.1:8080", true},
		{"127.0.0.2:8080", false},
		{"127.0.0.1:3128", true}, // every address: loopback included
		{"[::1]:3128", true},
		{"0.0.0.0:3128", true},
		{"192.0.2.1:3128", false}, // TEST-NET: not an address of this host
		{"127.0.0.1:5353", false},
		{"127.0.0.1:9", false},
	}
	for _, tt := range tests {
		// The daemon's own namespace: the services listen in it too.
		if got := d.isOwnListener(d.services[0].outNS, netip.MustParseAddrPort(tt.addr)); got != tt.want {
			t.Errorf("isOwnListener(%s) = %v, want %v", tt.addr, got, tt.want)
		}
	}
}
