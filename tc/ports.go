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
// unaffected), for as long as the program serves there; what ebpfwd added
// is taken out again when the last service there goes.
//
// Why this and not the alternatives: translating to an address no local
// socket uses needs an address of the gateway's own that the nodes route
// back, which a same-namespace gateway does not have; letting the program
// pass replies that belong to a local socket (bpf_sk_lookup) would still
// let a local connect(2) pick the 4-tuple of a translated flow, which the
// node then sees as one connection. A reservation is what the kernel
// itself offers for ports that something other than its own sockets uses,
// and an operator sees it with `sysctl net.ipv4.ip_local_reserved_ports`.
const (
	reservedPortsSysctl  = "/proc/sys/net/ipv4/ip_local_reserved_ports"
	localPortRangeSysctl = "/proc/sys/net/ipv4/ip_local_port_range"
)

// portStateDir keeps, per instance and namespace, what the namespace had
// reserved before ebpfwd and what ebpfwd added: a run that crashed or
// restarted in place could not undo its reservation, and the next run (or
// the one that finds the namespace no longer served) must undo exactly
// that. /run is emptied at boot, as are namespaces.
const portStateDir = "/run/ebpfwd"

// minFallbackSNATPorts is the smallest SNAT range the datapath narrows to
// when the SNAT ports cannot be reserved (a read-only /proc/sys): the range
// bounds the flows to one node opened or closed within the last 2s (the
// program's tcp_closed_reuse_ns), so 1024 ports allow about 500 new flows
// per second per node. Below it, tc refuses the namespace and `auto` falls
// back to the relay, which cannot collide with the kernel's own sockets.
const minFallbackSNATPorts = 1024

// portRange is an inclusive range of ports.
type portRange struct{ min, max uint16 }

func (r portRange) String() string { return fmt.Sprintf("%d-%d", r.min, r.max) }
func (r portRange) set() portSet   { return portRangeSet(r.min, r.max) }
func (r portRange) size() int      { return int(r.max) - int(r.min) + 1 }

// defaultSNATRange is the program's SNAT range when it can be reserved.
var defaultSNATRange = portRange{loader.DefaultSNATPortMin, loader.DefaultSNATPortMax}

// sysctls reads and writes a namespace's sysctls; tests swap in one whose
// writes fail as a read-only /proc/sys does.
type sysctls interface {
	read(ns netns.NS, path string) (string, error)
	write(ns netns.NS, path, value string) error
}

type procSysctls struct{}

func (procSysctls) read(ns netns.NS, path string) (string, error) { return readSysctl(ns, path) }
func (procSysctls) write(ns netns.NS, path, value string) error   { return writeSysctl(ns, path, value) }

// portReservation is what one instance reserved in one namespace.
type portReservation struct {
	sys       sysctls
	ns        netns.NS
	stateFile string
	// added are the ports the instance put into ip_local_reserved_ports:
	// the SNAT range less what was reserved before. Only these are taken
	// out again, and only those no other instance still holds.
	added portSet
}

func portStateFile(instance string, id netns.ID) string {
	return filepath.Join(portStateDir, fmt.Sprintf("%s.tc-reserved-ports-%d-%d", instance, id.Dev, id.Ino))
}

// portState is what a state file keeps: the ports the instance added
// (taken out when it stops) and the range it holds (kept while it runs,
// even when another instance stops).
type portState struct{ added, held portSet }

// The state file has lines "added=PORTS" and "held=PORTS". The first form
// of the file held only the namespace's value before the reservation (a
// line without a key): added is then the default range less that value,
// held the default range.
func readPortState(file string) (portState, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return portState{}, err
	}
	text := strings.TrimSpace(string(b))
	if !strings.Contains(text, "=") {
		original, err := parsePortList(text)
		if err != nil {
			return portState{}, fmt.Errorf("%s: %w", file, err)
		}
		return portState{added: defaultSNATRange.set().minus(original), held: defaultSNATRange.set()}, nil
	}
	var st portState
	seen := 0
	for _, line := range strings.Split(text, "\n") {
		key, value, _ := strings.Cut(line, "=")
		var dst *portSet
		switch key {
		case "added":
			dst = &st.added
		case "held":
			dst = &st.held
		default:
			continue
		}
		if *dst, err = parsePortList(value); err != nil {
			return portState{}, fmt.Errorf("%s: %s: %w", file, key, err)
		}
		seen++
	}
	if seen != 2 {
		return portState{}, fmt.Errorf("%s: want an added= and a held= line", file)
	}
	return st, nil
}

