package test

import (
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestHostnameResolvedInDialingNamespace: a node given by name is resolved
// inside netns.out as `ip netns exec` would resolve it there, through
// /etc/netns/NAME/hosts, which the daemon's own namespace knows nothing of.
func TestHostnameResolvedInDialingNamespace(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	c := testutil.NewNS(t, "e2e-res-c")
	out := testutil.NewNS(t, "e2e-res-o")
	e2e.EchoIn(t, out, "127.0.0.7:9000")

	hosts := "# written by TestHostnameResolvedInDialingNamespace\n127.0.0.7 target.ebpfwd.test target\n"
	testutil.WriteNSEtc(t, out.Name, "hosts", hosts)

	yaml := e2e.Config(`services:
- name: svc
  addr: 127.0.0.1:8000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "target.ebpfwd.test:9000"}
  metadata: {netns: $C, netns.out: $OUT}
`, map[string]string{"C": c.Name, "OUT": out.Name})
	e2e.Start(t, "resolve", yaml, e2e.Options{})
	if err := e2e.Exchange(t, c, "127.0.0.1:8000", 256<<10, 10*time.Second); err != nil {
		t.Fatalf("through a node named in /etc/netns/%s/hosts: %v", out.Name, err)
	}
}
