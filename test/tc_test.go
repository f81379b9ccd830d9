package test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
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
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
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

// portTopo is the topology of the port-range tests: client -> gateway ->
// server (an echo node at 10.N.2.2:9000), and a tc service at
// 10.N.1.1:8000 in the gateway whose netns.out is the gateway, so that the
// listener's own dials to the node leave from the address tc translates to.
type portTopo struct {
	client, gw, server *topo.NS
	gwNS               netns.NS
	node               *e2e.AcceptLog
	addr, yaml         string
}

const portRangeSysctl, reservedPortsSysctl = "/proc/sys/net/ipv4/ip_local_port_range", "/proc/sys/net/ipv4/ip_local_reserved_ports"

func newPortTopo(t *testing.T, name string, subnet int) *portTopo {
	p := &portTopo{
		client: testutil.NewNS(t, "e2e-"+name+"-c"),
		gw:     testutil.NewNS(t, "e2e-"+name+"-g"),
		server: testutil.NewNS(t, "e2e-"+name+"-s"),
		addr:   fmt.Sprintf("10.%d.1.1:8000", subnet),
	}
	testutil.Veth(t, p.client, "c0", fmt.Sprintf("10.%d.1.2/24", subnet), p.gw, "g0", fmt.Sprintf("10.%d.1.1/24", subnet))
	testutil.Veth(t, p.gw, "g1", fmt.Sprintf("10.%d.2.1/24", subnet), p.server, "s0", fmt.Sprintf("10.%d.2.2/24", subnet))
	p.gwNS = e2e.Handle(t, p.gw)
	p.node = e2e.EchoIn(t, p.server, fmt.Sprintf("10.%d.2.2:9000", subnet))
	p.yaml = e2e.Config(`services:
- name: $NAME
  addr: "$ADDR"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "$NODE"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`, map[string]string{"NAME": name, "ADDR": p.addr, "NODE": fmt.Sprintf("10.%d.2.2:9000", subnet), "GW": p.gw.Name})
	return p
}

// sysctl reads one of the gateway's sysctls, blanks collapsed.
func (p *portTopo) sysctl(t *testing.T, path string) string {
	t.Helper()
	var value string
	if err := p.gwNS.Do(func() error {
		b, err := os.ReadFile(path)
		value = strings.Join(strings.Fields(string(b)), " ")
		return err
	}); err != nil {
		t.Fatalf("read %s in %s: %v", path, p.gw.Name, err)
	}
	return value
}

func (p *portTopo) setSysctl(t *testing.T, path, value string) {
	t.Helper()
	if err := p.gwNS.Do(func() error { return os.WriteFile(path, []byte(value+"\n"), 0o644) }); err != nil {
		t.Fatalf("set %s in %s: %v", path, p.gw.Name, err)
	}
}

// nodePorts counts the connections the node saw from source ports lo-hi
// and from others.
func (p *portTopo) nodePorts(lo, hi uint16) (in, out int) {
	for _, r := range p.node.Remotes() {
		if port := netip.MustParseAddrPort(r).Port(); port >= lo && port <= hi {
			in++
		} else {
			out++
		}
	}
	return in, out
}

