package loader

import (
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
)

// TestLoaderLogsThroughConfigLogger: what the loader does on its own
// (cleaning the pin directory, releasing for a restart, taking a previous
// run's maps over) reaches Config.Logger, not the process-wide default.
func TestLoaderLogsThroughConfigLogger(t *testing.T) {
	testutil.RequireRoot(t)
	var buf syncbuf.Buffer
	cfg := Config{Instance: testutil.UniqueName(t, "test"), Logger: slog.New(slog.NewTextHandler(&buf, nil))}
	probe := cfg
	if err := probe.setDefaults(); err != nil {
		t.Fatal(err)
	}
	// An entry that is neither a map nor a link pin (bpffs takes no
	// regular files, a directory will do): Load removes it.
	if err := os.MkdirAll(filepath.Join(probe.pinDir(), "junk"), 0o700); err != nil {
		t.Fatal(err)
	}
	// This instance is the test's own; whatever a failure leaves goes.
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(probe.pinDir())) })

	first, err := Load(cfg)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if err := first.Release(); err != nil {
		t.Fatalf("Release: %v", err)
	}
	second, err := Load(cfg)
	if err != nil {
		t.Fatalf("Load after Release: %v", err)
	}
	if err := second.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}

	for _, want := range []string{
		"removed unknown entries from the pin directory", // loader.go, claimPinDir
		"tc datapath released for restart",               // restart.go
		"reusing the pinned maps of a previous run",      // loader.go, load
	} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("Config.Logger did not get %q; it got:\n%s", want, buf.String())
		}
	}
}

func TestConfigLoggerDefault(t *testing.T) {
	own := slog.New(slog.DiscardHandler)
	tests := []struct {
		name string
		cfg  Config
		want *slog.Logger
	}{
		{"nil means the default at the time", Config{}, slog.Default()},
		{"a logger of its own", Config{Logger: own}, own},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.cfg.logger(); got != tt.want {
				t.Errorf("logger() = %p, want %p", got, tt.want)
			}
		})
	}
}
