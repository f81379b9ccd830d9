package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/ebpfwd/ebpfwd/config"
)

// Capability numbers from linux/capability.h.
const (
	capNetBindService = 10
	capNetAdmin       = 12 // veth links, addresses, tcx attachments, sysctls of a namespace
	capSysAdmin       = 21 // setns(2) into a network namespace; implies CAP_BPF and CAP_PERFMON
	capBPF            = 39 // bpf(2): maps and programs
)

// effectiveCaps reads the effective capability set from /proc/self/status.
func effectiveCaps() (uint64, error) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapEff:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapEff in /proc/self/status")
}

// errNoPrivileges is what missingPrivileges wraps.
var errNoPrivileges = errors.New("missing privileges")

// missingPrivileges names the capabilities cfg needs that this process
// lacks, so an unprivileged start fails with a message instead of an EPERM
// deep inside a namespace switch.
func missingPrivileges(cfg *config.Config) error {
	caps, err := effectiveCaps()
	if err != nil {
		return fmt.Errorf("read capabilities: %w", err)
	}
	return missingPrivilegesOf(cfg, caps)
}

// missingPrivilegesOf is missingPrivileges for the effective set caps.
// A service configured for tc needs what the tc datapath does; one on
// auto falls back to the userspace relay without it, and says why.
func missingPrivilegesOf(cfg *config.Config, caps uint64) error {
	has := func(c uint) bool { return caps&(1<<c) != 0 }
	var missing []string
	if usesNamespaces(cfg) && !has(capSysAdmin) {
		missing = append(missing, "CAP_SYS_ADMIN (to enter the network namespaces the config names)")
	}
	if tc := tcService(cfg); tc != "" {
		if !has(capNetAdmin) {
			missing = append(missing, fmt.Sprintf("CAP_NET_ADMIN (for the tc datapath of service %s: splice links, tcx attachments)", tc))
		}
		// The kernel's bpf_capable(): CAP_SYS_ADMIN does as well.
		if !has(capBPF) && !has(capSysAdmin) {
			missing = append(missing, fmt.Sprintf("CAP_BPF (to load the eBPF programs of the tc datapath of service %s)", tc))
		}
	}
	if low := lowPort(cfg); low != "" && !has(capNetBindService) {
		missing = append(missing, fmt.Sprintf("CAP_NET_BIND_SERVICE (to listen on %s)", low))
	}
	if len(missing) > 0 {
		return fmt.Errorf("%w: %s; run as root or grant them", errNoPrivileges, strings.Join(missing, ", "))
	}
	return nil
}

func usesNamespaces(cfg *config.Config) bool {
	for _, s := range cfg.Services {
		if !s.NetNS.IsOwn() || !s.NetNSOut.IsOwn() {
			return true
		}
	}
	for _, c := range cfg.Chains {
		for _, h := range c.Hops {
			if !h.NetNS.IsOwn() {
				return true
			}
			for _, n := range h.Nodes {
				if !n.NetNS.IsOwn() {
					return true
				}
			}
		}
	}
	return false
}

// tcService returns the name of the first service configured for the tc
// datapath, if any.
func tcService(cfg *config.Config) string {
	for _, s := range cfg.Services {
		if s.Datapath == "tc" {
			return s.Name
		}
	}
	return ""
}

// lowPort returns the first listen address below port 1024, if any.
func lowPort(cfg *config.Config) string {
	for _, s := range cfg.Services {
		_, p, err := net.SplitHostPort(s.Addr)
		if err != nil {
			continue
		}
		if n, err := strconv.Atoi(p); err == nil && n < 1024 {
			return s.Addr
		}
	}
	return ""
}
