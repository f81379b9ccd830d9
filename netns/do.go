package netns

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// original is the daemon's own network namespace, opened once at package
// initialisation and kept open for the life of the process: every Do returns
// its thread here. Package initialisation runs on the main goroutine locked to
// the main thread, so /proc/thread-self is the namespace the process started
// in, before any code could have moved a thread elsewhere.
var original = openOriginal()

type originalNS struct {
	fd  int
	err error
}

func openOriginal() originalNS {
	const path = "/proc/thread-self/ns/net"
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return originalNS{fd: -1, err: &os.PathError{Op: "open", Path: path, Err: err}}
	}
	return originalNS{fd: fd}
}

// setns is unix.Setns, replaceable by tests that need a failing restore.
var setns = unix.Setns

// errGoexit is reported when the function given to Do ends its goroutine with
// runtime.Goexit (for example t.FailNow in a test) instead of returning.
var errGoexit = errors.New("function called runtime.Goexit")

// outcome carries the end of a function run by Do back to the caller.
type outcome struct {
	err      error
	panicked bool
	panicVal any
}

// Do runs fn with the calling thread in namespace n and returns fn's error.
// For the daemon's own namespace fn runs directly. Otherwise fn runs on a
// fresh goroutine locked to its OS thread, which enters n before fn and
// returns to the original namespace after it; see the package documentation.
// A panic in fn is re-raised in the caller after the thread is restored.
//
// Errors entering the namespace are reported before fn runs; an error
// wrapping ErrGone means the namespace file no longer exists.
func (n NS) Do(fn func() error) error {
	if n.IsOwn() {
		return fn()
	}
	if original.err != nil {
		return &nsError{ns: n, err: fmt.Errorf("cannot return from it, original namespace unavailable: %w", original.err)}
	}
	done := make(chan outcome, 1)
	go n.runLocked(fn, done)
	out := <-done
	if out.panicked {
		panic(out.panicVal)
	}
	return out.err
}

// runLocked is the goroutine body of Do. It always sends exactly one outcome.
func (n NS) runLocked(fn func() error, done chan<- outcome) {
	runtime.LockOSThread()
	out := outcome{err: errGoexit} // replaced unless fn calls runtime.Goexit
	inOriginal := true
	defer func() {
		// Unlock only a thread known to be back in the original namespace.
		// Exiting while locked makes the runtime destroy the thread.
		if inOriginal {
			runtime.UnlockOSThread()
		}
		done <- out
	}()

	fd, err := n.open()
	if err != nil {
		out.err = err
		return
	}
	err = n.enter(fd)
	// The thread holds its own reference to the namespace now; keeping the
	// fd would only leak it.
	unix.Close(fd)
	if err != nil {
		out.err = err // a failed setns leaves the thread where it was
		return
	}

	inOriginal = false
	defer func() {
		if p := recover(); p != nil {
			out = outcome{panicked: true, panicVal: p}
		}
		if err := setns(original.fd, unix.CLONE_NEWNET); err != nil {
			slog.Error("cannot return thread to the original network namespace; discarding the thread",
				"netns", n.String(), "err", err)
			return
		}
		inOriginal = true
	}()
	out = outcome{err: fn()}
}

// enter moves the calling (locked) thread into the namespace open as fd.
func (n NS) enter(fd int) error {
	err := setns(fd, unix.CLONE_NEWNET)
	if err == nil {
		return nil
	}
	// setns says only EINVAL for a path that is not a network namespace;
	// verify explains what the path is instead.
	if verr := n.verify(fd); verr != nil {
		return verr
	}
	return &nsError{ns: n, err: os.NewSyscallError("setns", err)}
}
