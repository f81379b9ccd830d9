package relay

import (
	"errors"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// The relay splices through pipes of its own, not through Go's
// (*net.TCPConn).ReadFrom: Go's splice keeps its pipe, and waits for more
// data, until the chunk is full or the read deadline passes, so a stream
// that moved a few bytes held a pipe (two descriptors) for up to a second
// after each burst, and a thousand chatty streams held a thousand pipes.
// Here a direction takes a pipe only once its socket is readable, moves
// what is there without waiting for more, drains the pipe into the
// destination (waiting only for the destination to take it) and gives the
// pipe back: pipes are held by bytes in transit, never by a wait for data.
//
// The daemon's fd budget counts a stream as its two sockets and sets aside
// an allowance of pipes every stream shares (SetSplicePipes); a direction
// that finds every pipe of the allowance in use copies through a pooled
// userspace buffer instead, which costs memory and a copy but no
// descriptor.

// spliceChunk is what one splice(2) call asks for: a pipe holds 64 KiB
// (the default pipe size), so a larger request moves at most that anyway.
const spliceChunk = 1 << 20

// maxIdlePipes bounds the pipes kept open for reuse when the allowance is
// unbounded (tests, a daemon without a budget): beyond it a returned pipe
// is closed.
const maxIdlePipes = 64

// pipe is one kernel pipe; both ends are non-blocking.
type pipe struct{ r, w int }

var pipes struct {
	mu   sync.Mutex
	free []*pipe
	open int64 // pipes that exist: free and in use

	max    atomic.Int64  // 0: no bound
	copied atomic.Uint64 // chunks copied through a buffer for want of a pipe
}

// SetSplicePipes bounds how many splice pipes the process's relays hold
// at once; n <= 0 removes the bound. The daemon sets it once at start,
// before any relay runs.
func SetSplicePipes(n int64) { pipes.max.Store(max(n, 0)) }

// SplicePipes returns the bound (0: none), the pipes in use now, and how
// many chunks were copied through a buffer because every pipe was in use.
func SplicePipes() (limit, inUse int64, copied uint64) {
	pipes.mu.Lock()
	inUse = pipes.open - int64(len(pipes.free))
	pipes.mu.Unlock()
	return pipes.max.Load(), inUse, pipes.copied.Load()
}

// getPipe returns a pipe for one burst, or nil when the allowance is in
// use (counted) or the kernel refuses a new one.
func getPipe() *pipe {
	pipes.mu.Lock()
	defer pipes.mu.Unlock()
	if n := len(pipes.free); n > 0 {
		p := pipes.free[n-1]
		pipes.free = pipes.free[:n-1]
		return p
	}
	if limit := pipes.max.Load(); limit > 0 && pipes.open >= limit {
		pipes.copied.Add(1)
		return nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		// Out of descriptors or pipe memory: the buffer path still works.
		pipes.copied.Add(1)
		return nil
	}
	pipes.open++
	return &pipe{r: fds[0], w: fds[1]}
}

// putPipe returns an empty pipe; dirty (bytes may be left in it, after a
// failed write) closes it instead, so no byte leaks into another stream.
func putPipe(p *pipe, dirty bool) {
	pipes.mu.Lock()
	defer pipes.mu.Unlock()
	if !dirty && (pipes.max.Load() > 0 || len(pipes.free) < maxIdlePipes) {
		pipes.free = append(pipes.free, p)
		return
	}
	unix.Close(p.r)
	unix.Close(p.w)
	pipes.open--
}

// spliceAvailable moves what src has now, at most limit bytes, into dst
// through p, and returns without waiting for more: eof when src reached
// its end. Called only once src is readable.
func spliceAvailable(src, dst syscall.RawConn, p *pipe, limit int64) (moved int64, eof bool, err error) {
	for moved < limit {
		var in int64
		var inErr error
		if err := src.Read(func(fd uintptr) bool {
			for {
				in, inErr = unix.Splice(int(fd), nil, p.w, nil, int(min(limit-moved, spliceChunk)), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if inErr != unix.EINTR {
					return true // never wait here: EAGAIN ends the burst
				}
			}
		}); err != nil {
			return moved, false, err
		}
		switch {
		case inErr == unix.EAGAIN:
			return moved, false, nil // nothing more for now (the pipe is empty)
		case inErr != nil:
			return moved, false, os.NewSyscallError("splice", inErr)
		case in == 0:
			return moved, true, nil
		}
		left := int(in)
		var outErr error
		if err := dst.Write(func(fd uintptr) bool {
			for left > 0 {
				out, err := unix.Splice(p.r, nil, int(fd), nil, left, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				switch {
				case err == unix.EAGAIN:
					return false // wait until dst takes more
				case err == unix.EINTR:
					continue
				case err != nil:
					outErr = os.NewSyscallError("splice", err)
					return true
				}
				left -= int(out)
			}
			return true
		}); err != nil && outErr == nil {
			outErr = err
		}
		moved += in - int64(left)
		if outErr != nil {
			return moved, false, &pipeLeftError{err: outErr, dirty: left > 0}
		}
	}
	return moved, false, nil
}

// pipeLeftError is a failed write that may have left bytes in the pipe.
type pipeLeftError struct {
	err   error
	dirty bool
}

func (e *pipeLeftError) Error() string { return e.err.Error() }
func (e *pipeLeftError) Unwrap() error { return e.err }

// copyBuffers holds the buffers of chunks copied for want of a pipe: they
// are needed only while the allowance is exhausted, so they are pooled
// rather than kept per stream.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, bufferSize); return &b }}

// copyAvailable moves one read's worth of src (already readable) to dst
// through a pooled buffer: eof when src reached its end.
func copyAvailable(src io.Reader, dst io.Writer, limit int64) (moved int64, eof bool, err error) {
	b := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(b)
	buf := (*b)[:min(int64(len(*b)), limit)]
	n, rerr := src.Read(buf)
	if n > 0 {
		w, werr := dst.Write(buf[:n])
		moved = int64(w)
		if werr != nil {
			return moved, false, werr
		}
	}
	switch {
	case errors.Is(rerr, io.EOF):
		return moved, true, nil
	case rerr != nil:
		return moved, false, rerr
	}
	return moved, false, nil
}
