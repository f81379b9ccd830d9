package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// tcGateway is client ns -> gateway ns (the service, datapath tc) -> server
// ns, the layout the tc datapath exists for.
const tcGateway = `services:
- name: tc-tcp
  addr: "10.31.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "10.31.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
- name: tc-udp
  addr: "10.31.1.1:8001"
  handler: {type: udp}
  listener: {type: udp, metadata: {keepAlive: true}} # tc keeps a flow: sessions kept alive
  forwarder:
    nodes:
    - {name: server-0, addr: "10.31.2.2:9001"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`

// conns runs `ebpfwd conns` for a daemon.
func conns(t *testing.T, d *e2e.Daemon) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(e2e.Bin, "conns", "--instance", d.Instance)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("ebpfwd conns: %v\n%s", err, &stderr)
	}
	return stdout.String()
}

// tcxPrograms counts the tcx ingress programs on a gateway interface.
func tcxPrograms(t *testing.T, gw netNSHandle, ifname string) int {
	t.Helper()
	var n int
	err := gw.Do(func() error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		res, err := link.QueryPrograms(link.QueryOptions{Target: iface.Index, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		n = len(res.Programs)
		return nil
	})
	if err != nil {
		t.Fatalf("query tcx programs on %s: %v", ifname, err)
	}
	return n
}

type netNSHandle interface{ Do(func() error) error }

func TestTCDatapath(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-tc-c")
	gw := testutil.NewNS(t, "e2e-tc-g")
	server := testutil.NewNS(t, "e2e-tc-s")
	testutil.Veth(t, client, "c0", "10.31.1.2/24", gw, "g0", "10.31.1.1/24")
	testutil.Veth(t, gw, "g1", "10.31.2.1/24", server, "s0", "10.31.2.2/24")
	// A second client network: its flows leave the gateway towards the
	// node from the same SNAT address as the first client's.
	client2 := testutil.NewNS(t, "e2e-tc-c2")
	testutil.Veth(t, client2, "c0", "10.31.3.2/24", gw, "g2", "10.31.3.1/24")
	if err := client2.IP("route", "add", "10.31.1.0/24", "via", "10.31.3.1"); err != nil {
		t.Fatal(err)
	}
	// Forwarding stays off in the gateway: the program redirects, the
	// gateway's stack never routes these packets.
	target := e2e.EchoIn(t, server, "10.31.2.2:9000")
	e2e.UDPEchoIn(t, server, "10.31.2.2:9001")

	d := e2e.Start(t, "tc", e2e.Config(tcGateway, map[string]string{"GW": gw.Name}), e2e.Options{})
	gwNS := e2e.Handle(t, gw)
	for _, ifname := range []string{"g0", "g1", "g2"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 1 {
			t.Fatalf("%d tcx programs on %s, want 1", n, ifname)
		}
	}

	t.Run("a held connection is a kernel flow", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := e2e.DialFrom(ctx, t, client, "tcp", "10.31.1.1:8000")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, make([]byte, 4)); err != nil {
			t.Fatal(err)
		}
		out := conns(t, d)
		flow := regexp.MustCompile(`(?m)^tc-tcp\s+tc\s+tcp\s+` + regexp.QuoteMeta(c.LocalAddr().String()) + `\s+server-0\s+10\.31\.2\.2:9000\s+established`)
		if !flow.MatchString(out) {
			t.Fatalf("conns does not list the connection as a tc flow:\n%s", out)
		}
		if regexp.MustCompile(`(?m)^tc-tcp\s+userspace`).MatchString(out) {
			t.Fatalf("the connection reached the userspace listener:\n%s", out)
		}
		// Its age and bytes are the kernel's own: 4 bytes each way.
		var flows []struct {
			Client  string
			Started time.Time
			Up      uint64 `json:"bytes_up"`
			Down    uint64 `json:"bytes_down"`
		}
		raw, err := exec.Command(e2e.Bin, "conns", "--json", "--instance", d.Instance).Output()
		if err != nil || json.Unmarshal(raw, &flows) != nil {
			t.Fatalf("conns --json: %v\n%s", err, raw)
		}
		found := false
		for _, f := range flows {
			if f.Client != c.LocalAddr().String() {
				continue
			}
			found = true
			if f.Up != 4 || f.Down != 4 {
				t.Errorf("kernel flow bytes up %d, down %d; want 4 and 4", f.Up, f.Down)
			}
			if age := time.Since(f.Started); age < 0 || age > time.Minute {
				t.Errorf("kernel flow age %v, want the few seconds since it began", age)
			}
		}
		if !found {
			t.Errorf("conns --json lists no flow of %s:\n%s", c.LocalAddr(), raw)
		}
		// The node sees the gateway's address on its side (SNAT).
		if srcs := target.Sources(); len(srcs) == 0 || srcs[len(srcs)-1] != "10.31.2.1" {
			t.Fatalf("target saw %v, want the gateway's 10.31.2.1", srcs)
		}
	})

	t.Run("1000 concurrent flows byte-exact", func(t *testing.T) {
		const flows, size = 1000, 64 << 10
		var wg sync.WaitGroup
		errs := make(chan error, flows)
		for i := range flows {
			wg.Go(func() {
				if err := e2e.Exchange(t, client, "10.31.1.1:8000", size, 60*time.Second); err != nil {
					errs <- fmt.Errorf("flow %d: %w", i, err)
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("two clients with the same source port", func(t *testing.T) {
		// Both connect from port 30000 at once; towards the node both
		// flows come from the gateway's one address, so the program must
		// give them different SNAT ports or replies would cross. The port
		// is below the clients' ephemeral range, so that no connection of
		// an earlier subtest (one in TIME_WAIT, say) can hold it.
		var wg sync.WaitGroup
		errs := make(chan error, 2)
		for _, ns := range []netNSHandle{e2e.Handle(t, client), e2e.Handle(t, client2)} {
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				var c net.Conn
				err := ns.Do(func() error {
					var err error
					d := net.Dialer{LocalAddr: &net.TCPAddr{Port: 30000}}
					c, err = d.DialContext(ctx, "tcp", "10.31.1.1:8000")
					return err
				})
				if err == nil {
					err = peer.Exchange(ctx, c, 1<<20)
				}
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
	})

	t.Run("udp", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c, err := e2e.DialFrom(ctx, t, client, "udp", "10.31.1.1:8001")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := peer.UDPExchange(ctx, c, 200, 1400); err != nil {
			t.Fatal(err)
		}
		if out := conns(t, d); !regexp.MustCompile(`(?m)^tc-udp\s+tc\s+udp\s+` + regexp.QuoteMeta(c.LocalAddr().String())).MatchString(out) {
			t.Fatalf("conns does not list the UDP flow as a tc flow:\n%s", out)
		}
	})

	t.Run("a client inside the listen namespace gets the listener", func(t *testing.T) {
		// Its packets never cross an interface, so only the socket can
		// serve them.
		if err := e2e.Exchange(t, gw, "10.31.1.1:8000", 256<<10, 15*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	if code, err := d.Stop(); err != nil || code != 0 {
		t.Fatalf("daemon stop: status %d, %v", code, err)
	}
	for _, ifname := range []string{"g0", "g1", "g2"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 0 {
			t.Errorf("%d tcx programs left on %s after exit", n, ifname)
		}
	}
	if entries, err := os.ReadDir("/sys/fs/bpf/ebpfwd"); err == nil {
		for _, e := range entries {
			if regexp.MustCompile(regexp.QuoteMeta(d.Instance)).MatchString(e.Name()) {
				t.Errorf("pin directory %s left after exit", e.Name())
			}
		}
	}
}

// TestTCWideLocalPortRange: a gateway tuned with ip_local_port_range
// 1024-65000 (its own connections may take any of those ports) still
// serves: the SNAT ports are reserved in the namespace while the daemon
// runs, so the listener's own dials to the node and the node probes never
// collide with translated flows; the node stays healthy; and the
// namespace's sysctls are as they were once the daemon is gone.
func TestTCWideLocalPortRange(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-tcpr-c")
	gw := testutil.NewNS(t, "e2e-tcpr-g")
	server := testutil.NewNS(t, "e2e-tcpr-s")
	testutil.Veth(t, client, "c0", "10.37.1.2/24", gw, "g0", "10.37.1.1/24")
	testutil.Veth(t, gw, "g1", "10.37.2.1/24", server, "s0", "10.37.2.2/24")
	gwNS := e2e.Handle(t, gw)
	sysctl := func(path string) string {
		var value string
		if err := gwNS.Do(func() error {
			b, err := os.ReadFile(path)
			value = strings.Join(strings.Fields(string(b)), " ")
			return err
		}); err != nil {
			t.Fatalf("read %s in %s: %v", path, gw.Name, err)
		}
		return value
	}
	const portRange, reserved = "/proc/sys/net/ipv4/ip_local_port_range", "/proc/sys/net/ipv4/ip_local_reserved_ports"
	if err := gwNS.Do(func() error { return os.WriteFile(portRange, []byte("1024 65000\n"), 0o644) }); err != nil {
		t.Fatalf("set the port range: %v", err)
	}
	e2e.EchoIn(t, server, "10.37.2.2:9000")
	yaml := e2e.Config(`services:
- name: tc-wide
  addr: "10.37.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "10.37.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`, map[string]string{"GW": gw.Name})
	d := e2e.Start(t, "tc-wide", yaml, e2e.Options{})
	if got := sysctl(reserved); !strings.Contains(got, "1024-32767") {
		t.Fatalf("reserved ports while serving: %q, want the SNAT range 1024-32767", got)
	}
	// Translated flows from outside, and the listener's own dials (a
	// client inside the gateway namespace), at the same time.
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for i := range 400 {
		from := client
		if i%4 == 0 {
			from = gw
		}
		wg.Go(func() {
			if err := e2e.Exchange(t, from, "10.37.1.1:8000", 8<<10, 30*time.Second); err != nil {
				errs <- fmt.Errorf("connection %d from %s: %w", i, from.Name, err)
			}
		})
		if i%20 == 19 {
			wg.Wait() // 20 at a time
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	time.Sleep(2500 * time.Millisecond) // several health syncs (500ms) after the load
	if out := d.Output.String(); strings.Contains(out, "node marked failed by its flows") || strings.Contains(out, "node probe failed") ||
		strings.Contains(out, "no node reachable") {
		t.Fatalf("the node was judged dead under a wide local port range:\n%s", out)
	}
	if code, err := d.Stop(); err != nil || code != 0 {
		t.Fatalf("stop: %d, %v", code, err)
	}
	if got := sysctl(reserved); got != "" {
		t.Fatalf("reserved ports after the daemon stopped: %q, want the namespace's own (none)", got)
	}
	if got := sysctl(portRange); got != "1024 65000" {
		t.Fatalf("port range after the daemon stopped: %q, want 1024 65000 as set", got)
	}
}
