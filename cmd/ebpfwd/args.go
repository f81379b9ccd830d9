package main

import (
	"flag"
	"fmt"

	"github.com/ebpfwd/ebpfwd/config"
)

// parseArgs parses a command's flags and its one CONFIG argument. It
// returns false, after saying why, for a usage error (exit status 2).
func parseArgs(e env, fs *flag.FlagSet, args []string) (string, bool) {
	fs.SetOutput(e.stderr)
	if fs.Parse(args) != nil {
		return "", false
	}
	if fs.NArg() != 1 {
		fmt.Fprintf(e.stderr, "ebpfwd %s: exactly one CONFIG file is needed (got %d arguments)\n", fs.Name(), fs.NArg())
		return "", false
	}
	return fs.Arg(0), true
}

// loadConfig loads and validates path, printing warnings and errors.
func loadConfig(e env, path string) (*config.Config, bool) {
	cfg, warnings, err := config.Load(path)
	for _, w := range warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", w)
	}
	if err != nil {
		fmt.Fprintln(e.stderr, err)
		return nil, false
	}
	return cfg, true
}
