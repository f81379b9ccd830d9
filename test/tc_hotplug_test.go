package test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

// tcHotplug is one tc service in a gateway namespace; client networks are
// plugged into the gateway while the daemon runs.
const tcHotplug = `services:
- name: tc-hot
  addr: "10.36.1.1:8000"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: server-0, addr: "10.36.2.2:9000"}
  metadata: {netns: $GW, netns.out: $GW, datapath: tc}
`

// hotplugWait bounds how long the daemon may take to follow an interface
// that appeared or disappeared.
const hotplugWait = 10 * time.Second

// TestTCHotplug: an interface plugged into the listen namespace after
// start gets the program, and its clients' connections are kernel flows,
// byte-exact; deleting it detaches the program and removes its link pin,
// while the first client network keeps being served; a stop leaves no
// program and no pin.
func TestTCHotplug(t *testing.T) {
	testutil.RequireRoot(t)
	t.Parallel()
	client := testutil.NewNS(t, "e2e-hot-c")
	gw := testutil.NewNS(t, "e2e-hot-g")
	server := testutil.NewNS(t, "e2e-hot-s")
	testutil.Veth(t, client, "c0", "10.36.1.2/24", gw, "g0", "10.36.1.1/24")
	testutil.Veth(t, gw, "g1", "10.36.2.1/24", server, "s0", "10.36.2.2/24")
	e2e.EchoIn(t, server, "10.36.2.2:9000")

	d := e2e.Start(t, "tc-hotplug", e2e.Config(tcHotplug, map[string]string{"GW": gw.Name}), e2e.Options{})
	pinDir := logAttr(t, d.WaitLog(t, time.Second, "tc datapath attached", "service=tc-hot"), "pins")
	gwNS := e2e.Handle(t, gw)
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 1 {
			t.Fatalf("%d tcx programs on %s at start, want 1", n, ifname)
		}
	}

	// Plug a second client network in.
	client2 := testutil.NewNS(t, "e2e-hot-c2")
	testutil.Veth(t, client2, "c0", "10.36.3.2/24", gw, "g2", "10.36.3.1/24")
	if err := client2.AddRoute("10.36.1.0/24", "10.36.3.1"); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, hotplugWait, "tc datapath attached to new interface", "interface=g2")
	waitTCXPrograms(t, gwNS, "g2", 1)
	g2Index := ifindexIn(t, gwNS, "g2")
	pin := filepath.Join(pinDir, fmt.Sprintf("link_g2_%d", g2Index))
	if _, err := os.Stat(pin); err != nil {
		t.Fatalf("link pin of the new interface: %v", err)
	}

	t.Run("the new client's connections are kernel flows", func(t *testing.T) {
		held := heldFlow(t, client2, "10.36.1.1:8000")
		defer held.Close()
		out := conns(t, d)
		if !tcFlow("tc-hot", held.LocalAddr().String()).MatchString(out) {
			t.Fatalf("conns does not list the new client's connection as a tc flow:\n%s", out)
		}
		kernelExchange(t, d, client2.Name, func(ctx context.Context) (net.Conn, error) {
			return e2e.DialFrom(ctx, t, client2, "tcp", "10.36.1.1:8000")
		})
	})

	// Unplug it: the gateway end goes with the client's.
	if err := gw.IP("link", "del", "g2"); err != nil {
		t.Fatal(err)
	}
	d.WaitLog(t, hotplugWait, "tc datapath detached from interface", "interface=g2")
	deadline := time.Now().Add(hotplugWait)
	for {
		_, err := os.Stat(pin)
		if errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("link pin %s still there %v after the interface was deleted (stat: %v)", pin, hotplugWait, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	t.Run("the first client is still served in the kernel", func(t *testing.T) {
		kernelExchange(t, d, client.Name, func(ctx context.Context) (net.Conn, error) {
			return e2e.DialFrom(ctx, t, client, "tcp", "10.36.1.1:8000")
		})
	})

	t.Run("a veth whose peer moves away after the program was attached", func(t *testing.T) {
		// As CNI plugins do: the host end comes up while its peer is
		// still beside it, then the peer moves into the container.
		if err := gw.IP("link", "add", "g3", "type", "veth", "peer", "name", "p3"); err != nil {
			t.Fatal(err)
		}
		if err := gw.IP("addr", "add", "10.36.4.1/24", "dev", "g3"); err != nil {
			t.Fatal(err)
		}
		if err := gw.IP("link", "set", "g3", "up"); err != nil {
			t.Fatal(err)
		}
		d.WaitLog(t, hotplugWait, "tc datapath attached to new interface", "interface=g3", "peer_redirect=false")
		client3 := testutil.NewNS(t, "e2e-hot-c3")
		for _, step := range []func() error{
			func() error { return gw.IP("link", "set", "p3", "netns", client3.Name) },
			func() error { return client3.IP("addr", "add", "10.36.4.2/24", "dev", "p3") },
			func() error { return client3.IP("link", "set", "p3", "up") },
			func() error { return client3.AddRoute("10.36.1.0/24", "10.36.4.1") },
		} {
			if err := step(); err != nil {
				t.Fatal(err)
			}
		}
		d.WaitLog(t, hotplugWait, "tc datapath: veth peer moved", "interface=g3", "peer_redirect=true")
		kernelExchange(t, d, client3.Name, func(ctx context.Context) (net.Conn, error) {
			return e2e.DialFrom(ctx, t, client3, "tcp", "10.36.1.1:8000")
		})
	})

	if !d.Running() {
		t.Fatal("the daemon exited")
	}
	requireCleanExit(t, d)
	for _, ifname := range []string{"g0", "g1"} {
		if n := tcxPrograms(t, gwNS, ifname); n != 0 {
			t.Errorf("%d tcx programs left on %s after exit", n, ifname)
		}
	}
	if _, err := os.Stat(pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin directory %s left after exit (stat: %v)", pinDir, err)
	}
}

// kernelExchange moves 1 MiB byte-exact over a connection dial opens and
// checks that `ebpfwd conns` lists it as a kernel flow (it stays in the
// conntrack table for a while after it closed) and no connection of the
// service reached the userspace listener.
func kernelExchange(t *testing.T, d *e2e.Daemon, from string, dial func(context.Context) (net.Conn, error)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := dial(ctx)
	if err != nil {
		t.Fatalf("dial from %s: %v", from, err)
	}
	local := c.LocalAddr().String()
	if err := peer.Exchange(ctx, c, 1<<20); err != nil {
		t.Fatalf("exchange from %s: %v", from, err)
	}
	out := conns(t, d)
	if !regexp.MustCompile(`(?m)^tc-hot\s+tc\s+tcp\s+` + regexp.QuoteMeta(local) + `\s`).MatchString(out) {
		t.Fatalf("conns does not list the exchange from %s (%s) as a tc flow:\n%s", from, local, out)
	}
	if regexp.MustCompile(`(?m)^tc-hot\s+userspace`).MatchString(out) {
		t.Fatalf("a connection reached the userspace listener:\n%s", out)
	}
}

// waitTCXPrograms waits until ifname in ns has want tcx ingress programs.
func waitTCXPrograms(t *testing.T, ns netNSHandle, ifname string, want int) {
	t.Helper()
	deadline := time.Now().Add(hotplugWait)
	for {
		n := tcxPrograms(t, ns, ifname)
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d tcx programs on %s after %v, want %d", n, ifname, hotplugWait, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ifindexIn is the index of interface ifname in ns.
func ifindexIn(t *testing.T, ns netNSHandle, ifname string) int {
	t.Helper()
	var index int
	err := ns.Do(func() error {
		iface, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		index = iface.Index
		return nil
	})
	if err != nil {
		t.Fatalf("interface %s: %v", ifname, err)
	}
	return index
}

// logAttr is the value of attribute key in a text-format log line.
func logAttr(t *testing.T, line, key string) string {
	t.Helper()
	m := regexp.MustCompile(`(?:^|\s)` + regexp.QuoteMeta(key) + `=("(?:[^"\\]|\\.)*"|\S+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("log line has no %s: %s", key, line)
	}
	return strings.Trim(m[1], `"`)
}
