package main

import (
	"log/slog"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/tc"
	"github.com/ebpfwd/ebpfwd/tc/splice"
	"github.com/ebpfwd/ebpfwd/userspace"
)

// datapaths registers every datapath this build has; the Set ranks them
// (tc before the userspace relay) and the daemon plans each service on it.
func datapaths(instance string, pool splice.Pool, logger *slog.Logger) *datapath.Set {
	return datapath.NewSet(
		userspace.Datapath{Logger: logger},
		&tc.Datapath{Instance: instance, Logger: logger, SplicePool: pool},
	)
}

// planningDatapaths are the datapaths for commands that only plan (check,
// plan, the configuration check before a restart): nothing is set up, so
// they need no instance, pool or logger.
func planningDatapaths() *datapath.Set { return datapaths("", splice.Pool{}, discardLogger()) }
