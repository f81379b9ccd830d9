package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ebpfwd/ebpfwd/bpf"
)

// A restart keeps the kernel's state: the maps (services, nodes, conntrack,
// counters) stay pinned and the program stays attached through its pinned
// tcx links, so packets of established flows keep flowing while no process
// runs. The next Load takes the state over:
//
//   - Load reuses the pinned maps (they keep every flow),
//   - Attach adopts the pinned tcx link of an interface that still exists
//     and swaps the new program in with one atomic link update,
//   - PutService finds a service by its key and keeps its ID, which its
//     flows and counters refer to,
//   - once every service is set up, PruneServices deletes the services the
//     new configuration dropped and PruneLinks the links of interfaces that
//     are gone or no longer used.

// linkPinPrefix starts the pin name of a tcx link: link_<ifname>_<ifindex>.
const linkPinPrefix = "link_"

// linkPinName names the pin of the tcx link on an interface. bpffs refuses
// every name with a dot in it (EPERM, to pin and to look up alike: dots
// are reserved there), and interface names often have one (VLANs as
// eth0.100, the seeds' veth15.1): a dot is written '-'. The ifindex alone
// keeps the name unique in the namespace's pin directory, so eth0.100 and
// eth0-100 never share a pin.
func linkPinName(ifname string, ifindex int) string {
	return fmt.Sprintf("%s%s_%d", linkPinPrefix, strings.ReplaceAll(ifname, ".", "-"), ifindex)
}

func isLinkPin(name string) bool { return strings.HasPrefix(name, linkPinPrefix) }

// mapPinNames are the names the program's maps are pinned by.
func mapPinNames() ([]string, error) {
	spec, err := bpf.LoadNAT()
	if err != nil {
		return nil, fmt.Errorf("read embedded NAT program: %w", err)
	}
	var names []string
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	return names, nil
}

func isMapPin(name string) bool {
	names, err := mapPinNames()
	return err == nil && slices.Contains(names, name)
}

// hasMapPins reports whether a previous run left maps pinned in dir.
func hasMapPins(dir string) (bool, error) {
	names, err := mapPinNames()
	if err != nil {
		return false, err
	}
	for _, name := range names {
		switch _, err := os.Stat(filepath.Join(dir, name)); {
		case err == nil:
			return true, nil
		case !errors.Is(err, os.ErrNotExist):
			return false, fmt.Errorf("look for pinned map %s: %w", name, err)
		}
	}
	return false, nil
}

// Release gives the instance up without touching the kernel: the maps stay
// pinned, the program stays attached (through its pinned links, or its
// cls_bpf filters), and established flows keep going. It is how a daemon
// that re-executes itself hands the datapath to its next run, which Load
// and Attach take it over in. The Loader is unusable afterwards.
func (l *Loader) Release() error {
	ended, err := l.finish(func(a *attachment) error {
		if a.link == nil {
			return nil
		}
		// Closing our fd leaves the link alive: its pin holds it.
		if err := a.link.Close(); err != nil {
			return fmt.Errorf("close tcx link of %s: %w", a.ifname, err)
		}
		return nil
	}, nil, nil)
	if ended {
		l.cfg.logger().Info("tc datapath released for restart: program stays attached, maps stay pinned", "dir", l.pinDir)
	}
	return err
}

// adoptLink takes over the tcx link a previous run pinned for a's
// interface, if there is one, and swaps the new program in. It reports
// whether it did; a pin that does not describe this interface's ingress
// attachment is removed (which detaches it), and the caller attaches anew.
// It runs inside the Loader's namespace (ns.Do), with l.mu held.
func (l *Loader) adoptLink(a *attachment) (bool, error) {
	pin := filepath.Join(l.pinDir, linkPinName(a.ifname, a.ifindex))
	if _, err := os.Stat(pin); errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	lnk, err := link.LoadPinnedLink(pin, nil)
	if err == nil {
		if err = checkTCXIngress(lnk, a.ifindex); err == nil {
			// One atomic swap: no packet meets an interface without a
			// program, and a new binary's program replaces the old.
			if err = lnk.Update(l.objs.EbpfwdNat); err == nil {
				a.link, a.pinPath = lnk, pin
				l.cfg.logger().Info("adopted the pinned tcx link of a previous run", "interface", a.ifname, "ifindex", a.ifindex)
				return true, nil
			}
			err = fmt.Errorf("update its program: %w", err)
		}
		lnk.Close()
	}
	l.cfg.logger().Warn("cannot adopt pinned tcx link: removing it and attaching anew", "pin", pin, "err", err)
	if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("remove unusable link pin %s: %w", pin, err)
	}
	return false, nil
}

// checkTCXIngress verifies that lnk is a tcx ingress link on ifindex. A
// link whose interface was deleted reports ifindex 0.
func checkTCXIngress(lnk link.Link, ifindex int) error {
	info, err := lnk.Info()
	if err != nil {
		return fmt.Errorf("read link info: %w", err)
	}
	tcx := info.TCX()
	if tcx == nil {
		return fmt.Errorf("link type %d is not tcx", info.Type)
	}
	if int(tcx.Ifindex) != ifindex || ebpf.AttachType(tcx.AttachType) != ebpf.AttachTCXIngress {
		return fmt.Errorf("tcx link on ifindex %d (attach type %d), want ingress of ifindex %d", tcx.Ifindex, tcx.AttachType, ifindex)
	}
	return nil
}

