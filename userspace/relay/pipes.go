package relay

import (
	"io"
	"sync"
	"sync/atomic"
)

// Splicing borrows a pipe: Go's runtime takes one (two descriptors) from a
// process-wide pool for every splice(2) call in progress, and keeps the
// pipes it made in that pool for reuse. So the descriptors a relay holds
// beyond its sockets grow with the number of directions moving bytes at
// once, which nothing else bounds: a thousand slow readers each hold one.
// The daemon's fd budget counts a stream as its two sockets and sets aside
// a fixed allowance of pipes for every stream to share; a direction that
// finds the allowance taken copies its chunk through a userspace buffer
// instead, which costs memory and a copy but no descriptor.
var splicePipes struct {
	max   atomic.Int64 // 0: no bound
	inUse atomic.Int64
	// copied counts chunks copied through a buffer for want of a pipe.
	copied atomic.Uint64
}

// SetSplicePipes bounds how many splice(2) calls (pipes) the process's
// relays run at once; n <= 0 removes the bound. The daemon sets it once
// at start, before any relay runs.
func SetSplicePipes(n int64) { splicePipes.max.Store(max(n, 0)) }

// SplicePipes returns the bound (0: none), the pipes in use, and how many
// chunks were copied through a buffer because the bound was reached.
func SplicePipes() (limit, inUse int64, copied uint64) {
	return splicePipes.max.Load(), splicePipes.inUse.Load(), splicePipes.copied.Load()
}

// takePipe reserves a pipe for one splice call; every true answer must be
// matched by givePipe.
func takePipe() bool {
	limit := splicePipes.max.Load()
	if limit == 0 {
		return true
	}
	if splicePipes.inUse.Add(1) > limit {
		splicePipes.inUse.Add(-1)
		splicePipes.copied.Add(1)
		return false
	}
	return true
}

func givePipe() {
	if splicePipes.max.Load() != 0 {
		splicePipes.inUse.Add(-1)
	}
}

// copyBuffers holds the buffers of chunks copied for want of a pipe: they
// are needed only while the allowance is exhausted, so they are pooled
// rather than kept per stream.
var copyBuffers = sync.Pool{New: func() any { b := make([]byte, bufferSize); return &b }}

// copyThroughBuffer moves one chunk from l to dst through a pooled buffer.
func copyThroughBuffer(dst io.Writer, l *io.LimitedReader) (int64, error) {
	b := copyBuffers.Get().(*[]byte)
	defer copyBuffers.Put(b)
	return io.CopyBuffer(writerOnly{dst}, l, *b)
}
