package main

import (
	"flag"
	"fmt"

	"github.com/ebpfwd/ebpfwd/daemon"
)

// cmdPlan is `ebpfwd plan`: the datapath each service of CONFIG gets.
func cmdPlan(e env, args []string) int {
	path, ok := parseArgs(e, flag.NewFlagSet("plan", flag.ContinueOnError), args)
	if !ok {
		return 2
	}
	cfg, ok := loadConfig(e, path)
	if !ok {
		return 1
	}
	d, err := daemon.New(cfg, daemon.Options{Datapaths: planningDatapaths()}, discardLogger())
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return 1
	}
	for _, p := range d.Plans() {
		fmt.Fprintf(e.stdout, "%s\t%s\t%s\n", p.Service, p.Datapath, p.Reason)
	}
	return 0
}
