package main

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/ebpfwd/ebpfwd/daemon"
)

// configWatch notices that the configuration file says something new, for
// `ebpfwd run --watch-config`: a Kubernetes ConfigMap volume updates a
// file by switching the symlink ..data to a new directory, which events
// on the file itself do not show (inotify watches the old inode), so the
// watch compares content, read through the symlinks, every interval.
type configWatch struct {
	path string
	sum  [sha256.Size]byte // what the file said when last seen
}

// newConfigWatch starts from the file's present content.
func newConfigWatch(path string) (*configWatch, error) {
	w := &configWatch{path: path}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("watch config %s: %w", path, err)
	}
	w.sum = sha256.Sum256(data)
	return w, nil
}

// changed reports whether the file's content differs from what it was
// when last seen, and remembers it. A file that cannot be read (a
// ConfigMap mid-update, a file being replaced) is an error and counts as
// unchanged: the content is compared again next time.
func (w *configWatch) changed() (bool, error) {
	data, err := os.ReadFile(w.path)
	if err != nil {
		return false, fmt.Errorf("watch config %s: %w", w.path, err)
	}
	sum := sha256.Sum256(data)
	if sum == w.sum {
		return false, nil
	}
	w.sum = sum
	return true, nil
}

// watchConfig polls w every interval until ctx is done and calls reload
// when the content changed. A reload that is refused is not retried for
// the same content (the daemon logged why and keeps the previous
// configuration): the next change, or SIGHUP, tries again.
func watchConfig(ctx context.Context, w *configWatch, every time.Duration, reload func() error, logger *slog.Logger) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		changed, err := w.changed()
		if err != nil {
			logger.Warn("configuration watch: cannot read the file; trying again", "err", err)
			continue
		}
		if !changed {
			continue
		}
		logger.Info("configuration file changed: reloading", "config", w.path)
		if err := reload(); errors.Is(err, daemon.ErrNotRunning) {
			return
		}
	}
}
