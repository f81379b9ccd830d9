package tc

import (
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

func TestNodesReachable(t *testing.T) {
	listen := testutil.NewNS(t, "tc-reach-l")
	out := testutil.NewNS(t, "tc-reach-o")
	testutil.Veth(t, listen, "l0", "10.41.0.1/24", out, "o0", "10.41.0.2/24")
	tests := []struct {
		name    string
		outNS   string
		node    string
		wantErr string
	}{
		{name: "same namespace needs no check", outNS: listen.Path(), node: "10.99.0.1:80"},
		{name: "node is an address of netns.out", outNS: out.Path(), node: "10.41.0.2:80"},
		{name: "node beyond netns.out", outNS: out.Path(), node: "10.99.0.1:80", wantErr: "is not an address of netns.out"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := NodesReachable(datapath.Service{
				Name: "s", ListenNS: listen.Path(), OutNS: tt.outNS,
				Nodes: []datapath.Node{{Name: "n", Addr: tt.node}},
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
