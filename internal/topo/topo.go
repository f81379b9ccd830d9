// Package topo builds throwaway network topologies out of named network
// namespaces and veth pairs for tests, the demo and benchmarks.
//
// Everything is done with the ip(8) command so that a failing step can be
// reproduced by hand from the error message, which always carries the
// command line and its output. Links are created directly inside their
// namespaces: nothing here ever adds a link, an address or a route to the
// caller's (root) namespace.
package topo

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// netnsDir is where `ip netns add` bind-mounts named namespaces.
const netnsDir = "/var/run/netns"

// NS is a named network namespace under /var/run/netns.
type NS struct {
	Name string
}

// Path returns the bind-mount path of the namespace, usable anywhere a
// namespace path is accepted (setns, nsenter --net=, ebpfwd `netns:`).
func (n *NS) Path() string {
	return filepath.Join(netnsDir, n.Name)
}

// Exists reports whether a named namespace is present.
func Exists(name string) bool {
	_, err := os.Stat(filepath.Join(netnsDir, name))
	return err == nil
}

// Create adds the namespace with exactly this name and brings its loopback
// up (a fresh namespace has lo down, which breaks 127.0.0.1 inside it).
func Create(name string) (*NS, error) {
	if name == "" || strings.ContainsAny(name, "/ \t\n") {
		return nil, fmt.Errorf("create namespace %q: invalid name", name)
	}
	if Exists(name) {
		return nil, fmt.Errorf("namespace %s already exists", name)
	}
	if err := run("ip", "netns", "add", name); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", name, err)
	}
	ns := &NS{Name: name}
	if err := ns.IP("link", "set", "dev", "lo", "up"); err != nil {
		// Do not leak a half-built namespace.
		_ = ns.Delete()
		return nil, fmt.Errorf("bring lo up in namespace %s: %w", name, err)
	}
	return ns, nil
}

// CreateUnique creates a namespace named prefix-<6 random hex digits>, so
// that concurrent tests and leftovers of crashed runs never collide.
func CreateUnique(prefix string) (*NS, error) {
	// A collision is astronomically unlikely, but retrying keeps Create's
	// "already exists" error from ever surfacing as a flaky test.
	const attempts = 5
	var lastErr error
	for range attempts {
		suffix, err := randomHex(3)
		if err != nil {
			return nil, fmt.Errorf("create unique namespace %s: %w", prefix, err)
		}
		name := prefix + "-" + suffix
		if Exists(name) {
			lastErr = fmt.Errorf("namespace %s already exists", name)
			continue
		}
		return Create(name)
	}
	return nil, fmt.Errorf("create unique namespace %s: %w", prefix, lastErr)
}

// Delete removes the namespace. Removing a namespace destroys the veth ends
// inside it, and with them their peers. Deleting a namespace that is already
// gone is not an error, so Delete is safe in t.Cleanup after a test that
// deleted it on purpose.
func (n *NS) Delete() error {
	out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput()
	if err != nil {
		if strings.Contains(string(out), "No such file") || !Exists(n.Name) {
			return nil
		}
		return fmt.Errorf("delete namespace %s: %w", n.Name, cmdError("ip netns del "+n.Name, out, err))
	}
	return nil
}

// IP runs `ip -n NAME args...`.
func (n *NS) IP(args ...string) error {
	return run("ip", append([]string{"-n", n.Name}, args...)...)
}

// Veth links two namespaces with a veth pair aName (in a) <-> bName (in b).
// The pair is created directly inside the namespaces, never in the root
// namespace. aCIDR and bCIDR ("" for none) are assigned to the ends; IPv6
// addresses skip duplicate address detection so they are usable at once.
// Both ends are brought up.
func Veth(a *NS, aName, aCIDR string, b *NS, bName, bCIDR string) error {
	if err := run("ip", "link", "add", aName, "netns", a.Name,
		"type", "veth", "peer", "name", bName, "netns", b.Name); err != nil {
		return fmt.Errorf("create veth %s@%s <-> %s@%s: %w", aName, a.Name, bName, b.Name, err)
	}
	if err := a.configureLink(aName, aCIDR); err != nil {
		return err
	}
	return b.configureLink(bName, bCIDR)
}