func writePortState(file string, st portState) error {
	if err := os.MkdirAll(portStateDir, 0o700); err != nil {
		return err
	}
	// Written whole, then renamed: a crash between the two leaves the
	// previous state, never half of one.
	tmp := file + ".tmp"
	if err := os.WriteFile(tmp, []byte("added="+st.added.String()+"\nheld="+st.held.String()+"\n"), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// otherStates are the states of the other instances that reserved ports in
// the namespace of stateFile.
func otherStates(stateFile string) []portState {
	suffix := stateFile[strings.LastIndex(stateFile, ".tc-reserved-ports-"):]
	files, _ := filepath.Glob(filepath.Join(portStateDir, "*"+suffix))
	var states []portState
	for _, f := range files {
		if f == stateFile {
			continue
		}
		if st, err := readPortState(f); err == nil {
			states = append(states, st)
		}
	}
	return states
}

// reservePorts adds r to ns's reserved ports, merged with what is there.
// A previous run's state file (a crash, a restart in place) says what that
// run added: those ports stay the instance's to take out, even though they
// are in the namespace's value now.
func reservePorts(sys sysctls, instance string, ns netns.NS, id netns.ID, r portRange) (*portReservation, error) {
	res := &portReservation{sys: sys, ns: ns, stateFile: portStateFile(instance, id)}
	value, err := sys.read(ns, reservedPortsSysctl)
	if err != nil {
		return nil, fmt.Errorf("read ip_local_reserved_ports in netns %s: %w", ns, err)
	}
	current, err := parsePortList(value)
	if err != nil {
		return nil, fmt.Errorf("ip_local_reserved_ports in netns %s: %w", ns, err)
	}
	previous, err := readPortState(res.stateFile)
	fresh := errors.Is(err, os.ErrNotExist)
	if err != nil && !fresh {
		return nil, fmt.Errorf("reserve SNAT ports: %w", err)
	}
	// Ours to take out: what we add now, what a previous run of ours
	// added, and what other instances added and we hold too (the last of
	// us to stop takes them out; the operator's own ports are never in it).
	var byOthers portSet
	for _, st := range otherStates(res.stateFile) {
		byOthers = byOthers.union(st.added)
	}
	res.added = previous.added.union(r.set().minus(current)).union(r.set().intersect(byOthers))
	// The state goes first: a crash right after the sysctl write must
	// find it.
	if err := writePortState(res.stateFile, portState{added: res.added, held: r.set()}); err != nil {
		return nil, fmt.Errorf("reserve SNAT ports: %w", err)
	}
	if want := current.union(r.set()); want != current {
		if err := sys.write(ns, reservedPortsSysctl, want.String()); err != nil {
			if fresh {
				os.Remove(res.stateFile)
			}
			return nil, fmt.Errorf("reserve the SNAT ports %s in netns %s: %w", r, ns, err)
		}
	}
	return res, nil
}

// restore takes the instance's ports out of the namespace's reserved
// ports, except those another instance's state file still holds there; what
// the operator reserved, before or meanwhile, stays. A namespace that is
// gone took its sysctls with it.
func (res *portReservation) restore() error {
	err := res.unreserve()
	if errors.Is(err, netns.ErrGone) {
		err = nil
	}
	if err == nil {
		if rerr := os.Remove(res.stateFile); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = rerr
		}
	}
	if err != nil {
		return fmt.Errorf("restore ip_local_reserved_ports in netns %s: %w", res.ns, err)
	}
	return nil
}

func (res *portReservation) unreserve() error {
	value, err := res.sys.read(res.ns, reservedPortsSysctl)
	if err != nil {
		return err
	}
	current, err := parsePortList(value)
	if err != nil {
		return err
	}
	drop := res.added
	for _, st := range otherStates(res.stateFile) {
		drop = drop.minus(st.held)
	}
	if want := current.minus(drop); want != current {
		return res.sys.write(res.ns, reservedPortsSysctl, want.String())
	}
	return nil
}

// restoreLeftPorts undoes the reservation a previous run left in a
// namespace this run no longer serves (nothing when it left none).
func restoreLeftPorts(sys sysctls, instance string, ns netns.NS) error {
	id, err := ns.ID()
	if err != nil {
		return nil // gone: nothing to restore
	}
	file := portStateFile(instance, id)
	st, err := readPortState(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return (&portReservation{sys: sys, ns: ns, stateFile: file, added: st.added}).restore()
}

// snatPorts chooses a namespace's SNAT range and keeps it from the
// namespace's own sockets. The default range is reserved. When that fails
// (a container's read-only /proc/sys), a range outside the namespace's
// ip_local_port_range is as safe: the default when the two do not overlap
// (the kernel's default 32768-60999 does not), else the larger part of
// 1024-65535 on either side of it, if it has minFallbackSNATPorts ports.
// Otherwise tc cannot serve the namespace without colliding, and it says
// so: the error names what to change.
func (d *Datapath) snatPorts(ns netns.NS, id netns.ID) (portRange, *portReservation, error) {
	res, err := reservePorts(d.sys(), d.Instance, ns, id, defaultSNATRange)
	if err == nil {
		d.warnFewLocalPorts(ns)
		return defaultSNATRange, res, nil
	}
	reserveErr := err
	local, err := d.localPortRange(ns)
	if err != nil {
		return portRange{}, nil, fmt.Errorf("cannot keep the SNAT ports from the namespace's own connections (%w), nor read its ip_local_port_range: %w", reserveErr, err)
	}
	if local.max < defaultSNATRange.min || local.min > defaultSNATRange.max {
		d.logger().Info("SNAT ports not reserved, but the namespace's own connections take ports outside them",
			"netns", ns.String(), "ip_local_port_range", local.String(), "snat_ports", defaultSNATRange.String(), "err", reserveErr)
		return defaultSNATRange, nil, nil
	}
	// The larger part of 1024-65535 on either side of the local range.
	var fallback portRange
	if local.min > defaultSNATRange.min {
		fallback = portRange{defaultSNATRange.min, local.min - 1}
	}
	if local.max < 65535 && 65535-int(local.max) > fallback.size() {
		fallback = portRange{local.max + 1, 65535}
	}
	if fallback.max == 0 || fallback.size() < minFallbackSNATPorts {
		return portRange{}, nil, fmt.Errorf("cannot keep the SNAT ports %s from the namespace's own connections (%w), and its ip_local_port_range %s leaves fewer than %d ports outside it: "+
			"reserve them (sysctl -w net.ipv4.ip_local_reserved_ports=%s in netns %s) or narrow ip_local_port_range",
			defaultSNATRange, reserveErr, local, minFallbackSNATPorts, defaultSNATRange, ns)
	}
	d.logger().Warn("SNAT ports narrowed: they could not be reserved, so translated flows take ports outside the namespace's ip_local_port_range; this bounds new flows per node to about range/2s",
		"netns", ns.String(), "snat_ports", fallback.String(), "ip_local_port_range", local.String(), "err", reserveErr)
	return fallback, nil, nil
}

// localPortRange reads the ephemeral range the namespace's sockets take
// their ports from.
func (d *Datapath) localPortRange(ns netns.NS) (portRange, error) {
	value, err := d.sys().read(ns, localPortRangeSysctl)
	if err != nil {
		return portRange{}, err
	}
	var lo, hi uint16
	if _, err := fmt.Sscan(value, &lo, &hi); err != nil || lo > hi {
		return portRange{}, fmt.Errorf("ip_local_port_range %q: want two ports, low and high", value)
	}
	return portRange{lo, hi}, nil
}

// warnFewLocalPorts warns when the reservation leaves the namespace's own
// connections (the listener's dials, node probes) few ephemeral ports: an
// ip_local_port_range inside the SNAT range leaves them none, and connect(2)
// then fails with EADDRNOTAVAIL.
func (d *Datapath) warnFewLocalPorts(ns netns.NS) {
	local, err := d.localPortRange(ns)
	if err != nil {
		return
	}
	value, err := d.sys().read(ns, reservedPortsSysctl)
	if err != nil {
		return
	}
	reserved, err := parsePortList(value)
	if err != nil {
		return
	}
	if left := local.set().minus(reserved).len(); left < minFallbackSNATPorts {
		d.logger().Warn("the namespace's own connections have few ephemeral ports left: its ip_local_port_range lies within the reserved SNAT ports; move it above them",
			"netns", ns.String(), "ip_local_port_range", local.String(), "snat_ports", defaultSNATRange.String(), "ports_left", left)
	}
}

func (d *Datapath) sys() sysctls {
	if d.sysctls != nil {
		return d.sysctls
	}
	return procSysctls{}
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
