package tc

import (
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
)

// probe checks, once, what the tc datapath needs of the kernel.
var probe = sync.OnceValue(func() error {
	if err := features.HaveProgramType(ebpf.SchedCLS); err != nil {
		return fmt.Errorf("the kernel cannot run tc programs: %w", err)
	}
	if err := features.HaveMapType(ebpf.LRUHash); err != nil {
		return fmt.Errorf("the kernel has no LRU hash maps: %w", err)
	}
	for _, fn := range []asm.BuiltinFunc{asm.FnFibLookup, asm.FnRedirectNeigh, asm.FnRedirectPeer} {
		if err := features.HaveProgramHelper(ebpf.SchedCLS, fn); err != nil {
			return fmt.Errorf("the kernel lacks BPF helper %s for tc programs: %w", fn, err)
		}
	}
	return nil
})
