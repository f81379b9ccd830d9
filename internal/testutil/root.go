package testutil

import (
	"os"
	"testing"
)

// IsRoot reports whether the process may create network namespaces, links
// and BPF programs; for a TestMain that skips expensive setup otherwise.
func IsRoot() bool { return os.Geteuid() == 0 }

// RequireRoot skips the test unless it runs as root.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if !IsRoot() {
		tb.Skip("needs root: creates network namespaces and links, or loads BPF programs; run the tests as root (euid 0)")
	}
}
