package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/config"
)

// preflightTimeout bounds the bind probes of one check.
const preflightTimeout = 10 * time.Second

// Preflight checks what `run` would refuse that the configuration alone
// cannot tell, so that `ebpfwd check` (the systemd unit's ExecStartPre)
// fails where the start would: every listen address must be free in its
// namespace (a bind, released at once), and the log output writable. It
// assumes the namespaces exist (CheckNamespaces reports those that do not,
// and their services are skipped here). Every problem is returned.
func Preflight(cfg *config.Config) error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), preflightTimeout)
	defer cancel()
	for i, s := range cfg.Services {
		if s == nil || s.NetNS.Check() != nil {
			continue
		}
		field := fmt.Sprintf("services[%d].addr", i)
		var err error
		switch s.Listener.Type {
		case "udp":
			pc, lerr := s.NetNS.ListenPacket(ctx, "udp", s.Addr)
			if err = lerr; err == nil {
				pc.Close()
			}
		default:
			l, lerr := s.NetNS.Listen(ctx, "tcp", s.Addr)
			if err = lerr; err == nil {
				l.Close()
			}
		}
		if err != nil {
			hint := ""
			if errors.Is(err, unix.EADDRINUSE) {
				hint = " (is this instance running already?)"
			}
			errs = append(errs, located(cfg, s.Pos, field, fmt.Errorf("cannot listen there%s: %w", hint, err)))
		}
	}
	if err := writableOutput(cfg.Log.Output); err != nil {
		errs = append(errs, fmt.Errorf("%s: log.output: %w", cfg.Path, err))
	}
	return errors.Join(errs...)
}

// writableOutput checks that the log output (a file path, or one of the
// stream names) can be opened for appending, without creating it.
func writableOutput(out string) error {
	switch out {
	case "", "stderr", "stdout", "none":
		return nil
	}
	st, err := os.Stat(out)
	switch {
	case err == nil && st.IsDir():
		return fmt.Errorf("%s is a directory, not a file to log to", out)
	case err == nil:
		if err := unix.Access(out, unix.W_OK); err != nil {
			return fmt.Errorf("%s is not writable: %w", out, err)
		}
		return nil
	case !errors.Is(err, os.ErrNotExist):
		return err
	}
	dir := filepath.Dir(out)
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return fmt.Errorf("%s cannot be created: its directory %s does not exist", out, dir)
	}
	if err := unix.Access(dir, unix.W_OK); err != nil {
		return fmt.Errorf("%s cannot be created in %s: %w", out, dir, err)
	}
	return nil
}
