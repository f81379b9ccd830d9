package relay

import (
	"crypto/sha256"
	"testing"
)

// TestSplicePipeAllowance: with the pipe allowance taken, a stream still
// moves every byte both ways, through a buffer instead of a pipe; with a
// pipe free for each direction it splices again. Not parallel: the allowance is the
// process's.
func TestSplicePipeAllowance(t *testing.T) {
	SetSplicePipes(1)
	t.Cleanup(func() { SetSplicePipes(0) })
	const size = 3 << 20 // several chunks each way
	run := func() {
		t.Helper()
		rig := startRelay(t, t.Context(), 0, nil)
		up, down := randomBytes(t, size), randomBytes(t, size)
		served := make(chan [32]byte, 1)
		go func() {
			sum, err := exchange(rig.server, down)
			if err != nil {
				t.Error(err)
			}
			served <- sum
		}()
		gotDown, err := exchange(rig.app, up)
		if err != nil {
			t.Fatal(err)
		}
		if err := rig.wait(t); err != nil {
			t.Fatalf("relay: %v", err)
		}
		if gotUp := <-served; gotUp != sha256.Sum256(up) || gotDown != sha256.Sum256(down) {
			t.Fatal("bytes corrupted")
		}
	}

	if !takePipe() {
		t.Fatal("the only pipe of a fresh allowance is taken")
	}
	_, _, before := SplicePipes()
	run()
	_, inUse, copied := SplicePipes()
	if copied == before {
		t.Error("no chunk was copied through a buffer although the allowance was taken")
	}
	if inUse != 1 {
		t.Errorf("%d pipes in use during a buffered transfer, want only the test's 1", inUse)
	}
	givePipe()

	// A pipe for each direction: nothing is copied.
	SetSplicePipes(2)
	_, _, before = SplicePipes()
	run()
	if _, inUse, copied := SplicePipes(); inUse != 0 || copied != before {
		t.Errorf("with a pipe free: %d in use after the transfer, %d chunks copied, want 0 and 0", inUse, copied-before)
	}
}