func (n *NS) configureLink(dev, cidr string) error {
	if cidr != "" {
		if err := n.AddAddr(dev, cidr); err != nil {
			return err
		}
	}
	if err := n.IP("link", "set", "dev", dev, "up"); err != nil {
		return fmt.Errorf("bring %s up in namespace %s: %w", dev, n.Name, err)
	}
	return nil
}

// AddAddr assigns cidr to dev inside the namespace (`ip -n NAME addr add
// CIDR dev DEV`), a second address or family beside what Veth or Bridge
// gave it. IPv6 addresses skip duplicate address detection, as Veth's do.
func (n *NS) AddAddr(dev, cidr string) error {
	prefix, err := netip.ParsePrefix(cidr)
	if err != nil {
		return fmt.Errorf("address %q for %s in namespace %s: %w", cidr, dev, n.Name, err)
	}
	args := []string{"addr", "add", cidr, "dev", dev}
	if prefix.Addr().Is6() {
		// Without nodad the address stays "tentative" for a second or
		// two and binds to it fail with EADDRNOTAVAIL.
		args = append(args, "nodad")
	}
	if err := n.IP(args...); err != nil {
		return fmt.Errorf("assign %s to %s in namespace %s: %w", cidr, dev, n.Name, err)
	}
	return nil
}

// AddRoute runs `ip -n NAME route add DST via VIA`, in IPv6's table (ip -6)
// when VIA is an IPv6 address, so "default" means the family of VIA.
func (n *NS) AddRoute(dst, via string) error {
	args := []string{"route", "add", dst, "via", via}
	if a, err := netip.ParseAddr(via); err == nil && a.Is6() {
		args = append([]string{"-6"}, args...)
	}
	if err := n.IP(args...); err != nil {
		return fmt.Errorf("add route %s via %s in namespace %s: %w", dst, via, n.Name, err)
	}
	return nil
}

// EnableForwarding turns on IPv4 and IPv6 forwarding inside the namespace,
// so it can route between its links. The sysctls are per-namespace, so this
// never changes the host's settings.
func (n *NS) EnableForwarding() error {
	for _, key := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		if err := n.Exec("sysctl", "-q", "-w", key); err != nil {
			return fmt.Errorf("enable forwarding (%s) in namespace %s: %w", key, n.Name, err)
		}
	}
	return nil
}

// Bridge creates a Linux bridge dev inside the namespace, assigns cidr
// ("" for none) and brings it up: the docker0 or br0 of a host namespace.
func (n *NS) Bridge(dev, cidr string) error {
	if err := n.IP("link", "add", dev, "type", "bridge"); err != nil {
		return fmt.Errorf("create bridge %s in namespace %s: %w", dev, n.Name, err)
	}
	return n.configureLink(dev, cidr)
}

// Enslave attaches the link dev to the bridge br, both inside the
// namespace, as `ip link set dev DEV master BR`.
func (n *NS) Enslave(dev, br string) error {
	if err := n.IP("link", "set", "dev", dev, "master", br); err != nil {
		return fmt.Errorf("attach %s to bridge %s in namespace %s: %w", dev, br, n.Name, err)
	}
	return nil
}

// Exec runs a command inside the namespace (`ip netns exec NAME cmd
// args...`), for tools that act on the namespace they run in, such as
// iptables and sysctl. ip netns exec remounts /sys, which is harmless for
// them but hides /sys/fs/bpf: never start ebpfwd with it.
func (n *NS) Exec(name string, args ...string) error {
	return run("ip", append([]string{"netns", "exec", n.Name, name}, args...)...)
}

func run(name string, args ...string) error {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return cmdError(name+" "+strings.Join(args, " "), out, err)
	}
	return nil
}

func cmdError(cmdline string, out []byte, err error) error {
	return fmt.Errorf("%s: %w: %s", cmdline, err, bytes.TrimSpace(out))
}

func randomHex(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("read random bytes: %w", err)
	}
	return hex.EncodeToString(b), nil
}
