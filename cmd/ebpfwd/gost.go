package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/ebpfwd/ebpfwd/config"
)

// gostFlags are the flags of GOST's own command line that ebpfwd takes:
// `ebpfwd -L ... -F ...` behaves as `gost -L ... -F ...`.
var gostFlags = map[string]bool{"-L": true, "-F": true, "-C": true, "-O": true, "-D": false, "-V": false}

// runValueFlags are `ebpfwd run`'s flags that take a value, which may be
// given beside GOST's (--ready-file, --instance...).
var runValueFlags = map[string]bool{"--instance": true, "--ready-file": true, "--drain-timeout": true,
	"--splice-pool4": true, "--splice-pool6": true, "-instance": true, "-ready-file": true, "-drain-timeout": true,
	"-splice-pool4": true, "-splice-pool6": true}

// isGOSTCommandLine tells whether args are GOST's command line.
func isGOSTCommandLine(args []string) bool {
	if len(args) == 0 {
		return false
	}
	_, ok := gostFlags[args[0]]
	return ok
}

// cmdGOST runs GOST's command line: -L and -F become the YAML GOST's -O
// yaml prints, -O yaml prints it, -C FILE runs a file, -D logs at debug
// level, -V prints the version. The YAML is written under /run/ebpfwd
// (named after the command line) and run as a file would be, so restart
// in place works as for a file; it is removed when the daemon exits.
func cmdGOST(e env, args []string) int {
	var (
		cl       config.CommandLine
		file     string
		output   string
		runFlags []string
	)
	for i := 0; i < len(args); i++ {
		arg := args[i]
		takesValue, isGOST := gostFlags[arg]
		switch {
		case isGOST && takesValue:
			if i+1 >= len(args) {
				fmt.Fprintf(e.stderr, "ebpfwd: %s needs a value\n", arg)
				return 2
			}
			i++
			switch v := args[i]; arg {
			case "-L":
				cl.Services = append(cl.Services, v)
			case "-F":
				cl.Hops = append(cl.Hops, v)
			case "-C":
				file = v
			case "-O":
				output = v
			}
		case arg == "-D":
			cl.Debug = true
		case arg == "-V":
			return cmdVersion(e, nil)
		case runValueFlags[arg] && i+1 < len(args):
			runFlags = append(runFlags, arg, args[i+1])
			i++
		case strings.HasPrefix(arg, "-"):
			runFlags = append(runFlags, arg)
		default:
			fmt.Fprintf(e.stderr, "ebpfwd: unexpected argument %q (GOST's command line: -L URL... [-F URL...] [-D] [-O yaml], or -C FILE)\n", arg)
			return 2
		}
	}
	if file != "" {
		if len(cl.Services) > 0 || len(cl.Hops) > 0 {
			fmt.Fprintln(e.stderr, "ebpfwd: -C runs a file: give either -C FILE or -L/-F, not both")
			return 2
		}
		return cmdRun(e, append(runFlags, file))
	}
	doc, err := cl.YAML()
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd: %v\n", err)
		return 2
	}
	switch output {
	case "":
	case "yaml":
		// Checked as a file would be, so what it prints runs.
		if _, _, err := config.Parse("command line", doc); err != nil {
			fmt.Fprintln(e.stderr, err)
			return 1
		}
		e.stdout.Write(doc)
		return 0
	default:
		fmt.Fprintf(e.stderr, "ebpfwd: -O %q: ebpfwd prints yaml\n", output)
		return 2
	}
	path, err := writeCommandLineConfig(doc)
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd: %v\n", err)
		return 1
	}
	defer os.Remove(path)
	return cmdRun(e, append(runFlags, path))
}

// writeCommandLineConfig writes the YAML of a command line to
// /run/ebpfwd/gost-<hash>.yaml: the same command line gets the same file,
// and so the same default instance name.
func writeCommandLineConfig(doc []byte) (string, error) {
	sum := sha256.Sum256(doc)
	dir := "/run/ebpfwd"
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("command line: %w", err)
	}
	path := filepath.Join(dir, "gost-"+hex.EncodeToString(sum[:6])+".yaml")
	if err := os.WriteFile(path, doc, 0o600); err != nil {
		return "", fmt.Errorf("command line: %w", err)
	}
	return path, nil
}
