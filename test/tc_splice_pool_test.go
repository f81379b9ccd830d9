package test

import (
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestTCSplicePoolFlag: `run --splice-pool4` moves the splice link's
// addresses, which the node sees as the source of forwarded flows.
func TestTCSplicePoolFlag(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newSpliceOutTopo(t, "e2e-splp")
	d := e2e.Start(t, "tc-splice-pool", e2e.Config(spliceOut, tp.vars),
		e2e.Options{Args: []string{"--splice-pool4", "169.254.77.0/24"}})
	if err := e2e.Exchange(t, tp.client, "10.33.1.1:8000", 64<<10, 15*time.Second); err != nil {
		t.Fatal(err)
	}
	if srcs := tp.target.Sources(); len(srcs) != 1 || srcs[0] != "169.254.77.1" {
		t.Fatalf("target saw %v, want the splice link's listen end 169.254.77.1 from the configured pool", srcs)
	}
	requireCleanExit(t, d, tp.a, tp.b)
}
