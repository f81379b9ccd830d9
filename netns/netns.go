// Package netns creates sockets inside Linux network namespaces. It is the one
// place in ebpfwd that switches namespaces; everything else asks an NS for a
// listener, a packet conn or a dialed connection.
//
// # The locked-thread rule
//
// A network namespace belongs to an OS thread, not to a process or a
// goroutine: setns(2) moves only the calling thread, and a socket belongs to
// the namespace its creating thread was in at socket(2) time. It stays there
// for its whole life, whichever thread later reads or writes it.
//
// Go multiplexes goroutines over a pool of threads, so a thread that is in
// another namespace must never run anything but the code meant for it:
// namespace switches happen only on a fresh goroutine that holds
// runtime.LockOSThread, and the thread is switched back to the daemon's
// original namespace before it is unlocked. If switching back fails, the
// goroutine exits still locked, which makes the Go runtime destroy the
// thread instead of returning it to the pool in the wrong namespace. Two
// kinds of goroutine do this:
//
//   - NS.Do runs one function in the namespace. It costs an open(2) and two
//     setns(2), and the thread is held until the function returns. A
//     function run by Do must create its sockets on its own goroutine:
//     goroutines it starts run on other threads, in the original namespace.
//     Listen, ListenPacket and the rare dials Dial leaves to the net package
//     (see below) use it; none of them waits for a remote peer.
//
//   - A socket maker serves NS.Dial. Since only socket(2) must happen in the
//     namespace, each namespace (by identity, see ID) gets one long-lived
//     goroutine, locked to a thread that entered the namespace once, which
//     creates sockets on request and nothing else. connect(2) and the wait
//     for it then happen on the dialing goroutine, on Go's netpoller, like
//     any dial. A dial pending towards an unresponsive peer therefore holds
//     no thread: holding one per dial, as running the whole connect inside
//     Do did, let a burst of dials to a blackholed node exhaust the
//     runtime's thread limit and kill the daemon. Waking a locked thread
//     costs more than socket(2) itself, so a maker also keeps a few spare
//     sockets of each kind made ahead and tops them up in batches; a new
//     connection in another namespace then costs about what one in the
//     daemon's own costs. A maker never runs on the main thread (whose namespace is
//     what /proc/PID/ns/net shows for the whole process), and it exits,
//     returning its thread, after some seconds without requests or as soon
//     as its path no longer names its namespace, so that it does not keep a
//     deleted namespace alive.
//
// Dial creates sockets itself for TCP and UDP to IP addresses, which is every
// dial after name resolution. Other networks, addresses the net package
// would reject, and an empty host (the local system) go to the net
// package's dialer inside Do, so that they behave and fail exactly as it
// does.
//
// # Namespaces that disappear
//
// Target namespaces are looked up by path on every use: Do and Listen open
// the path, and every Dial checks with stat(2) that the path still names
// the namespace whose maker it asks. So a namespace removed with `ip netns
// del` while the daemon runs makes new operations fail with an error
// wrapping ErrGone instead of silently using a namespace nobody else can
// reach anymore, and a namespace re-created under the same name is a new
// one. Sockets already open keep working.
//
// # Namespaces that disappear
//
// Target namespaces are opened by path on every use and never cached, so a
// namespace removed with `ip netns del` while the daemon runs makes new
// operations fail with an error wrapping ErrGone instead of silently using a
// namespace nobody else can reach anymore. Sockets already open keep working.
//
// # Names
//
// Host names are resolved the way `ip netns exec NAME` resolves them:
// /etc/netns/NAME/hosts and /etc/netns/NAME/resolv.conf replace their /etc
// counterparts when they exist, and DNS queries leave from inside the
// namespace.
package netns

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Directories iproute2 uses for named namespaces (NETNS_RUN_DIR and
// NETNS_ETC_DIR in ip/ip_common.h).
const (
	runDir = "/var/run/netns"
	etcDir = "/etc/netns"
)

// ErrGone is wrapped by errors about a namespace whose path no longer exists,
// typically because it was deleted while the daemon runs.
var ErrGone = errors.New("network namespace is gone")

// NS names a network namespace: the daemon's own (""), a name as `ip netns`
// names it (resolved under /var/run/netns), or an absolute path such as
// /proc/PID/ns/net. The zero NS is the daemon's own namespace.
type NS struct {
	spec string // as configured
	path string // file to open; "" for the daemon's own namespace
	name string // `ip netns` name; "" unless spec was a bare name
}

// Parse checks the syntax of a namespace spec. It does not touch the file
// system; use Check for that.
func Parse(spec string) (NS, error) {
	switch {
	case spec == "":
		return NS{}, nil
	case strings.ContainsRune(spec, 0):
		return NS{}, fmt.Errorf("network namespace %q contains a NUL byte", spec)
	case filepath.IsAbs(spec):
		return NS{spec: spec, path: filepath.Clean(spec)}, nil
	case strings.Contains(spec, "/"):
		return NS{}, fmt.Errorf("network namespace %q is a relative path: use a name (as `ip netns` lists it) or an absolute path", spec)
	case spec == "." || spec == "..":
		return NS{}, fmt.Errorf("network namespace name %q is not valid", spec)
	case len(spec) > unix.NAME_MAX:
		return NS{}, fmt.Errorf("network namespace name %q is longer than %d bytes", spec, unix.NAME_MAX)
	default:
		return NS{spec: spec, path: filepath.Join(runDir, spec), name: spec}, nil
	}
}

// String returns the namespace name, its path, or "(own)" for the daemon's
// own namespace.
func (n NS) String() string {
	switch {
	case n.IsOwn():
		return "(own)"
	case n.name != "":
		return n.name
	default:
		return n.path
	}
}

// Path returns the file that identifies the namespace, "" for the daemon's own.
func (n NS) Path() string { return n.path }

// IsOwn reports whether n is the daemon's own namespace.
func (n NS) IsOwn() bool { return n.path == "" }

// Check opens the namespace file and verifies that it really is a network
// namespace. The daemon's own namespace always passes.
func (n NS) Check() error {
	if n.IsOwn() {
		return nil
	}
	fd, err := n.open()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return n.verify(fd)
}

// open opens the namespace file. The caller closes the fd.
func (n NS) open() (int, error) {
	for {
		fd, err := unix.Open(n.path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == unix.EINTR {
			continue // a signal arrived before the open completed; nothing was opened
		}
		if err != nil {
			return -1, &nsError{ns: n, err: &os.PathError{Op: "open", Path: n.path, Err: err}, gone: err == unix.ENOENT}
		}
		return fd, nil
	}
}

// verify checks that fd refers to a network namespace: a file on nsfs whose
// namespace type is CLONE_NEWNET. It turns the kernel's bare EINVAL from
// setns into an error that says what is wrong with the configured path.
func (n NS) verify(fd int) error {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return &nsError{ns: n, err: &os.PathError{Op: "statfs", Path: n.path, Err: err}}
	}
	if fs.Type != unix.NSFS_MAGIC {
		return &nsError{ns: n, err: fmt.Errorf("%s is not a namespace file (file system type %#x, want nsfs)", n.path, fs.Type)}
	}
	kind, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return &nsError{ns: n, err: &os.PathError{Op: "ioctl NS_GET_NSTYPE", Path: n.path, Err: err}}
	}
	if kind != unix.CLONE_NEWNET {
		return &nsError{ns: n, err: fmt.Errorf("%s is a namespace of type %#x, not a network namespace", n.path, kind)}
	}
	return nil
}