// PruneLinks removes what a previous run attached that this run did not
// attach again: pinned tcx links of interfaces that are gone or that no
// service needs now (removing the pin detaches the program), and
// interface entries of the program's ifaces map. Call it once every
// service is set up. It returns how many link pins it removed.
func (l *Loader) PruneLinks() (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, errors.New("prune links: loader is closed")
	}
	inUse := map[string]bool{}
	ifindexes := map[uint32]bool{}
	for _, a := range l.attached {
		if a.pinPath != "" {
			inUse[filepath.Base(a.pinPath)] = true
		}
		ifindexes[uint32(a.ifindex)] = true
	}
	entries, err := os.ReadDir(l.pinDir)
	if err != nil {
		return 0, fmt.Errorf("prune links: read pin directory: %w", err)
	}
	var errs []error
	var removed []string
	for _, e := range entries {
		if !isLinkPin(e.Name()) || inUse[e.Name()] {
			continue
		}
		if err := removeLinkPin(filepath.Join(l.pinDir, e.Name())); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, e.Name())
	}
	var ifindex, flags uint32
	var staleIfaces []uint32
	it := l.objs.EbpfwdIfaces.Iterate()
	for it.Next(&ifindex, &flags) {
		if !ifindexes[ifindex] {
			staleIfaces = append(staleIfaces, ifindex)
		}
	}
	if err := it.Err(); err != nil {
		errs = append(errs, fmt.Errorf("walk ifaces map: %w", err))
	}
	for _, idx := range staleIfaces {
		if err := l.objs.EbpfwdIfaces.Delete(idx); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("forget interface %d: %w", idx, err))
		}
	}
	if len(removed) > 0 {
		l.cfg.logger().Info("removed tcx links of a previous run that this run does not use", "dir", l.pinDir, "pins", removed)
	}
	if err := errors.Join(errs...); err != nil {
		return len(removed), fmt.Errorf("prune links in %s: %w", l.pinDir, err)
	}
	return len(removed), nil
}

// PruneServices deletes every service in the maps that is not in keep (the
// IDs PutService returned during this run), with its nodes and counters,
// and node slots beyond a kept service's node count. A previous run's
// service the new configuration dropped thus stops translating new flows;
// its flows in progress expire. Call it once every service of the Loader
// is set up. It returns how many services it deleted.
func (l *Loader) PruneServices(keep []ServiceID) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return 0, errors.New("prune services: loader is closed")
	}
	nodeCount := map[uint32]uint32{}
	var (
		key      bpf.NATServiceKey
		svc      bpf.NATService
		stale    []bpf.NATServiceKey
		staleIDs []uint32
		errs     []error
	)
	it := l.objs.EbpfwdServices.Iterate()
	for it.Next(&key, &svc) {
		if slices.Contains(keep, ServiceID(svc.Id)) {
			nodeCount[svc.Id] = svc.NodeCount
			continue
		}
		stale = append(stale, key)
		staleIDs = append(staleIDs, svc.Id)
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("prune services: walk services map: %w", err)
	}
	// Services first: the program must never find a service whose nodes
	// are gone.
	for i, k := range stale {
		if err := l.objs.EbpfwdServices.Delete(k); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete service %d: %w", staleIDs[i], err))
		}
		delete(l.services, ServiceID(staleIDs[i]))
		if err := l.resetCounters(ServiceID(staleIDs[i])); err != nil {
			errs = append(errs, err)
		}
	}
	var (
		nk        bpf.NATNodeKey
		node      bpf.NATNode
		staleNode []bpf.NATNodeKey
	)
	nit := l.objs.EbpfwdNodes.Iterate()
	for nit.Next(&nk, &node) {
		if n, kept := nodeCount[nk.ServiceId]; !kept || nk.Index >= n {
			staleNode = append(staleNode, nk)
		}
	}
	if err := nit.Err(); err != nil {
		errs = append(errs, fmt.Errorf("walk nodes map: %w", err))
	}
	for _, k := range staleNode {
		if err := l.objs.EbpfwdNodes.Delete(k); err != nil && !isNotExist(err) {
			errs = append(errs, fmt.Errorf("delete node %d of service %d: %w", k.Index, k.ServiceId, err))
		}
		l.deleteNodeEvents(k)
	}
	if len(stale) > 0 {
		l.cfg.logger().Info("removed services of a previous run that the configuration no longer has; their flows expire",
			"dir", l.pinDir, "services", len(stale), "ids", staleIDs)
	}
	if err := errors.Join(errs...); err != nil {
		return len(stale), fmt.Errorf("prune services in %s: %w", l.pinDir, err)
	}
	return len(stale), nil
}

// resetCounters zeroes a service's counters, so that a service that later
// gets its ID starts from zero.
func (l *Loader) resetCounters(id ServiceID) error {
	n := uint32(bpf.NATCounterCOUNTER_MAX)
	zero := make([]uint64, ebpf.MustPossibleCPU())
	for c := range n {
		if err := l.objs.EbpfwdCounters.Put(uint32(id)*n+c, zero); err != nil {
			return fmt.Errorf("reset counter %d of service %d: %w", c, id, err)
		}
	}
	return nil
}

// removeLinkPin detaches a pinned link and removes its pin. Removing the pin
// alone would leave the program attached until the kernel releases the link
// in the background; detaching first makes "removed" mean gone.
func removeLinkPin(path string) error {
	if lk, err := link.LoadPinnedLink(path, nil); err == nil {
		if err := lk.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			lk.Close()
			return fmt.Errorf("detach stale link %s: %w", path, err)
		}
		lk.Close()
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale link pin %s: %w", path, err)
	}
	return nil
}
