package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// configMapDir lays a file out as a Kubernetes ConfigMap volume does:
// dir/config.yaml -> ..data/config.yaml, ..data -> a timestamped
// directory; update swaps ..data atomically to a new directory, as the
// kubelet does.
type configMapDir struct {
	t   *testing.T
	dir string
	n   int
}

func newConfigMapDir(t *testing.T, content string) *configMapDir {
	c := &configMapDir{t: t, dir: t.TempDir()}
	c.update(content)
	if err := os.Symlink(filepath.Join("..data", "config.yaml"), filepath.Join(c.dir, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *configMapDir) path() string { return filepath.Join(c.dir, "config.yaml") }

func (c *configMapDir) update(content string) {
	c.n++
	version := filepath.Join(c.dir, "..2026_12_02_00_00_0"+string(rune('0'+c.n)))
	if err := os.Mkdir(version, 0o755); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(version, "config.yaml"), []byte(content), 0o644); err != nil {
		c.t.Fatal(err)
	}
	tmp := filepath.Join(c.dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(version), tmp); err != nil {
		c.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(c.dir, "..data")); err != nil {
		c.t.Fatal(err)
	}
}

func TestConfigWatchChanged(t *testing.T) {
	cm := newConfigMapDir(t, "a: 1\n")
	w, err := newConfigWatch(cm.path())
	if err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name    string
		do      func()
		changed bool
		err     bool
	}{
		{"nothing happened", func() {}, false, false},
		{"the ConfigMap changed", func() { cm.update("a: 2\n") }, true, false},
		{"seen once only", func() {}, false, false},
		{"a new version with the same content", func() { cm.update("a: 2\n") }, false, false},
		{"the file is gone", func() {
			if err := os.Remove(filepath.Join(cm.dir, "..data")); err != nil {
				t.Fatal(err)
			}
		}, false, true},
		{"back with other content", func() { cm.update("a: 3\n") }, true, false},
	}
	for _, s := range steps {
		s.do()
		changed, err := w.changed()
		if changed != s.changed || (err != nil) != s.err {
			t.Fatalf("%s: changed %v, err %v; want changed %v, an error %v", s.name, changed, err, s.changed, s.err)
		}
	}
}

// TestWatchConfigReloads runs the loop: a ConfigMap update reloads once.
func TestWatchConfigReloads(t *testing.T) {
	cm := newConfigMapDir(t, "a: 1\n")
	w, err := newConfigWatch(cm.path())
	if err != nil {
		t.Fatal(err)
	}
	reloads := make(chan struct{}, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchConfig(ctx, w, 5*time.Millisecond, func() error { reloads <- struct{}{}; return nil },
			slog.New(slog.NewTextHandler(io.Discard, nil)))
	}()
	defer func() {
		cancel()
		<-done
	}()
	cm.update("a: 2\n")
	select {
	case <-reloads:
	case <-time.After(10 * time.Second):
		t.Fatal("no reload 10s after the ConfigMap changed")
	}
	cancel()
	<-done
	if n := len(reloads); n != 0 {
		t.Fatalf("%d more reloads after the one change", n)
	}
}