// etcPath returns /etc/netns/NAME/file for a named namespace, "" otherwise.
// Only named namespaces have per-namespace configuration, exactly as with
// `ip netns exec`, which accepts only names.
func (n NS) etcPath(file string) string {
	if n.name == "" {
		return ""
	}
	return filepath.Join(etcDir, n.name, file)
}

// nsError is a failure to use the namespace itself (open, verify, setns),
// as opposed to a failure of the operation run inside it.
type nsError struct {
	ns   NS
	err  error
	gone bool // the namespace path no longer exists
}

func (e *nsError) Error() string { return fmt.Sprintf("netns %q: %v", e.ns.String(), e.err) }

func (e *nsError) Unwrap() []error {
	if e.gone {
		return []error{e.err, ErrGone}
	}
	return []error{e.err}
}

// ID identifies a network namespace: the device and inode of its nsfs file.
// Two specs name one namespace exactly when their IDs are equal, however
// they are spelled (`blue`, /var/run/netns/blue, /proc/PID/ns/net of a
// process in it). An ID stays valid while the namespace lives.
type ID struct{ Dev, Ino uint64 }

// String formats the ID as `ip netns identify`-style tools print inodes,
// with the device: "DEV:INO".
func (id ID) String() string { return fmt.Sprintf("%d:%d", id.Dev, id.Ino) }

// ID returns the namespace's identity. For a path it opens the file and
// checks that it is a network namespace, so a spec that names anything
// else is an error rather than an ID of some other file.
func (n NS) ID() (ID, error) {
	if n.IsOwn() {
		if original.err != nil {
			return ID{}, original.err
		}
		return fdID(original.fd)
	}
	fd, err := n.open()
	if err != nil {
		return ID{}, err
	}
	defer unix.Close(fd)
	if err := n.verify(fd); err != nil {
		return ID{}, err
	}
	id, err := fdID(fd)
	if err != nil {
		return ID{}, &nsError{ns: n, err: err}
	}
	return id, nil
}

func fdID(fd int) (ID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return ID{}, os.NewSyscallError("fstat", err)
	}
	return ID{Dev: uint64(st.Dev), Ino: st.Ino}, nil
}

// Same reports whether n and o are one namespace, by identity.
func (n NS) Same(o NS) (bool, error) {
	if n.path == o.path {
		return true, nil
	}
	a, err := n.ID()
	if err != nil {
		return false, err
	}
	b, err := o.ID()
	if err != nil {
		return false, err
	}
	return a == b, nil
}

// Spec is the namespace as ebpfwd writes it where one string must stand
// for it (a metric label, a log field): its `ip netns` name when its path is
// in iproute2's directory, else its path; "" for the daemon's own.
func (n NS) Spec() string {
	if n.name != "" {
		return n.name
	}
	if dir, base := filepath.Split(n.path); dir == runDir+"/" || dir == "/run/netns/" {
		return base
	}
	return n.path
}

// Find returns a namespace whose identity is id, looking where namespaces
// have names or paths: the daemon's own, iproute2's named namespaces, then
// every process's /proc/PID/ns/net. ok is false when none is found (the
// namespace is gone, or only an fd or a mount elsewhere holds it).
func Find(id ID) (ns NS, ok bool) {
	if own, err := (NS{}).ID(); err == nil && own == id {
		return NS{}, true
	}
	candidates := func(dir string, sub string) []string {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return nil
		}
		paths := make([]string, 0, len(entries))
		for _, e := range entries {
			paths = append(paths, filepath.Join(dir, e.Name(), sub))
		}
		return paths
	}
	for _, p := range append(candidates(runDir, ""), candidates("/proc", "ns/net")...) {
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil || uint64(st.Dev) != id.Dev || st.Ino != id.Ino {
			continue
		}
		spec := p
		if filepath.Dir(p) == runDir {
			spec = filepath.Base(p)
		}
		if found, err := Parse(spec); err == nil {
			return found, true
		}
	}
	return NS{}, false
}
