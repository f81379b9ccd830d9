package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/ebpfwd/ebpfwd/daemon"
)

// reloadTimeout bounds the wait for a reload: building and setting up the
// new services (loading BPF in a new namespace takes about a second).
const reloadTimeout = time.Minute

// cmdReload asks a running instance to reload its configuration file, as
// SIGHUP does, and prints what it did or why it refused.
func cmdReload(e env, args []string) int {
	instance, ok := instanceArg(e, "reload", args, nil)
	if !ok {
		return 2
	}
	resp, err := controlRequest(instance, http.MethodPost, daemon.ReloadPath, reloadTimeout)
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd reload: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	var answer daemon.ReloadAnswer
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd reload: instance %s: %s: %v\n", instance, resp.Status, err)
		return 1
	}
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(e.stderr, "ebpfwd reload: refused, the previous configuration keeps running:\n%s\n", answer.Error)
		return 1
	}
	fmt.Fprintf(e.stdout, "reloaded: %s\n", answer.Result)
	return 0
}
