package main

import "fmt"

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// cmdVersion is `ebpfwd version`.
func cmdVersion(e env, _ []string) int {
	fmt.Fprintf(e.stdout, "ebpfwd %s\n", version)
	return 0
}
