package tc

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
)

// TestTwoSpellingsOneNamespace: services whose listen namespace is written
// as its `ip netns` name and as /proc/PID/ns/net of a process in it share
// one BPF instance, one pin directory and one attachment per interface.
func TestTwoSpellingsOneNamespace(t *testing.T) {
	testutil.RequireRoot(t)
	if err := probe(); err != nil {
		t.Skipf("kernel cannot run the tc datapath: %v", err)
	}
	gwTopo, gw := testutil.NewNSHandle(t, "tcid-gw", netns.Parse)
	nodeTopo, _ := testutil.NewNSHandle(t, "tcid-n", netns.Parse)
	if err := topo.Veth(gwTopo, "g0", "10.47.0.1/24", nodeTopo, "n0", "10.47.0.2/24"); err != nil {
		t.Fatal(err)
	}
	byProc := processIn(t, gw)

	instance := fmt.Sprintf("test-tcid-%d", os.Getpid())
	instanceDir := filepath.Join(loader.DefaultBPFFS, "ebpfwd", instance)
	t.Cleanup(func() { os.RemoveAll(instanceDir) })
	d := &Datapath{Instance: instance, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	var atts []datapath.Attachment
	t.Cleanup(func() {
		for _, a := range atts {
			a.Close()
		}
	})
	for i, ns := range []netns.NS{gw, byProc} {
		svc := datapath.Service{Name: fmt.Sprintf("s%d", i), Network: "tcp", ListenNS: ns, OutNS: ns,
			Nodes: []datapath.Node{testNode("n", "10.47.0.2:9000")}}
		listenAt(&svc, fmt.Sprintf("10.47.0.1:%d", 8000+i))
		a, err := d.Setup(context.Background(), svc)
		if err != nil {
			t.Fatalf("set up service in netns %s: %v", ns, err)
		}
		atts = append(atts, a)
	}
	if n := len(d.loaders); n != 1 {
		t.Fatalf("%d BPF instances for one namespace spelled two ways, want 1", n)
	}
	if atts[0].(*attachment).nl != atts[1].(*attachment).nl {
		t.Fatal("the two services got different namespace loaders")
	}
	if got := atts[0].(*attachment).nl.watch.interfaces(); !slices.Equal(got, []string{"g0"}) {
		t.Fatalf("program attached to %v, want g0 once", got)
	}
	entries, err := os.ReadDir(instanceDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("pin directories %v, want one for the one namespace", entries)
	}
	for _, a := range atts {
		if err := a.Close(); err != nil {
			t.Fatal(err)
		}
	}
	atts = nil
	if _, err := os.Stat(instanceDir); !os.IsNotExist(err) {
		t.Fatalf("instance pin directory after the last service closed: %v, want it gone", err)
	}
}

// processIn starts a process in ns and returns ns spelled as that
// process's /proc/PID/ns/net; the process ends with the test.
func processIn(t *testing.T, ns netns.NS) netns.NS {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+ns.Path(), "sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	byProc, err := netns.Parse(fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// nsenter enters the namespace after it starts: wait, bounded.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if same, err := ns.Same(byProc); err == nil && same {
			return byProc
		}
		if time.Now().After(deadline) {
			t.Fatal("the process never entered the namespace")
		}
	}
}

// TestSNATPortsReserved: while the program serves a namespace, its SNAT
// range is in the namespace's ip_local_reserved_ports (next to what was
// there), so the namespace's own connections never take a translated
// flow's port, whatever its ip_local_port_range; the last service's close
// restores the namespace's value.
func TestSNATPortsReserved(t *testing.T) {
	testutil.RequireRoot(t)
	if err := probe(); err != nil {
		t.Skipf("kernel cannot run the tc datapath: %v", err)
	}
	gwTopo, gw := testutil.NewNSHandle(t, "tcports-gw", netns.Parse)
	nodeTopo, _ := testutil.NewNSHandle(t, "tcports-n", netns.Parse)
	testutil.Veth(t, gwTopo, "g0", "10.48.0.1/24", nodeTopo, "n0", "10.48.0.2/24")
	// A busy gateway's tuning, and a reservation of the operator's own.
	if err := writeSysctl(gw, "/proc/sys/net/ipv4/ip_local_port_range", "1024 65000"); err != nil {
		t.Fatal(err)
	}
	if err := writeSysctl(gw, reservedPortsSysctl, "40000"); err != nil {
		t.Fatal(err)
	}
	instance := fmt.Sprintf("test-tcports-%d", os.Getpid())
	t.Cleanup(func() { os.RemoveAll(filepath.Join(loader.DefaultBPFFS, "ebpfwd", instance)) })
	d := &Datapath{Instance: instance, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	svc := datapath.Service{Name: "s", Network: "tcp", ListenNS: gw, OutNS: gw,
		Nodes: []datapath.Node{testNode("n", "10.48.0.2:9000")}}
	listenAt(&svc, "10.48.0.1:8000")
	a, err := d.Setup(context.Background(), svc)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			a.Close()
		}
	})
	got, err := readSysctl(gw, reservedPortsSysctl)
	if err != nil {
		t.Fatal(err)
	}
	if want := "1024-32767"; !strings.Contains(got, want) || !strings.Contains(got, "40000") {
		t.Fatalf("reserved ports while serving = %q, want %s and the operator's 40000", got, want)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	if got, err := readSysctl(gw, reservedPortsSysctl); err != nil || got != "40000" {
		t.Fatalf("reserved ports after the last service closed = %q, %v; want the namespace's 40000", got, err)
	}
	if _, err := os.Stat(portStateFile(instance, mustID(t, gw))); !os.IsNotExist(err) {
		t.Fatalf("state file left after restoring: %v", err)
	}
}

func mustID(t *testing.T, ns netns.NS) netns.ID {
	t.Helper()
	id, err := ns.ID()
	if err != nil {
		t.Fatal(err)
	}
	return id
}
