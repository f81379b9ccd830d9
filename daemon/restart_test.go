package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/userspace"
)

// recordingDatapath stands in for tc: it counts the calls the daemon makes
// around a restart, and never carries a service.
type recordingDatapath struct {
	kept, finished int
}

func (*recordingDatapath) Kind() datapath.Kind { return datapath.TC }
func (*recordingDatapath) Rank() int           { return 10 }
func (*recordingDatapath) Applies(datapath.Service) error {
	return errors.New("carries nothing")
}
func (*recordingDatapath) Probe() error { return nil }
func (*recordingDatapath) Setup(context.Context, datapath.Service) (datapath.Attachment, error) {
	return nil, errors.New("not used")
}
func (r *recordingDatapath) KeepForRestart() { r.kept++ }
func (r *recordingDatapath) FinishSetup() error {
	r.finished++
	return nil
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// TestRunRestart: Options.Restart ends Run with ErrRestart after asking the
// datapaths to keep their kernel state, unless a stop arrives during the
// drain, which wins; a plain stop never keeps anything. Every run finishes
// setup once.
func TestRunRestart(t *testing.T) {
	tests := []struct {
		name     string
		restart  bool
		stopToo  bool // cancel the context while a connection drains
		wantErr  error
		wantKept int
	}{
		{name: "restart", restart: true, wantErr: ErrRestart, wantKept: 1},
		{name: "stop", wantErr: nil, wantKept: 0},
		{name: "stop during the restart's drain wins", restart: true, stopToo: true, wantErr: nil, wantKept: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			target, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer target.Close()
			go func() {
				for {
					c, err := target.Accept()
					if err != nil {
						return
					}
					go func() { _, _ = io.Copy(c, c); c.Close() }()
				}
			}()
			addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
			path := filepath.Join(t.TempDir(), "restart.yaml")
			yaml := fmt.Sprintf("services:\n- name: svc\n  addr: %q\n  handler: {type: tcp}\n  listener: {type: tcp}\n"+
				"  forwarder:\n    nodes:\n    - {name: n0, addr: %q}\n  metadata: {datapath: userspace}\n", addr, target.Addr())
			if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			cfg, _, err := config.Load(path)
			if err != nil {
				t.Fatal(err)
			}
			ready := filepath.Join(t.TempDir(), "ready")
			restart := make(chan struct{})
			logger := slog.New(slog.NewTextHandler(io.Discard, nil))
			rec := &recordingDatapath{}
			d, err := New(cfg, Options{DrainTimeout: 5 * time.Second, ReadyFile: ready, Restart: restart,
				Datapaths: datapath.NewSet(userspace.Datapath{Logger: logger}, rec)}, logger)
			if err != nil {
				t.Fatal(err)
			}

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			runCtx, stop := context.WithCancel(ctx)
			defer stop()
			done := make(chan error, 1)
			go func() { done <- d.Run(runCtx) }()
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, err := os.Stat(ready); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("daemon not ready within 5s")
				}
			}
			// A connection in flight holds the drain open.
			c, err := net.DialTimeout("tcp", addr, 2*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			if tt.restart {
				close(restart)
			} else {
				stop()
			}
			if tt.stopToo {
				time.Sleep(100 * time.Millisecond) // into the drain
				stop()
			}
			c.Close()
			select {
			case err := <-done:
				if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
					t.Errorf("Run = %v, want %v", err, tt.wantErr)
				}
			case <-ctx.Done():
				t.Fatal("Run did not return")
			}
			if rec.kept != tt.wantKept || rec.finished != 1 {
				t.Errorf("KeepForRestart called %d times (want %d), FinishSetup %d (want 1)", rec.kept, tt.wantKept, rec.finished)
			}
		})
	}
}
