// Package loader loads ebpfwd's tc NAT program (package bpf), attaches it to
// interfaces inside a network namespace, pins it under
// /sys/fs/bpf/ebpfwd/<instance>/<namespace>/, and gives typed access to its maps:
// services and nodes in, counters and connections out.
//
// One Loader serves one network namespace (the one its services listen in):
// interface indexes, which the maps and the program's route hints hold, only
// mean something inside one namespace.
//
// The pin directory is locked with flock(2) for the life of the Loader, so
// two processes never drive the same instance. A directory that is not
// locked but not empty is what a previous run left: one that re-executed
// itself to restart (Release) or one that crashed. Load takes its state
// over so that established flows keep going (see restart.go): compatible
// maps are reused, pinned tcx links are adopted by Attach and get the new
// program, and what the new run does not need goes with PruneServices and
// PruneLinks. Maps a new program cannot use are wiped, and with them
// everything pinned.
package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/bpf"
	"github.com/ebpfwd/ebpfwd/netns"
)

// SNATPortsEnv, set to MIN-MAX in the daemon's environment, replaces the
// SNAT port range of every Loader, whatever its Config (the tc datapath's
// choice for the namespace) says. It is a test knob, reachable from no
// configuration file: end-to-end tests use a range of a few ports to run a
// node out of them (docs/DATAPATHS.md).
const SNATPortsEnv = "EBPFWD_TEST_SNAT_PORTS"

// Defaults of Config.
const (
	DefaultBPFFS = "/sys/fs/bpf"
	// The SNAT range ends below the kernel's default ip_local_port_range
	// (32768-60999), so translated flows never take a port the gateway
	// namespace's own connections could get, and is wide because it bounds
	// the flows to one node that are open or closed within the last 2s.
	DefaultSNATPortMin   = 1024
	DefaultSNATPortMax   = 32767
	DefaultTCPSynTimeout = 60 * time.Second
	// A closed flow (FIN both ways) stays this long for late FINs and ACKs.
	// Longer hurts: a client reusing its port within it restarts the old
	// flow on the old SNAT port, which met the node's TIME_WAIT and cut the
	// connection rate to a third of direct routing at 60s (make bench);
	// 10s is netfilter's own timeout for a closed connection.
	DefaultTCPClosingTimeout = 10 * time.Second
	DefaultTCPResetTimeout   = 10 * time.Second
	// DefaultTCPIdleTimeout applies to established TCP flows of a service
	// without an idle timeout of its own (the BPF maps need a finite one).
	DefaultTCPIdleTimeout = 2 * time.Hour
	// DefaultUDPIdleTimeout applies to UDP flows of a service without one.
	DefaultUDPIdleTimeout = 60 * time.Second
)

// AttachMode chooses how the program is attached to an interface.
type AttachMode int

const (
	// AttachAuto uses tcx and falls back to clsact + cls_bpf where the
	// kernel has no tcx (before 6.6).
	AttachAuto AttachMode = iota
	// AttachTCX requires tcx.
	AttachTCX
	// AttachLegacy always uses a clsact qdisc with a direct-action cls_bpf
	// filter.
	AttachLegacy
)

// Config says where an instance lives and how the program behaves.
type Config struct {
	// Instance names the daemon: its pins are under
	// /sys/fs/bpf/ebpfwd/<Instance>/.
	Instance string
	// Netns is the namespace the Loader serves (the zero NS: the daemon's
	// own). Its identity picks the pin directory <Instance>/<NetnsDir(id)>,
	// so that every namespace has maps of its own, however it is spelled,
	// and a later run can tell which namespace a directory belongs to
	// (PruneNamespaces).
	Netns netns.NS
	// BPFFS is where bpffs is (or gets) mounted; "" means /sys/fs/bpf.
	BPFFS string
	// SNATPortMin and SNATPortMax bound the SNAT source ports (inclusive);
	// both 0 means 1024-32767.
	SNATPortMin, SNATPortMax uint16
	// Timeouts of TCP flows that are opening, closing (FIN both ways) or
	// reset; 0 means the default. A TCPClosingTimeout of 2s or less (the
	// program's tcp_closed_reuse_ns) is known to make the verifier give up
	// on the program (1M instructions): Load then fails.
	TCPSynTimeout, TCPClosingTimeout, TCPResetTimeout time.Duration
	// Attach chooses tcx or the legacy tc attachment.
	Attach AttachMode
	// Logger receives what the loader does on its own: taking over or
	// wiping a previous run's pins, mounting bpffs, adopting links. nil
	// means slog.Default(), looked up at each message: the warnings that
	// flows were cut must not vanish because a caller left it unset.
	Logger *slog.Logger
}

// logger is Logger, or slog.Default() when it is nil.
func (c Config) logger() *slog.Logger {
	if c.Logger != nil {
		return c.Logger
	}
	return slog.Default()
}

