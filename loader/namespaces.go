package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/netns"
)

// An instance's pins are laid out by namespace, by its identity:
//
//	/sys/fs/bpf/ebpfwd/<instance>/ns-<dev>-<ino>/
//
// where dev and ino identify the namespace's nsfs file (netns.ID). However
// a configuration spells the namespace (`blue`, /var/run/netns/blue,
// /proc/PID/ns/net of a process in it, "" for the daemon's own), its pins
// are one directory, also across runs that spell it differently; and no
// instance name can collide with another's namespace directory. A run that
// no longer serves a namespace finds it again by its identity
// (netns.Find) to remove what a crashed run left attached there
// (PruneNamespaces).
const netnsDirStart = "ns-"

// NetnsDir is the directory name, under the instance's, of the namespace
// whose identity is id.
func NetnsDir(id netns.ID) string {
	return fmt.Sprintf("%s%d-%d", netnsDirStart, id.Dev, id.Ino)
}

// netnsOfDir reverses NetnsDir; ok is false for a name NetnsDir never makes.
func netnsOfDir(name string) (id netns.ID, ok bool) {
	rest, found := strings.CutPrefix(name, netnsDirStart)
	if !found {
		return netns.ID{}, false
	}
	if _, err := fmt.Sscanf(rest, "%d-%d", &id.Dev, &id.Ino); err != nil || NetnsDir(id) != name {
		return netns.ID{}, false
	}
	return id, true
}

// pinDir is the Loader's pin directory for c.
func (c Config) pinDir() string {
	// setDefaults checked that the namespace can be identified.
	id, _ := c.Netns.ID()
	return filepath.Join(c.instanceDir(), NetnsDir(id))
}

func (c Config) instanceDir() string {
	bpffs := c.BPFFS
	if bpffs == "" {
		bpffs = DefaultBPFFS
	}
	return filepath.Join(bpffs, "ebpfwd", c.Instance)
}

// errPinDirBusy: another process holds the pin directory's lock.
var errPinDirBusy = errors.New("pin directory is in use by another process")

// PruneNamespaces removes what a previous run of cfg.Instance left in the
// namespaces it pinned state for that are not in serving (the identities
// of the namespaces this run has a Loader in): it detaches the program (removing
// its pinned tcx links; deleting its cls_bpf filters where the namespace
// still exists) and removes the namespace's pins, which frees its maps. A
// run that crashed would otherwise leave its program translating, for ever,
// the services of a namespace the new configuration dropped. It returns
// the namespaces it cleaned that still exist, so that the caller can
// remove what else it kept there (splice links). A directory whose lock another
// process holds is left alone.
func PruneNamespaces(cfg Config, serving []netns.ID) ([]netns.NS, error) {
	instanceDir := cfg.instanceDir()
	entries, err := os.ReadDir(instanceDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("prune namespaces: read %s: %w", instanceDir, err)
	}
	keep := map[string]bool{}
	for _, id := range serving {
		keep[NetnsDir(id)] = true
	}
	var (
		pruned []netns.NS
		errs   []error
	)
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		path := filepath.Join(instanceDir, e.Name())
		id, ok := netnsOfDir(e.Name())
		if !ok || !e.IsDir() {
			// Nothing of the layout: a link pin is detached first, so
			// that removing it means the program is gone.
			var err error
			if isLinkPin(e.Name()) {
				err = removeLinkPin(path)
			} else {
				err = os.RemoveAll(path)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("remove unknown pin %s: %w", path, err))
			} else {
				cfg.logger().Warn("removed an unknown entry from the instance's pin directory", "path", path)
			}
			continue
		}
		// The namespace may be gone (then so are its interfaces and
		// their filters); ok says whether it was found.
		ns, found := netns.Find(id)
		switch err := pruneNamespaceDir(path, id, ns, found, cfg.logger()); {
		case errors.Is(err, errPinDirBusy):
			cfg.logger().Warn("pins of a namespace this run does not serve are in use by another process: left alone",
				"netns", describeNS(ns, found, id), "dir", path)
		case err != nil:
			errs = append(errs, fmt.Errorf("netns %s: %w", describeNS(ns, found, id), err))
		case found:
			pruned = append(pruned, ns)
		}
	}
	_ = os.Remove(instanceDir) // only if this left it empty
	_ = os.Remove(filepath.Dir(instanceDir))
	if err := errors.Join(errs...); err != nil {
		return pruned, fmt.Errorf("prune namespaces of instance %s: %w", cfg.Instance, err)
	}
	return pruned, nil
}

