package tc

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
)

func TestNodesReachable(t *testing.T) {
	testutil.RequireRoot(t)
	listenTopo, listen := testutil.NewNSHandle(t, "tc-reach-l", netns.Parse)
	outTopo, out := testutil.NewNSHandle(t, "tc-reach-o", netns.Parse)
	if err := topo.Veth(listenTopo, "l0", "10.41.0.1/24", outTopo, "o0", "10.41.0.2/24"); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		outNS   netns.NS
		node    string
		wantErr string
	}{
		{name: "same namespace needs no check", outNS: listen, node: "10.99.0.1:80"},
		{name: "node is an address of netns.out", outNS: out, node: "10.41.0.2:80"},
		{name: "node beyond netns.out", outNS: out, node: "10.99.0.1:80", wantErr: "is not an address of netns.out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := nodesReachable(datapath.Service{
				Name: "s", ListenNS: listen, OutNS: tt.outNS,
				Nodes: []datapath.Node{testNode("n", tt.node)},
			})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatal(err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
		})
	}
}

// TestApplicableRefusesLimiters: tc cannot enforce GOST limiters, and
// says so as a fallback reason (not "never applies"), so auto counts the
// fallback and datapath: tc with a limiter is refused.
func TestApplicableRefusesLimiters(t *testing.T) {
	svc := datapath.Service{
		Name: "limited", Network: "tcp", Addr: "10.0.0.1:80", Listen: netip.MustParseAddrPort("10.0.0.1:80"),
		Nodes:    []datapath.Node{{Name: "n", Addr: "10.0.1.1:80", IP: netip.MustParseAddrPort("10.0.1.1:80")}},
		Limiters: []string{"climiter ten (concurrent connections)"},
	}
	err := applicable(svc)
	if err == nil || !strings.Contains(err.Error(), "climiter ten") || errors.Is(err, datapath.ErrNeverApplies) {
		t.Fatalf("applicable = %v, want a fallback reason naming the climiter", err)
	}
	svc.Limiters = nil
	if err := applicable(svc); err != nil {
		t.Fatalf("without the limiter: %v", err)
	}
}
