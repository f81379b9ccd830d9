package daemon

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The control socket serves Go's profiles beside its own paths.
func TestControlSocketServesProfiles(t *testing.T) {
	path := filepath.Join(t.TempDir(), "control.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	d := &Daemon{log: slog.New(slog.DiscardHandler)}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() { defer close(done); d.serveControl(ctx, l) }()
	t.Cleanup(func() { cancel(); <-done })

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", path)
		},
	}}
	for _, tc := range []struct{ path, want string }{
		{ProfilePath + "goroutine?debug=1", "goroutine profile:"},
		{ProfilePath + "heap?debug=1", "heap profile:"},
		{ProfilePath + "cmdline", ""},
		{FlowsPath, "null"},
	} {
		t.Run(tc.path, func(t *testing.T) {
			resp, err := client.Get("http://ebpfwd" + tc.path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), tc.want) {
				t.Fatalf("GET %s: %s, body %.80q; want 200 with %q", tc.path, resp.Status, body, tc.want)
			}
		})
	}
}
