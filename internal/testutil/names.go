package testutil

import (
	"crypto/rand"
	"encoding/hex"
	"testing"
)

// UniqueName returns prefix-<8 random hex digits>: a name (an ebpfwd
// instance, a namespace that must not exist) that neither a parallel test
// nor a leftover of a crashed run shares.
func UniqueName(tb testing.TB, prefix string) string {
	tb.Helper()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		tb.Fatalf("random name suffix: %v", err)
	}
	return prefix + "-" + hex.EncodeToString(b)
}