// pruneNamespaceDir detaches and removes one namespace's leftovers.
// describeNS names a namespace for logs: as found, or by its identity.
func describeNS(ns netns.NS, found bool, id netns.ID) string {
	if found {
		return ns.String()
	}
	return "gone (" + id.String() + ")"
}

func pruneNamespaceDir(dir string, id netns.ID, ns netns.NS, found bool, log *slog.Logger) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			return errPinDirBusy
		}
		return fmt.Errorf("lock %s: %w", dir, err)
	}
	filters := 0
	if found {
		if filters, err = removeLegacyFilters(dir, ns); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	var links []string
	for _, e := range entries {
		if !isLinkPin(e.Name()) {
			continue
		}
		if err := removeLinkPin(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
		links = append(links, e.Name())
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	log.Info("removed the tc datapath a previous run left in a namespace this run does not serve",
		"netns", describeNS(ns, found, id), "dir", dir, "tcx_links", links, "cls_bpf_filters", filters)
	return nil
}

// removeLegacyFilters deletes the cls_bpf filters whose program uses the
// maps pinned in dir, on the interfaces the dir's ifaces map names, in the
// namespace ns. Filters cannot be pinned: they stay on their interface
// until deleted, so this is the only way a later run finds them. A
// namespace that is gone took its filters with it. It returns how many it
// deleted.
func removeLegacyFilters(dir string, ns netns.NS) (int, error) {
	ifaces, err := ebpf.LoadPinnedMap(filepath.Join(dir, "ebpfwd_ifaces"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil // nothing was ever attached
	}
	if err != nil {
		return 0, fmt.Errorf("open pinned ifaces map in %s: %w", dir, err)
	}
	defer ifaces.Close()
	info, err := ifaces.Info()
	if err != nil {
		return 0, fmt.Errorf("read ifaces map info: %w", err)
	}
	mapID, ok := info.ID()
	if !ok {
		return 0, errors.New("ifaces map has no ID: cannot tell our filters from others")
	}
	var (
		ifindex, flags uint32
		ifindexes      []int
	)
	it := ifaces.Iterate()
	for it.Next(&ifindex, &flags) {
		ifindexes = append(ifindexes, int(ifindex))
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("walk ifaces map in %s: %w", dir, err)
	}
	if len(ifindexes) == 0 {
		return 0, nil
	}
	deleted := 0
	err = ns.Do(func() error {
		for _, idx := range ifindexes {
			n, err := deleteFiltersUsing(idx, mapID)
			deleted += n
			if err != nil {
				return err
			}
		}
		return nil
	})
	if errors.Is(err, netns.ErrGone) {
		return deleted, nil
	}
	if err != nil {
		return deleted, fmt.Errorf("delete cls_bpf filters in netns %s: %w", ns, err)
	}
	return deleted, nil
}

// deleteFiltersUsing deletes ingress cls_bpf filters at our priority on
// ifindex whose program uses the map mapID. The check by map, not by name,
// leaves alone the filters of another instance and a filter on an
// interface that took over a vanished one's index.
func deleteFiltersUsing(ifindex int, mapID ebpf.MapID) (int, error) {
	lnk, err := netlink.LinkByIndex(ifindex)
	if err != nil {
		return 0, nil // interface gone, filter with it
	}
	filters, err := netlink.FilterList(lnk, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return 0, fmt.Errorf("list ingress filters of %s: %w", lnk.Attrs().Name, err)
	}
	deleted := 0
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || bf.Priority != legacyFilterPriority || !programUsesMap(bf.Id, mapID) {
			continue
		}
		if err := netlink.FilterDel(bf); err != nil && !errors.Is(err, unix.ENOENT) {
			return deleted, fmt.Errorf("delete cls_bpf filter of %s: %w", lnk.Attrs().Name, err)
		}
		deleted++
	}
	return deleted, nil
}

func programUsesMap(progID int, mapID ebpf.MapID) bool {
	prog, err := ebpf.NewProgramFromID(ebpf.ProgramID(progID))
	if err != nil {
		return false
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return false
	}
	ids, ok := info.MapIDs()
	return ok && slices.Contains(ids, mapID)
}
