package topologies

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

// Seed 004 (Network namespace - виртуальный сетевой стек в linux): a
// namespace is reachable as /proc/PID/ns/net of any process in it, lives
// as long as a file of it is open, and gets its own resolv.conf and hosts
// from /etc/netns/NAME/ under `ip netns exec`.

// unnamedNS starts `unshare -n sleep`, a process alone in a namespace
// nobody named, and returns its PID; the process is killed when the test
// ends, and with it the namespace (once nothing else holds it).
func unnamedNS(t *testing.T) int {
	t.Helper()
	testutil.RequireRoot(t)
	// sleep bounds the process's life should the cleanup never run.
	cmd := exec.Command("unshare", "--net", "sleep", "600")
	if err := cmd.Start(); err != nil {
		t.Fatalf("unshare -n sleep: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// unshare enters the new namespace and then execs sleep in place:
	// wait until the PID's namespace is no longer ours.
	own, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	path := fmt.Sprintf("/proc/%d/ns/net", cmd.Process.Pid)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if ns, err := os.Readlink(path); err == nil && ns != own {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still this process's namespace after 5s", path)
		}
	}
	return cmd.Process.Pid
}

// nsenter runs a command in the namespace at path, as the seed sets up a
// namespace it knows only by a process.
func nsenter(t *testing.T, path string, args ...string) {
	t.Helper()
	if out, err := exec.Command("nsenter", append([]string{"--net=" + path}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("nsenter --net=%s %v: %v: %s", path, args, err, out)
	}
}

// vethToPID links named namespace a (aName, aCIDR) with the namespace of
// process pid (pName, pCIDR): ip(8) takes a PID wherever it takes a
// namespace name.
func vethToPID(t *testing.T, a *topo.NS, aName, aCIDR string, pid int, pName, pCIDR string) {
	t.Helper()
	if out, err := exec.Command("ip", "link", "add", aName, "netns", a.Name, "type", "veth", "peer", "name", pName, "netns", strconv.Itoa(pid)).CombinedOutput(); err != nil {
		t.Fatalf("veth %s@%s <-> %s@pid %d: %v: %s", aName, a.Name, pName, pid, err, out)
	}
	must(t, a.IP("addr", "add", aCIDR, "dev", aName))
	must(t, a.IP("link", "set", "dev", aName, "up"))
	path := fmt.Sprintf("/proc/%d/ns/net", pid)
	nsenter(t, path, "ip", "addr", "add", pCIDR, "dev", pName)
	nsenter(t, path, "ip", "link", "set", "dev", pName, "up")
}

// bindMount gives the namespace at path a second name, NAME under
// /var/run/netns, as `ip netns add` does for a new one; `ip netns del`
// (the returned NS's Delete, run in the cleanup) unmounts and removes it.
func bindMount(t *testing.T, path string) *topo.NS {
	t.Helper()
	name := testutil.UniqueName(t, "topo-h-alias")
	alias := &topo.NS{Name: name}
	if err := os.WriteFile(alias.Path(), nil, 0o444); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := alias.Delete(); err != nil {
			t.Error(err)
		}
		_ = os.Remove(alias.Path())
	})
	if out, err := exec.Command("mount", "--bind", path, alias.Path()).CombinedOutput(); err != nil {
		t.Fatalf("mount --bind %s %s: %v: %s", path, alias.Path(), err, out)
	}
	return alias
}