func (c *Config) setDefaults() error {
	if c.Instance == "" || c.Instance != filepath.Base(c.Instance) || c.Instance == "." || c.Instance == ".." {
		return fmt.Errorf("instance name %q: must be a single path element", c.Instance)
	}
	if _, err := c.Netns.ID(); err != nil {
		return fmt.Errorf("identify the namespace for its pin directory: %w", err)
	}
	if c.BPFFS == "" {
		c.BPFFS = DefaultBPFFS
	}
	if c.SNATPortMin == 0 && c.SNATPortMax == 0 {
		c.SNATPortMin, c.SNATPortMax = DefaultSNATPortMin, DefaultSNATPortMax
	}
	if v, ok := os.LookupEnv(SNATPortsEnv); ok {
		if _, err := fmt.Sscanf(v, "%d-%d", &c.SNATPortMin, &c.SNATPortMax); err != nil {
			return fmt.Errorf("%s=%q: want MIN-MAX: %w", SNATPortsEnv, v, err)
		}
		c.logger().Warn("SNAT port range narrowed from the environment (a test knob: the range bounds the flows each node can hold)",
			"env", SNATPortsEnv, "snat_ports", v)
	}
	if c.SNATPortMin == 0 || c.SNATPortMin > c.SNATPortMax {
		return fmt.Errorf("SNAT port range %d-%d: want 1 <= min <= max", c.SNATPortMin, c.SNATPortMax)
	}
	for _, d := range []struct {
		v   *time.Duration
		def time.Duration
	}{{&c.TCPSynTimeout, DefaultTCPSynTimeout}, {&c.TCPClosingTimeout, DefaultTCPClosingTimeout}, {&c.TCPResetTimeout, DefaultTCPResetTimeout}} {
		if *d.v == 0 {
			*d.v = d.def
		}
		if *d.v < 0 {
			return fmt.Errorf("negative timeout %v", *d.v)
		}
	}
	return nil
}

// Loader owns one loaded instance of the NAT program: its maps, its
// attachments and its pin directory.
type Loader struct {
	cfg    Config
	pinDir string
	lock   *os.File // the pin directory, flock'ed while the Loader lives
	objs   bpf.NATObjects

	mu       sync.Mutex
	ns       *netns.NS // the namespace of the first attachment
	attached map[string]*attachment
	services map[ServiceID]*serviceState
	closed   bool
	// reused is true when the maps came from a previous run's pins.
	reused bool
}

// Load mounts bpffs if needed, claims the instance's pin directory, and
// loads the program with cfg's constants. The maps are pinned by name in
// the directory; maps a previous run pinned there are reused when the
// program's definitions still match them, and wiped (with every pin of the
// instance, which ends its flows) when they do not.
func Load(cfg Config) (*Loader, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("load tc datapath: %w", err)
	}
	if err := ensureBPFFS(cfg.BPFFS, cfg.logger()); err != nil {
		return nil, err
	}
	pinDir := cfg.pinDir()
	lock, err := claimPinDir(pinDir, cfg.logger())
	if err != nil {
		return nil, err
	}
	l := &Loader{
		cfg:      cfg,
		pinDir:   pinDir,
		lock:     lock,
		attached: make(map[string]*attachment),
		services: make(map[ServiceID]*serviceState),
	}
	if err := l.load(); err != nil {
		// A previous run's pins stay for a run that can load (the
		// directories go only if they are empty).
		removeEmptyParents(pinDir)
		lock.Close()
		return nil, err
	}
	return l, nil
}

func (l *Loader) load() error {
	pinned, err := hasMapPins(l.pinDir)
	if err != nil {
		return err
	}
	err = l.loadObjects()
	if errors.Is(err, ebpf.ErrMapIncompatible) {
		// A binary whose maps changed shape cannot read the old ones:
		// start over. The old flows end here, which is logged loudly.
		l.cfg.logger().Warn("pinned maps of a previous run do not fit this program: removing every pin of the instance and starting fresh; flows in progress are cut",
			"dir", l.pinDir, "err", err)
		if err := emptyDir(l.pinDir); err != nil {
			return err
		}
		pinned = false
		err = l.loadObjects()
	}
	if err != nil {
		return err
	}
	l.reused = pinned
	if pinned {
		l.cfg.logger().Info("reusing the pinned maps of a previous run: its flows keep going", "dir", l.pinDir)
	}
	return nil
}

// loadObjects loads the program and its maps, reusing compatible maps
// pinned in the pin directory.
func (l *Loader) loadObjects() error {
	spec, err := bpf.LoadNAT()
	if err != nil {
		return fmt.Errorf("read embedded NAT program: %w", err)
	}
	consts := map[string]any{
		"snat_port_min":          l.cfg.SNATPortMin,
		"snat_port_max":          l.cfg.SNATPortMax,
		"tcp_syn_timeout_ns":     uint64(l.cfg.TCPSynTimeout),
		"tcp_closing_timeout_ns": uint64(l.cfg.TCPClosingTimeout),
		"tcp_reset_timeout_ns":   uint64(l.cfg.TCPResetTimeout),
	}
	for name, v := range consts {
		vs, ok := spec.Variables[name]
		if !ok {
			return fmt.Errorf("NAT program has no constant %s", name)
		}
		if err := vs.Set(v); err != nil {
			return fmt.Errorf("set constant %s = %v: %w", name, v, err)
		}
	}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: l.pinDir}}
	if err := spec.LoadAndAssign(&l.objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return fmt.Errorf("load NAT program: %+v", verr)
		}
		return fmt.Errorf("load NAT program (maps pinned in %s): %w", l.pinDir, err)
	}
	return nil
}

