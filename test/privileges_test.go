package test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestWithoutPrivileges runs ebpfwd with every capability dropped (uid 0
// kept, so it can still read its files): it must name what is missing and
// exit non-zero instead of failing deep inside a namespace switch.
func TestWithoutPrivileges(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) is not installed")
	}
	ns := testutil.NewNS(t, "e2e-priv")
	cfg := filepath.Join(t.TempDir(), "gost.yaml")
	yaml := e2e.Config(`services:
- name: svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:9000"}
  metadata: {netns: $NS}
`, map[string]string{"NS": ns.Name})
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, verb := range []string{"run", "check"} {
		t.Run(verb, func(t *testing.T) {
			var stderr bytes.Buffer
			cmd := exec.Command("setpriv", "--inh-caps=-all", "--bounding-set=-all", e2e.Bin, verb, cfg)
			cmd.Stderr = &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			if err == nil || !errors.As(err, &exit) || exit.ExitCode() != 1 {
				t.Fatalf("ebpfwd %s without capabilities: %v, want exit status 1; stderr:\n%s", verb, err, &stderr)
			}
			if !strings.Contains(stderr.String(), "CAP_SYS_ADMIN") {
				t.Fatalf("stderr does not name the missing capability:\n%s", &stderr)
			}
		})
	}
}
