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
// Go multiplexes goroutines over a pool of threads, so this package follows
// one rule: a namespace switch happens only on a fresh goroutine that holds
// runtime.LockOSThread, lasts for exactly one function (NS.Do), and the thread
// is switched back to the daemon's original namespace before it is unlocked.
// If switching back fails, the goroutine exits still locked, which makes the
// Go runtime destroy the thread instead of returning it to the pool in the
// wrong namespace. A function run by Do must create its sockets on its own
// goroutine: goroutines it starts run on other threads, in the original
// namespace.
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
		return NS{}, fmt.Errorf("netns %q: contains a NUL byte", spec)
	case filepath.IsAbs(spec):
		return NS{spec: spec, path: filepath.Clean(spec)}, nil
	case strings.Contains(spec, "/"):
		return NS{}, fmt.Errorf("netns %q: relative path; give a namespace name without '/' or an absolute path", spec)
	case spec == "." || spec == "..":
		return NS{}, fmt.Errorf("netns %q: not a valid namespace name", spec)
	case len(spec) > unix.NAME_MAX:
		return NS{}, fmt.Errorf("netns %q: name longer than %d bytes", spec, unix.NAME_MAX)
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
