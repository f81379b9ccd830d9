package testutil

import (
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// NewNS skips the test unless it runs as root, then creates a namespace
// named prefix-<random> with lo up, deleted (and with it every link in it)
// in tb's cleanup, whether the test passed or not.
func NewNS(tb testing.TB, prefix string) *topo.NS {
	tb.Helper()
	RequireRoot(tb)
	ns, err := topo.CreateUnique(prefix)
	if err != nil {
		tb.Fatalf("create namespace: %v", err)
	}
	tb.Cleanup(func() {
		// Delete is a no-op for a namespace the test deleted itself.
		if err := ns.Delete(); err != nil {
			tb.Errorf("delete namespace %s: %v", ns.Name, err)
		}
	})
	return ns
}

// NewNSHandle is NewNS that also opens the namespace with open, which is
// netns.Parse: the handle makes sockets and runs code in the namespace.
// testutil cannot call netns.Parse itself, see the package comment.
func NewNSHandle[H any](tb testing.TB, prefix string, open func(name string) (H, error)) (*topo.NS, H) {
	tb.Helper()
	ns := NewNS(tb, prefix)
	h, err := open(ns.Name)
	if err != nil {
		tb.Fatalf("open namespace %s: %v", ns.Name, err)
	}
	return ns, h
}

// Veth links a and b with a veth pair, failing the test if it cannot; see
// topo.Veth. The pair goes with the namespaces NewNS made.
func Veth(tb testing.TB, a *topo.NS, aName, aCIDR string, b *topo.NS, bName, bCIDR string) {
	tb.Helper()
	if err := topo.Veth(a, aName, aCIDR, b, bName, bCIDR); err != nil {
		tb.Fatalf("veth: %v", err)
	}
}