// TestSeed004ProcessHandle serves from a namespace that has no name, given
// as /proc/PID/ns/net of the process in it, and from the same namespace
// bind-mounted under a name, and with the two spellings mixed: to ebpfwd
// they are one namespace (one tc instance, one pin directory).
//
//	client 10.4.1.2 --- 10.4.1.1 [unnamed: sleep] 10.4.2.1 --- 10.4.2.2 server
func TestSeed004ProcessHandle(t *testing.T) {
	t.Parallel()
	client, server := newNS(t, "h-cl"), newNS(t, "h-srv")
	pid := unnamedNS(t)
	proc := fmt.Sprintf("/proc/%d/ns/net", pid)
	vethToPID(t, client, "eth0", "10.4.1.2/24", pid, "eth0", "10.4.1.1/24")
	vethToPID(t, server, "eth0", "10.4.2.2/24", pid, "eth1", "10.4.2.1/24")
	must(t, client.AddRoute("10.4.2.0/24", "10.4.1.1"))
	must(t, server.AddRoute("10.4.1.0/24", "10.4.2.1"))
	alias := bindMount(t, proc)
	web := e2e.EchoIn(t, server, "10.4.2.2:9000")
	e2e.UDPEchoIn(t, server, "10.4.2.2:9000")

	handles := []struct {
		name, port, meta string
	}{
		{"proc", "8000", ", netns: " + proc + ", netns.out: " + proc},
		{"alias", "8001", ", netns: " + alias.Name + ", netns.out: " + alias.Name},
		{"mixed", "8002", ", netns: " + proc + ", netns.out: " + alias.Path()},
	}
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			var forwards []string
			var paths []path
			for _, s := range handles {
				forwards = append(forwards, forward(s.name, "10.4.1.1:"+s.port, "10.4.2.2:9000", dp, s.meta))
				addr := "10.4.1.1:" + s.port
				paths = append(paths,
					path{name: s.name + " tcp", from: client, proto: "tcp", addr: addr, server: web, source: "10.4.2.1", kernel: true},
					path{name: s.name + " udp", from: client, proto: "udp", addr: addr})
			}
			d := e2e.Start(t, "handle-"+dp, services(forwards...), e2e.Options{})
			check(t, dp, paths)
			if dp == "tc" {
				// Every service's program instance is pinned under the
				// namespace's identity, whatever its spelling.
				pins := regexp.MustCompile(`msg="tc datapath attached" service=\S+ .* pins=(\S+)`).FindAllStringSubmatch(d.Output.String(), -1)
				if len(pins) != 2*len(handles) {
					t.Fatalf("%d services attached on tc, want %d; output:\n%s", len(pins), 2*len(handles), d.Output)
				}
				for _, p := range pins[1:] {
					if p[1] != pins[0][1] {
						t.Errorf("services pinned under %s and %s: one namespace, two identities", pins[0][1], p[1])
					}
				}
			}
		})
	}
}

// TestSeed004EtcNetns gives the dialing namespace its own
// /etc/netns/NAME/hosts and resolv.conf (its nameserver lives inside it,
// on its loopback) and names the node instead of giving its address.
//
//	client (service on 127.0.0.1) ==netns.out==> out: 127.0.0.53 DNS, 127.0.0.9 server
func TestSeed004EtcNetns(t *testing.T) {
	t.Parallel()
	client, out := newNS(t, "h-etc-cl"), newNS(t, "h-etc-out")
	// The names exist nowhere else: hosts and the namespace's nameserver
	// are the only ways to them.
	hostsName := testutil.UniqueName(t, "web-hosts") + ".topo.test"
	dnsName := testutil.UniqueName(t, "web-dns") + ".topo.test"
	testutil.WriteNSEtc(t, out.Name, "hosts", "127.0.0.9 "+hostsName+"\n")
	testutil.WriteNSEtc(t, out.Name, "resolv.conf", "nameserver 127.0.0.53\n")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	pc, err := e2e.Handle(t, out).ListenPacket(ctx, "udp", "127.0.0.53:53")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	answered := testutil.ServeDNS(pc, netip.MustParseAddr("127.0.0.9"))
	web := e2e.EchoIn(t, out, "127.0.0.9:9000")
	e2e.UDPEchoIn(t, out, "127.0.0.9:9000")

	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			if dp == "tc" {
				t.Skip("tc: nodes must be IP addresses (a node given by name is resolved at each dial, in userspace)")
			}
			meta := ", netns: " + client.Name + ", netns.out: " + out.Name
			yaml := services(forward("hosts", "127.0.0.1:8000", hostsName+":9000", dp, meta),
				forward("dns", "127.0.0.1:8001", dnsName+":9000", dp, meta))
			e2e.Start(t, "etc-"+dp, yaml, e2e.Options{})
			check(t, dp, []path{
				{name: "hosts tcp", from: client, proto: "tcp", addr: "127.0.0.1:8000", server: web, source: "127.0.0.1"},
				{name: "hosts udp", from: client, proto: "udp", addr: "127.0.0.1:8000"},
				{name: "resolv.conf tcp", from: client, proto: "tcp", addr: "127.0.0.1:8001", server: web, source: "127.0.0.1"},
				{name: "resolv.conf udp", from: client, proto: "udp", addr: "127.0.0.1:8001"},
			})
			if answered.Load() == 0 {
				t.Error("the namespace's nameserver answered no query: the node was not resolved through its resolv.conf")
			}
		})
	}
}

