package metrics

import (
	"fmt"
	"io"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// EnableBPFStats makes the kernel account the run time and run count of
// every BPF program while the returned Closer is open (BPF_ENABLE_STATS),
// so that ebpfwd_bpf_program_* have values. The accounting costs a few
// nanoseconds per program run, so it is on only while metrics are served.
func EnableBPFStats() (io.Closer, error) {
	c, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF run-time statistics: %w", err)
	}
	return c, nil
}
