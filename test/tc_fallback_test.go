package test

import (
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// TestTCSetupRefusedFallsBack: the kernel refuses the tc datapath's setup
// (here its pin directory cannot be made: a pinned map sits where the
// instance's directory goes). A service that asked for auto falls back to
// the userspace relay with a warning and the fallback metric, and serves
// byte-exact; the userspace service beside it is unharmed; nothing is left
// attached.
func TestTCSetupRefusedFallsBack(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	tp := newRestartTopo(t, "e2e-fbk")
	client, gw := tp.client, tp.gw
	instance, opts := fixedInstance("tc-fallback")
	opts.In = gw
	blocker := filepath.Join("/sys/fs/bpf/ebpfwd", instance)
	if err := os.MkdirAll(filepath.Dir(blocker), 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "e2e_blocker", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(blocker); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(blocker); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Errorf("remove the blocking pin %s: %v", blocker, err)
		}
	})
	d := e2e.Start(t, "tc-fallback", e2e.Config(`services:
- name: wants-tc
  addr: "10.34.1.1:8000"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-0, addr: "10.34.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW}
- name: relay
  addr: "10.34.1.1:8001"
  handler: {type: tcp}
  forwarder: {nodes: [{name: server-0, addr: "10.34.2.2:9000"}]}
  metadata: {netns: $GW, netns.out: $GW, datapath: userspace}
metrics:
  addr: 127.0.0.1:9100
`, map[string]string{"GW": gw.Name}), opts)
	d.Instance = instance
	d.WaitLog(t, time.Second, "kernel datapath could not be set up: falling back to the userspace relay", "wants-tc")
	scrape := metricsIn(t, gw, "127.0.0.1:9100")
	waitCount(t, scrape, `ebpfwd_datapath_fallback{service="wants-tc",reason="setup_failed"}`, 1)
	for _, addr := range []string{"10.34.1.1:8000", "10.34.1.1:8001"} {
		if err := e2e.Exchange(t, client, addr, 1<<20, trafficTimeout); err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
	}
	h := holdConn(t, client, "10.34.1.1:8000")
	if out := conns(t, d); !regexp.MustCompile(`(?m)^wants-tc\s+userspace\s+tcp\s+` + regexp.QuoteMeta(h.c.LocalAddr().String()) + `\s`).MatchString(out) {
		t.Fatalf("conns does not list %s on the relay:\n%s", h.c.LocalAddr(), out)
	}
	gwNS := e2e.Handle(t, gw)
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 0 {
			t.Errorf("%d tcx programs on %s after the refused setup", n, ifname)
		}
	}
}
