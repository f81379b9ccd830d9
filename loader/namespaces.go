package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/netns"
)

// An instance's pins are laid out by namespace:
//
//	/sys/fs/bpf/ebpfwd/<instance>/own/        the daemon's own namespace
//	/sys/fs/bpf/ebpfwd/<instance>/ns-<spec>/  any other, spec path-escaped
//
// The directory name gives the namespace back, so a run that no longer
// serves a namespace can find it and remove what a crashed run left
// attached there (PruneNamespaces); and no instance name can collide with
// another's namespace directory.
const (
	ownNetnsDir     = "own"
	otherNetnsStart = "ns-"
)

// NetnsDir is the directory name, under the instance's, of the namespace
// ebpfwd names spec ("" for the daemon's own, an `ip netns` name or a path).
func NetnsDir(spec string) string {
	if spec == "" {
		return ownNetnsDir
	}
	return otherNetnsStart + url.PathEscape(spec)
}

// netnsOfDir reverses NetnsDir; ok is false for a name NetnsDir never makes.
func netnsOfDir(name string) (spec string, ok bool) {
	if name == ownNetnsDir {
		return "", true
	}
	escaped, found := strings.CutPrefix(name, otherNetnsStart)
	if !found || escaped == "" {
		return "", false
	}
	spec, err := url.PathUnescape(escaped)
	if err != nil || NetnsDir(spec) != name {
		return "", false
	}
	return spec, true
}

// pinDir is the Loader's pin directory for c.
func (c Config) pinDir() string {
	return filepath.Join(c.instanceDir(), NetnsDir(c.Netns))
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
// namespaces it pinned state for that are not in serving (the specs of the
// namespaces this run has a Loader in): it detaches the program (removing
// its pinned tcx links; deleting its cls_bpf filters where the namespace
// still exists) and removes the namespace's pins, which frees its maps. A
// run that crashed would otherwise leave its program translating, for ever,
// the services of a namespace the new configuration dropped. It returns
// the specs of the namespaces it cleaned, so that the caller can remove
// what else it kept there (splice links). A directory whose lock another
// process holds is left alone.
func PruneNamespaces(cfg Config, serving []string) ([]string, error) {
	instanceDir := cfg.instanceDir()
	entries, err := os.ReadDir(instanceDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("prune namespaces: read %s: %w", instanceDir, err)
	}
	keep := map[string]bool{}
	for _, spec := range serving {
		keep[NetnsDir(spec)] = true
	}
	var (
		pruned []string
		errs   []error
	)
	for _, e := range entries {
		if keep[e.Name()] {
			continue
		}
		path := filepath.Join(instanceDir, e.Name())
		spec, ok := netnsOfDir(e.Name())
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
		switch err := pruneNamespaceDir(path, spec, cfg.logger()); {
		case errors.Is(err, errPinDirBusy):
			cfg.logger().Warn("pins of a namespace this run does not serve are in use by another process: left alone",
				"netns", spec, "dir", path)
		case err != nil:
			errs = append(errs, fmt.Errorf("netns %q: %w", spec, err))
		default:
			pruned = append(pruned, spec)
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
func pruneNamespaceDir(dir, spec string, log *slog.Logger) error {
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
	filters, err := removeLegacyFilters(dir, spec)
	if err != nil {
		return err
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
		"netns", spec, "dir", dir, "tcx_links", links, "cls_bpf_filters", filters)
	return nil
}

// removeLegacyFilters deletes the cls_bpf filters whose program uses the
// maps pinned in dir, on the interfaces the dir's ifaces map names, in the
// namespace spec. Filters cannot be pinned: they stay on their interface
// until deleted, so this is the only way a later run finds them. A
// namespace that is gone took its filters with it. It returns how many it
// deleted.
func removeLegacyFilters(dir, spec string) (int, error) {
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
	ns, err := netns.Parse(spec)
	if err != nil {
		return 0, nil // not a namespace any more: nothing to enter
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
