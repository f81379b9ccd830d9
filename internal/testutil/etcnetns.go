package testutil

import (
	"os"
	"path/filepath"
	"testing"
)

// WriteNSEtc writes /etc/netns/NAME/file, which `ip netns exec NAME` (and
// ebpfwd's resolver in NAME) uses instead of /etc/file, and removes the
// directory when the test ends: `ip netns del` leaves it behind.
func WriteNSEtc(tb testing.TB, name, file, content string) {
	tb.Helper()
	dir := filepath.Join("/etc/netns", name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			tb.Errorf("remove %s: %v", dir, err)
		}
	})
	if err := os.WriteFile(filepath.Join(dir, file), []byte(content), 0o644); err != nil {
		tb.Fatal(err)
	}
}
