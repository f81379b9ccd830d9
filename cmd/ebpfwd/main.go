// Command ebpfwd forwards TCP and UDP between Linux network namespaces,
// configured with GOST v3's YAML.
package main

import (
	"fmt"
	"io"
	"os"
)

// env is what a command may touch, injected so tests can run the CLI
// in-process.
type env struct {
	stdout, stderr io.Writer
}

type command struct {
	name, usage, help string
	run               func(e env, args []string) int
}

func commands() []command {
	return []command{
		{"run", "run [--instance NAME] [--ready-file PATH] [--drain-timeout D] CONFIG", "run the services of CONFIG in the foreground (SIGHUP: reload; SIGUSR2: restart in place)", cmdRun},
		{"reload", "reload [--instance NAME | CONFIG]", "reload the configuration of a running instance, as SIGHUP does, and print the outcome", cmdReload},
		{"conns", "conns [--json] [--instance NAME | CONFIG]", "list the live connections and flows of a running instance", cmdConns},
		{"check", "check CONFIG", "validate CONFIG and open every namespace it names", cmdCheck},
		{"plan", "plan CONFIG", "print the datapath chosen for each service, and why", cmdPlan},
		{"version", "version", "print the version", cmdVersion},
	}
}

func main() {
	os.Exit(dispatch(env{stdout: os.Stdout, stderr: os.Stderr}, os.Args[1:]))
}

func dispatch(e env, args []string) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(e.stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if isGOSTCommandLine(args) {
		return cmdGOST(e, args)
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(e, args[1:])
		}
	}
	fmt.Fprintf(e.stderr, "ebpfwd: unknown command %q\n\n", args[0])
	usage(e.stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: ebpfwd COMMAND [ARGS]\n       ebpfwd -L URL... [-F URL...] [-D] [-O yaml] | -C FILE | -V   (GOST's command line)\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-52s %s\n", c.usage, c.help)
	}
}
