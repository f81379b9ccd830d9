package main

import (
	"flag"
	"fmt"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
)

// cmdCheck is `ebpfwd check`: every problem of CONFIG at once, without
// starting anything.
func cmdCheck(e env, args []string) int {
	path, ok := parseArgs(e, flag.NewFlagSet("check", flag.ContinueOnError), args)
	if !ok {
		return 2
	}
	// Every problem at once: configuration errors, then the namespaces even
	// of a configuration that is otherwise invalid.
	cfg, warnings, cfgErr := config.Inspect(path)
	for _, w := range warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", w)
	}
	if cfg == nil {
		fmt.Fprintln(e.stderr, cfgErr)
		return 1
	}
	failed := false
	report := func(err error) {
		if err != nil {
			fmt.Fprintln(e.stderr, err)
			failed = true
		}
	}
	report(cfgErr)
	if cfgErr == nil {
		_, err := daemon.New(cfg, daemon.Options{Datapaths: planningDatapaths()}, discardLogger())
		report(err)
	}
	if err := missingPrivileges(cfg); err != nil {
		report(fmt.Errorf("ebpfwd check: %w", err))
	} else {
		report(daemon.CheckNamespaces(cfg))
		if cfgErr == nil {
			report(daemon.Preflight(cfg))
		}
	}
	if failed {
		return 1
	}
	fmt.Fprintf(e.stdout, "%s: ok (%d services, %d chains)\n", path, len(cfg.Services), len(cfg.Chains))
	return 0
}