// PinDir is the instance's directory in bpffs.
func (l *Loader) PinDir() string { return l.pinDir }

// Reused reports whether the maps, and with them the flows, services and
// counters, came from a previous run's pins.
func (l *Loader) Reused() bool { return l.reused }

// Close detaches every attachment, removes the pins and the pin directory,
// and releases the instance.
func (l *Loader) Close() error {
	_, err := l.finish((*attachment).detach, func() []error {
		var errs []error
		for _, m := range []*ebpf.Map{l.objs.EbpfwdServices, l.objs.EbpfwdNodes, l.objs.EbpfwdConntrack,
			l.objs.EbpfwdReverse, l.objs.EbpfwdIfaces, l.objs.EbpfwdCounters, l.objs.EbpfwdNodeEvents} {
			if err := m.Unpin(); err != nil {
				errs = append(errs, fmt.Errorf("unpin map %s: %w", m, err))
			}
		}
		return errs
	}, func() []error {
		if err := os.RemoveAll(l.pinDir); err != nil {
			return []error{fmt.Errorf("remove pin directory: %w", err)}
		}
		removeEmptyParents(l.pinDir)
		return nil
	})
	return err
}

// finish ends the Loader once (Close and Release): every attachment is let
// go by drop, beforeClose runs before the objects are closed and
// afterClose after, then the instance's lock is released. Errors of every
// step are joined; ended is false when the Loader had ended already.
func (l *Loader) finish(drop func(*attachment) error, beforeClose, afterClose func() []error) (ended bool, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return false, nil
	}
	l.closed = true
	var errs []error
	for key, a := range l.attached {
		if err := drop(a); err != nil {
			errs = append(errs, err)
		}
		delete(l.attached, key)
	}
	if beforeClose != nil {
		errs = append(errs, beforeClose()...)
	}
	if err := l.objs.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close NAT objects: %w", err))
	}
	if afterClose != nil {
		errs = append(errs, afterClose()...)
	}
	l.lock.Close() // releases the flock
	return true, errors.Join(errs...)
}

// removeEmptyParents removes the pin directory if it is empty, then the
// instance's directory and the shared ebpfwd directory if they are: each
// goes when its last user does. While another namespace's Loader or
// another instance lives, rmdir fails with ENOTEMPTY, which is fine.
func removeEmptyParents(pinDir string) {
	instanceDir := filepath.Dir(pinDir)
	for _, dir := range []string{pinDir, instanceDir, filepath.Dir(instanceDir)} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return
		}
	}
}

// bpfFSMagic is BPF_FS_MAGIC from linux/magic.h.
const bpfFSMagic = 0xcafe4a11

// ensureBPFFS mounts bpffs at dir unless it already is one: pins need it,
// and some machines boot without it.
func ensureBPFFS(dir string, log *slog.Logger) error {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err == nil && st.Type == bpfFSMagic {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", dir, err)
	}
	log.Info("mounted bpffs", "dir", dir)
	return nil
}

// claimPinDir creates and flocks the pin directory. What a previous run
// left there is kept for Load to take over, except entries that are none
// of ours (neither a map nor a link pin), which are removed.
func claimPinDir(dir string, log *slog.Logger) (*os.File, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory %s: %w", dir, err)
	}
	// os.Open sets O_CLOEXEC: the lock never survives a re-exec, so the
	// restarted daemon can take it again.
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("open pin directory %s: %w", dir, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("pin directory %s is in use by another ebpfwd process", dir)
		}
		return nil, fmt.Errorf("lock pin directory %s: %w", dir, err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("read pin directory %s: %w", dir, err)
	}
	var removed []string
	for _, e := range entries {
		if isMapPin(e.Name()) || isLinkPin(e.Name()) {
			continue
		}
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			f.Close()
			return nil, fmt.Errorf("remove unknown pin %s: %w", filepath.Join(dir, e.Name()), err)
		}
		removed = append(removed, e.Name())
	}
	if len(removed) > 0 {
		log.Warn("removed unknown entries from the pin directory", "dir", dir, "entries", removed)
	}
	return f, nil
}

// emptyDir removes every entry of dir. Removing a link's pin releases the
// link and with it the attachment; removing a map's pin frees the map once
// no program uses it.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read pin directory %s: %w", dir, err)
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return fmt.Errorf("remove pin %s: %w", filepath.Join(dir, e.Name()), err)
		}
	}
	return nil
}
