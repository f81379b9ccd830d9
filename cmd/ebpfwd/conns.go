package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/datapath"
)

// instanceOf is the default instance name for a config file: its base name
// without extension.
func instanceOf(configPath string) string {
	base := filepath.Base(configPath)
	return strings.TrimSuffix(base, filepath.Ext(base))
}

func cmdConns(e env, args []string) int {
	var asJSON bool
	instance, ok := instanceArg(e, "conns", args, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print the flows as a JSON array, for scripts")
	})
	if !ok {
		return 2
	}
	flows, err := fetchFlows(instance)
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd conns: %v\n", err)
		return 1
	}
	if asJSON {
		if flows == nil {
			flows = []datapath.Flow{} // [] rather than null: nothing is open
		}
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(flows); err != nil {
			fmt.Fprintf(e.stderr, "ebpfwd conns: %v\n", err)
			return 1
		}
		return 0
	}
	printFlows(e, flows, time.Now())
	return 0
}

func fetchFlows(instance string) ([]datapath.Flow, error) {
	resp, err := controlRequest(instance, http.MethodGet, daemon.FlowsPath, 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("instance %q: %s", instance, resp.Status)
	}
	var flows []datapath.Flow
	if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil {
		return nil, fmt.Errorf("instance %q: decode flows: %w", instance, err)
	}
	return flows, nil
}

func printFlows(e env, flows []datapath.Flow, now time.Time) {
	sort.Slice(flows, func(i, j int) bool {
		if flows[i].Service != flows[j].Service {
			return flows[i].Service < flows[j].Service
		}
		return flows[i].Started.Before(flows[j].Started)
	})
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "SERVICE\tDATAPATH\tPROTO\tCLIENT\tNODE\tUPSTREAM\tSTATE\tAGE\tUP\tDOWN")
	for _, f := range flows {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", f.Service, f.Datapath, f.Network, f.Client,
			dash(f.Node), dash(f.Upstream), f.State, age(f.Started, now), f.BytesUp, f.BytesDown)
	}
	w.Flush()
	fmt.Fprintf(e.stdout, "%d flows\n", len(flows))
}

// age is how long ago a flow started, "-" when its datapath does not know.
func age(started, now time.Time) string {
	if started.IsZero() {
		return "-"
	}
	return now.Sub(started).Round(time.Second).String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
