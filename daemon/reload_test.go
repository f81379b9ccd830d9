package daemon

import (
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
)

// TestEqualIgnoringPos: a service is unchanged when only where it stands in
// the file moved; any value that changes is a change.
func TestEqualIgnoringPos(t *testing.T) {
	base := func() *config.Service {
		return &config.Service{Name: "s", Addr: ":80", Pos: config.Pos{Line: 3, Column: 3},
			Handler:   config.Handler{Type: "tcp"},
			Forwarder: &config.Forwarder{Nodes: []*config.Node{{Name: "n", Addr: "10.0.0.1:80", Pos: config.Pos{Line: 9}}}},
			Metadata:  map[string]any{"netns": "a"}, IdleTimeout: time.Minute}
	}
	tests := []struct {
		name   string
		mutate func(*config.Service)
		same   bool
	}{
		{"identical", func(*config.Service) {}, true},
		{"moved in the file", func(s *config.Service) { s.Pos.Line = 30; s.Forwarder.Nodes[0].Pos.Line = 40 }, true},
		{"node address", func(s *config.Service) { s.Forwarder.Nodes[0].Addr = "10.0.0.2:80" }, false},
		{"node added", func(s *config.Service) {
			s.Forwarder.Nodes = append(s.Forwarder.Nodes, &config.Node{Name: "m", Addr: "10.0.0.3:80"})
		}, false},
		{"metadata value", func(s *config.Service) { s.Metadata["netns"] = "b" }, false},
		{"duration", func(s *config.Service) { s.IdleTimeout = time.Hour }, false},
		{"forwarder gone", func(s *config.Service) { s.Forwarder = nil }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, b := base(), base()
			tt.mutate(b)
			if got := equalIgnoringPos(a, b); got != tt.same {
				t.Fatalf("equalIgnoringPos = %v, want %v", got, tt.same)
			}
		})
	}
}