// TestTCWideLocalPortRange: a gateway tuned with ip_local_port_range
// 1024-65000 (its own connections may take any of those ports) still
// serves: the SNAT ports are reserved in the namespace while the daemon
// runs, next to the operator's own, so the listener's own dials to the
// node and the node probes never collide with translated flows. A burst
// of 2000 short connections, a tenth of them dialed inside the gateway
// (the listener's relay), all complete, byte-exact; the node sees every
// translated flow on a SNAT port and every local dial above them; the node
// stays healthy; and the namespace's sysctls are as they were once the
// daemon is gone, after SIGTERM and after SIGKILL, a restart and a stop.
func TestTCWideLocalPortRange(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	p := newPortTopo(t, "tcpr", 37)
	// A busy gateway's tuning, and a port the operator reserved.
	p.setSysctl(t, portRangeSysctl, "1024 65000")
	p.setSysctl(t, reservedPortsSysctl, "40000")
	wantAsSet := func(when string) {
		t.Helper()
		if got := p.sysctl(t, reservedPortsSysctl); got != "40000" {
			t.Fatalf("reserved ports %s: %q, want the operator's 40000", when, got)
		}
		if got := p.sysctl(t, portRangeSysctl); got != "1024 65000" {
			t.Fatalf("port range %s: %q, want 1024 65000 as set", when, got)
		}
	}
	wantReserved := func(when string) {
		t.Helper()
		if got := p.sysctl(t, reservedPortsSysctl); got != "1024-32767,40000" {
			t.Fatalf("reserved ports %s: %q, want the SNAT range 1024-32767 and the operator's 40000", when, got)
		}
	}
	instance, opts := fixedInstance("tc-wide")
	d := e2e.Start(t, "tc-wide", p.yaml, opts)
	d.Instance = instance
	wantReserved("while serving")

	// Translated flows from outside, and the listener's own dials (a
	// client inside the gateway namespace), at the same time.
	const conns, concurrent, localEvery = 2000, 50, 10
	var wg sync.WaitGroup
	errs := make(chan error, conns)
	for i := range conns {
		from := p.client
		if i%localEvery == 0 {
			from = p.gw
		}
		wg.Go(func() {
			if err := e2e.Exchange(t, from, p.addr, 1<<10, 30*time.Second); err != nil {
				errs <- fmt.Errorf("connection %d from %s: %w", i, from.Name, err)
			}
		})
		if i%concurrent == concurrent-1 {
			wg.Wait()
		}
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if failed++; failed <= 5 {
			t.Error(err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d connections failed", failed, conns)
	}
	// The node saw the translated flows on SNAT ports and the relay's own
	// dials on the namespace's ports above them: none crossed.
	if snat, local := p.nodePorts(1024, 32767); snat != conns-conns/localEvery || local != conns/localEvery {
		t.Errorf("the node saw %d connections from SNAT ports and %d from others; want %d translated by tc and %d dialed by the listener",
			snat, local, conns-conns/localEvery, conns/localEvery)
	}
	time.Sleep(2500 * time.Millisecond) // several health syncs (500ms) after the load
	if out := d.Output.String(); strings.Contains(out, "node marked failed by its flows") || strings.Contains(out, "node probe failed") ||
		strings.Contains(out, "no node reachable") {
		t.Fatalf("the node was judged dead under a wide local port range:\n%s", out)
	}
	if code, err := d.Stop(); err != nil || code != 0 {
		t.Fatalf("stop: %d, %v", code, err)
	}
	wantAsSet("after the daemon stopped")

	// A crash leaves the reservation (flows keep going without the
	// daemon); the next start keeps it, and its stop restores the
	// namespace's own value, not the crashed run's.
	killed := e2e.Start(t, "tc-wide-killed", p.yaml, opts)
	killed.Instance = instance
	wantReserved("while serving again")
	killed.Crash(t)
	wantReserved("after SIGKILL")
	restarted := e2e.Start(t, "tc-wide-restarted", p.yaml, opts)
	restarted.Instance = instance
	wantReserved("after the restart")
	if err := e2e.Exchange(t, p.client, p.addr, 64<<10, 20*time.Second); err != nil {
		t.Fatalf("after the restart: %v", err)
	}
	if code, err := restarted.Stop(); err != nil || code != 0 {
		t.Fatalf("stop after the restart: %d, %v", code, err)
	}
	wantAsSet("after SIGKILL, a restart and a stop")
}

// TestTCReadOnlySysctls: where /proc/sys is read-only (a container's), the
// SNAT ports cannot be reserved; the daemon says so and translates to
// ports outside the namespace's ip_local_port_range instead (here
// 1024-60999 leaves 61000-65535), so translated flows and the listener's
// own dials still never share a port, and the sysctls stay untouched.
func TestTCReadOnlySysctls(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	p := newPortTopo(t, "tcro", 38)
	p.setSysctl(t, portRangeSysctl, "1024 60999")
	// A mount namespace of its own whose /proc/sys is a read-only bind
	// mount, as a container runtime makes it; unshare and sh exec the
	// daemon in place.
	d := e2e.Start(t, "tc-ro", p.yaml, e2e.Options{Wrap: []string{"unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$0" "$@"`}})
	d.WaitLog(t, 5*time.Second, "SNAT ports narrowed", "snat_ports=61000-65535")
	const conns, localEvery = 40, 4
	for i := range conns {
		from := p.client
		if i%localEvery == 0 {
			from = p.gw
		}
		if err := e2e.Exchange(t, from, p.addr, 4<<10, 20*time.Second); err != nil {
			t.Fatalf("connection %d from %s: %v", i, from.Name, err)
		}
	}
	if snat, local := p.nodePorts(61000, 65535); snat != conns-conns/localEvery || local != conns/localEvery {
		t.Errorf("the node saw %d connections from ports 61000-65535 and %d from others; want %d translated by tc and %d dialed by the listener",
			snat, local, conns-conns/localEvery, conns/localEvery)
	}
	if code, err := d.Stop(); err != nil || code != 0 {
		t.Fatalf("stop: %d, %v", code, err)
	}
	if got := p.sysctl(t, reservedPortsSysctl); got != "" {
		t.Fatalf("reserved ports after a run that could not write them: %q, want none", got)
	}
}
