// Package topotest gives a test its own network namespace, removed (with
// its links) when the test ends, even on failure.
package topotest

import (
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
)

// NewNS creates a namespace named prefix-<random>, with lo up, deleted in
// tb's cleanup, and returns it with a handle for making sockets in it.
func NewNS(tb testing.TB, prefix string) (*topo.NS, netns.NS) {
	tb.Helper()
	ns, err := topo.CreateUnique(prefix)
	if err != nil {
		tb.Fatalf("create namespace: %v", err)
	}
	tb.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			tb.Errorf("delete namespace %s: %v", ns.Name, err)
		}
	})
	h, err := netns.Parse(ns.Name)
	if err != nil {
		tb.Fatalf("netns.Parse(%s): %v", ns.Name, err)
	}
	return ns, h
}
