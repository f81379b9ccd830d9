package tc

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
)

// The program translates flows to source ports of the SNAT range. The
// namespace's own sockets (the service's listener dialing a node, node
// probes) pick their source ports from ip_local_port_range, which busy
// gateways often widen to 1024-65000: a local connection could then get a
// port a translated flow holds, and the two flows' packets would cross
// (probes time out, the node is marked dead, the rate collapses). So the
// SNAT range is added to the namespace's ip_local_reserved_ports, which
// the kernel skips when it picks a port on its own (explicit binds are
// unaffected), for as long as the program serves there; the namespace's
// value is restored when the last service there goes.
const reservedPortsSysctl = "/proc/sys/net/ipv4/ip_local_reserved_ports"

// portStateDir keeps, per instance and namespace, the value the namespace
// had before ebpfwd reserved ports: a run that crashed or restarted in
// place could not restore it, and the next run must restore that value,
// not the one with our reservation in it. /run is emptied at boot, as are
// namespaces.
const portStateDir = "/run/ebpfwd"

// portReservation is the SNAT range reserved in one namespace.
type portReservation struct {
	ns        netns.NS
	original  string // the namespace's value before ebpfwd's reservation
	stateFile string
}

func portStateFile(instance string, id netns.ID) string {
	return filepath.Join(portStateDir, fmt.Sprintf("%s.tc-reserved-ports-%d-%d", instance, id.Dev, id.Ino))
}

// snatRange is the SNAT range as the sysctl writes ranges.
func snatRange() string {
	return fmt.Sprintf("%d-%d", loader.DefaultSNATPortMin, loader.DefaultSNATPortMax)
}

// reservePorts adds the SNAT range to ns's reserved ports, remembering the
// value to restore (that of a previous run's state file, if there is one).
func reservePorts(instance string, ns netns.NS, id netns.ID) (*portReservation, error) {
	r := &portReservation{ns: ns, stateFile: portStateFile(instance, id)}
	current, err := readSysctl(ns, reservedPortsSysctl)
	if err != nil {
		return nil, err
	}
	if saved, err := os.ReadFile(r.stateFile); err == nil {
		r.original = string(saved)
	} else {
		r.original = current
		if err := os.MkdirAll(portStateDir, 0o700); err != nil {
			return nil, fmt.Errorf("reserve SNAT ports: %w", err)
		}
		if err := os.WriteFile(r.stateFile, []byte(current), 0o600); err != nil {
			return nil, fmt.Errorf("reserve SNAT ports: %w", err)
		}
	}
	value := snatRange()
	if r.original != "" {
		value = r.original + "," + value
	}
	if err := writeSysctl(ns, reservedPortsSysctl, value); err != nil {
		os.Remove(r.stateFile)
		return nil, fmt.Errorf("reserve the SNAT ports %s in netns %s: %w", snatRange(), ns, err)
	}
	return r, nil
}

// restore puts the namespace's own value back. A namespace that is gone
// took its sysctls with it.
func (r *portReservation) restore() error {
	err := writeSysctl(r.ns, reservedPortsSysctl, r.original)
	if errors.Is(err, netns.ErrGone) {
		err = nil
	}
	if rerr := os.Remove(r.stateFile); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("restore ip_local_reserved_ports in netns %s: %w", r.ns, err)
	}
	return nil
}

// restoreLeftPorts restores the reserved ports a previous run left in a
// namespace this run no longer serves (nothing when it left none).
func restoreLeftPorts(instance string, ns netns.NS) error {
	id, err := ns.ID()
	if err != nil {
		return nil // gone: nothing to restore
	}
	file := portStateFile(instance, id)
	saved, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return (&portReservation{ns: ns, original: string(saved), stateFile: file}).restore()
}

func readSysctl(ns netns.NS, path string) (string, error) {
	var value string
	err := ns.Do(func() error {
		b, err := os.ReadFile(path)
		value = strings.TrimSpace(string(b))
		return err
	})
	return value, err
}

func writeSysctl(ns netns.NS, path, value string) error {
	return ns.Do(func() error { return os.WriteFile(path, []byte(value+"\n"), 0o644) })
}
