package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
)

// ControlDir holds one control socket per running instance.
const ControlDir = "/run/ebpfwd"

// FlowsPath is the control socket's listing of live flows (JSON).
const FlowsPath = "/v1/flows"

// ReloadPath reloads the daemon's configuration file (POST); the answer is
// a ReloadAnswer (JSON), with status 200 when the reload was applied.
const ReloadPath = "/v1/reload"

// ReloadAnswer is the control socket's answer to a reload.
type ReloadAnswer struct {
	Result string `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

var instanceName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// ValidateInstance checks an instance name, which names the control socket
// (and the eBPF pin directory) of one daemon.
func ValidateInstance(name string) error {
	if !instanceName.MatchString(name) {
		return fmt.Errorf("instance name %q: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", name)
	}
	return nil
}

// ControlSocket is the path of an instance's control socket.
func ControlSocket(instance string) string {
	return filepath.Join(ControlDir, instance+".sock")
}

// listenControl opens the instance's control socket. A socket left by a
// crashed daemon is removed; one that still answers means the instance is
// running, and starting it twice is refused.
func listenControl(instance string) (net.Listener, error) {
	if err := os.MkdirAll(ControlDir, 0o700); err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	path := ControlSocket(instance)
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("instance %q is already running (control socket %s answers); give this one another --instance", instance, path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("control socket: remove stale %s: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	// Run removes the path itself, at once, when it closes the socket:
	// left to Close, the unlink would come whenever the server gets to
	// it, and after an upgrade's new process bound the same path it
	// would remove the new process's socket.
	if ul, ok := l.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false)
	}
	// It lists every client and reloads the daemon: root's only.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return l, nil
}

// Flows lists every live flow of every service whose datapath can list them.
func (d *Daemon) Flows() []datapath.Flow {
	var out []datapath.Flow
	for _, s := range d.current() {
		if fl, ok := s.att.(datapath.FlowLister); ok {
			out = append(out, fl.Flows()...)
		}
	}
	return out
}

// serveControl answers the control socket until ctx is done.
func (d *Daemon) serveControl(ctx context.Context, l net.Listener) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+FlowsPath, func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(w).Encode(d.Flows()); err != nil {
			d.log.Debug("control: write flows", "err", err)
		}
	})
	mux.HandleFunc("POST "+ReloadPath, func(w http.ResponseWriter, _ *http.Request) {
		res, err := d.ReloadFile()
		answer, status := ReloadAnswer{Result: res.String()}, http.StatusOK
		if err != nil {
			answer, status = ReloadAnswer{Error: err.Error()}, http.StatusUnprocessableEntity
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		if err := json.NewEncoder(w).Encode(answer); err != nil {
			d.log.Debug("control: write reload answer", "err", err)
		}
	})
	serveProfiles(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		d.log.Error("control socket stopped", "err", err)
	}
}