// TestSeed004Deleted deletes the namespace one service dials into while
// it runs and while another service, dialing elsewhere, carries a
// connection: new connections to the first fail cleanly (closed, no
// data), the daemon keeps running, and the other service keeps serving,
// its open connection included. On tc the doomed namespace is netns.out
// behind a splice link, which goes with it.
//
//	client 10.4.4.2 --- 10.4.4.1 gw ==splice / netns.out==> doomed: 10.4.5.2 server
//	                              gw 10.4.6.1 --- 10.4.6.2 kept server
func TestSeed004Deleted(t *testing.T) {
	t.Parallel()
	for _, dp := range datapaths {
		t.Run(dp, func(t *testing.T) {
			t.Parallel()
			client, gw, doomed, kept := newNS(t, "h-del-cl"), newNS(t, "h-del-gw"), newNS(t, "h-del-dm"), newNS(t, "h-del-kp")
			must(t, topo.Veth(client, "eth0", "10.4.4.2/24", gw, "eth0", "10.4.4.1/24"))
			must(t, topo.Veth(gw, "eth1", "10.4.6.1/24", kept, "eth0", "10.4.6.2/24"))
			// The doomed server's address sits on a veth pair inside
			// the namespace (no dummy driver needed): local to it.
			must(t, topo.Veth(doomed, "t0", "10.4.5.2/24", doomed, "t1", ""))
			must(t, client.AddRoute("10.4.0.0/16", "10.4.4.1"))
			must(t, kept.AddRoute("10.4.4.0/24", "10.4.6.1"))
			// The doomed server is stopped before the deletion, so
			// nothing of the test keeps the namespace alive.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			ln, err := e2e.Handle(t, doomed).Listen(ctx, "tcp", "10.4.5.2:9000")
			if err != nil {
				t.Fatal(err)
			}
			stopDoomed := peer.ServeEcho(ln)
			t.Cleanup(stopDoomed)
			keptWeb := e2e.EchoIn(t, kept, "10.4.6.2:9000")
			e2e.UDPEchoIn(t, kept, "10.4.6.2:9000")

			yaml := services(forward("doomed", "10.4.4.1:8000", "10.4.5.2:9000", dp, ", netns: "+gw.Name+", netns.out: "+doomed.Name),
				forward("kept", "10.4.4.1:8001", "10.4.6.2:9000", dp, ", netns: "+gw.Name+", netns.out: "+gw.Name))
			d := e2e.Start(t, "del-"+dp, yaml, e2e.Options{})
			if err := e2e.Exchange(t, client, "10.4.4.1:8000", streamBytes, exchangeTimeout); err != nil {
				t.Fatalf("into the doomed namespace before its deletion: %v", err)
			}
			// A connection of the kept service open across the deletion
			// (its own bound: starting the daemon may take longer than
			// the listen's under load).
			hctx, hcancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer hcancel()
			held, err := e2e.DialFrom(hctx, t, client, "tcp", "10.4.4.1:8001")
			if err != nil {
				t.Fatal(err)
			}
			defer held.Close()

			stopDoomed()
			must(t, doomed.Delete())
			waitGone(t, gw, dp)
			// tc: the kernel picks nodes itself. The first client's SYN
			// finds no way into the namespace; its retransmission
			// (after 1s) tells the program the node did not answer
			// (passive health), which takes the node out and passes the
			// SYN to the stack, whose listener closes it; so do the next
			// ones at once.
			for range 3 {
				e2e.ExpectClosedNoData(t, client, "10.4.4.1:8000")
			}
			if dp == "tc" {
				d.WaitLog(t, 10*time.Second, "node health pushed to datapath", "service=doomed-tcp", "healthy=false")
			}
			if !d.Running() {
				t.Fatalf("the daemon exited when a namespace was deleted; output:\n%s", d.Output)
			}
			xctx, xcancel := context.WithTimeout(context.Background(), exchangeTimeout)
			defer xcancel()
			if err := peer.Exchange(xctx, held, streamBytes); err != nil {
				t.Fatalf("the kept service's connection open across the deletion: %v", err)
			}
			check(t, dp, []path{
				{name: "kept tcp after deletion", from: client, proto: "tcp", addr: "10.4.4.1:8001", server: keptWeb, source: "10.4.6.1", kernel: true},
				{name: "kept udp after deletion", from: client, proto: "udp", addr: "10.4.4.1:8001"},
			})
		})
	}
}

// waitGone waits until the doomed namespace is destroyed, not merely
// unnamed: on tc its end of the splice link then disappears from gw.
func waitGone(t *testing.T, gw *topo.NS, dp string) {
	t.Helper()
	if dp != "tc" {
		return
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var splice bool
		err := e2e.Handle(t, gw).Do(func() error {
			ifs, err := net.Interfaces()
			for _, i := range ifs {
				if matched, _ := filepath.Match("ebs*", i.Name); matched {
					splice = true
				}
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if !splice {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the splice link into the deleted namespace is still in the listen namespace after 10s: something keeps the namespace alive")
		}
	}
}
