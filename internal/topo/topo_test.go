package topo_test

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// inNS runs fn on a thread switched into the namespace at path. Sockets
// created by fn stay in that namespace after the thread switches back.
func inNS(path string, fn func() error) error {
	runtime.LockOSThread()
	self, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer self.Close()
	target, err := os.Open(path)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("setns %s: %w", path, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(self.Fd()), unix.CLONE_NEWNET); err != nil {
		// Leave the thread locked: the runtime discards it when the
		// goroutine exits instead of reusing a thread in the wrong namespace.
		return fmt.Errorf("restore namespace: %w", err)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// roundTrip listens on listenAddr inside srv and dials it from cli, proving
// the two namespaces can reach each other over TCP.
func roundTrip(t *testing.T, srv, cli *topo.NS, listenAddr string) error {
	t.Helper()
	var l net.Listener
	if err := inNS(srv.Path(), func() (err error) {
		l, err = net.Listen("tcp", listenAddr)
		return err
	}); err != nil {
		return fmt.Errorf("listen %s in %s: %w", listenAddr, srv.Name, err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	var c net.Conn
	if err := inNS(cli.Path(), func() (err error) {
		c, err = net.DialTimeout("tcp", l.Addr().String(), 3*time.Second)
		return err
	}); err != nil {
		return fmt.Errorf("dial %s from %s: %w", l.Addr(), cli.Name, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	msg := []byte("ping")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

func linkNames(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append(args, "-o", "link", "show")...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip link show: %v: %s", err, out)
	}
	return string(out)
}

func TestCreate(t *testing.T) {
	ns := testutil.NewNS(t, "topo-c")

	if !regexp.MustCompile(`^topo-c-[0-9a-f]{6}$`).MatchString(ns.Name) {
		t.Errorf("CreateUnique name %q, want topo-c-<6 hex>", ns.Name)
	}
	if ns.Path() != "/var/run/netns/"+ns.Name {
		t.Errorf("Path() = %q", ns.Path())
	}
	if !topo.Exists(ns.Name) {
		t.Errorf("Exists(%q) = false after Create", ns.Name)
	}
	if lo := linkNames(t, "-n", ns.Name); !strings.Contains(lo, "lo:") || !strings.Contains(lo, "UP") {
		t.Errorf("lo is not up in new namespace: %s", lo)
	}

	_, err := topo.Create(ns.Name)
	if want := "namespace " + ns.Name + " already exists"; err == nil || err.Error() != want {
		t.Errorf("Create(existing) error = %v, want %q", err, want)
	}

	if err := ns.Delete(); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if topo.Exists(ns.Name) {
		t.Errorf("Exists(%q) = true after Delete", ns.Name)
	}
	if err := ns.Delete(); err != nil {
		t.Errorf("second Delete must be a no-op, got %v", err)
	}
}

func TestCreateInvalidName(t *testing.T) {
	for _, name := range []string{"", "a/b", "a b"} {
		if _, err := topo.Create(name); err == nil {
			t.Errorf("Create(%q) succeeded, want error", name)
		}
	}
}

func TestIPErrorCarriesOutput(t *testing.T) {
	ns := testutil.NewNS(t, "topo-e")
	err := ns.IP("link", "set", "dev", "nosuchdev0", "up")
	if err == nil {
		t.Fatal("ip on a missing device succeeded")
	}
	for _, want := range []string{"ip -n " + ns.Name, "nosuchdev0"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestVeth(t *testing.T) {
	tests := []struct {
		name         string
		aCIDR, bCIDR string
		listen       string
	}{
		{"ipv4", "10.77.0.1/24", "10.77.0.2/24", "10.77.0.2:0"},
		{"ipv6", "fd77::1/64", "fd77::2/64", "[fd77::2]:0"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := testutil.NewNS(t, "topo-va")
			b := testutil.NewNS(t, "topo-vb")
			aDev, bDev := "tva"+a.Name[len(a.Name)-6:], "tvb"+b.Name[len(b.Name)-6:]
			if err := topo.Veth(a, aDev, tc.aCIDR, b, bDev, tc.bCIDR); err != nil {
				t.Fatalf("Veth: %v", err)
			}
			if root := linkNames(t); strings.Contains(root, aDev) || strings.Contains(root, bDev) {
				t.Fatalf("veth ends leaked into the root namespace:\n%s", root)
			}
			if err := roundTrip(t, b, a, tc.listen); err != nil {
				t.Fatalf("TCP over veth: %v", err)
			}
			// Deleting one side destroys the pair.
			if err := a.Delete(); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			// The kernel tears a namespace down asynchronously, so poll.
			deadline := time.Now().Add(5 * time.Second)
			for {
				links := linkNames(t, "-n", b.Name)
				if !strings.Contains(links, bDev) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("peer %s survived deletion of %s for 5s:\n%s", bDev, a.Name, links)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

func TestVethBadCIDR(t *testing.T) {
	a := testutil.NewNS(t, "topo-ba")
	b := testutil.NewNS(t, "topo-bb")
	if err := topo.Veth(a, "tbad0", "not-a-cidr", b, "tbad1", ""); err == nil {
		t.Fatal("Veth with a bad CIDR succeeded")
	}
}

// TestRouting builds client <-> router <-> server and proves AddRoute and
// EnableForwarding let the client reach the server's subnet.
func TestRouting(t *testing.T) {
	cli := testutil.NewNS(t, "topo-rc")
	rtr := testutil.NewNS(t, "topo-rr")
	srv := testutil.NewNS(t, "topo-rs")
	sfx := cli.Name[len(cli.Name)-6:]
	if err := topo.Veth(cli, "rc"+sfx, "10.78.1.2/24", rtr, "rr1"+sfx, "10.78.1.1/24"); err != nil {
		t.Fatal(err)
	}
	if err := topo.Veth(srv, "rs"+sfx, "10.78.2.2/24", rtr, "rr2"+sfx, "10.78.2.1/24"); err != nil {
		t.Fatal(err)
	}
	if err := cli.AddRoute("10.78.2.0/24", "10.78.1.1"); err != nil {
		t.Fatal(err)
	}
	if err := srv.AddRoute("10.78.1.0/24", "10.78.2.1"); err != nil {
		t.Fatal(err)
	}
	if err := rtr.EnableForwarding(); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(t, srv, cli, "10.78.2.2:0"); err != nil {
		t.Fatalf("routed TCP: %v", err)
	}
	// The same over IPv6, added beside the IPv4 addresses: "default" via
	// an IPv6 gateway is IPv6's default route.
	for _, a := range []struct {
		ns        *topo.NS
		dev, cidr string
	}{{cli, "rc" + sfx, "fd78:1::2/64"}, {rtr, "rr1" + sfx, "fd78:1::1/64"}, {srv, "rs" + sfx, "fd78:2::2/64"}, {rtr, "rr2" + sfx, "fd78:2::1/64"}} {
		if err := a.ns.AddAddr(a.dev, a.cidr); err != nil {
			t.Fatal(err)
		}
	}
	if err := cli.AddRoute("default", "fd78:1::1"); err != nil {
		t.Fatal(err)
	}
	if err := srv.AddRoute("default", "fd78:2::1"); err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(t, srv, cli, "[fd78:2::2]:0"); err != nil {
		t.Fatalf("routed TCP over IPv6: %v", err)
	}
	if err := cli.AddRoute("10.78.3.0/24", "10.99.99.99"); err == nil {
		t.Error("AddRoute via an unreachable gateway succeeded")
	}
}
