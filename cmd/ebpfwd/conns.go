package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
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
		fs.BoolVar(&asJSON, "json", false, "print the flows as a JSON array, for scripts (fields: docs/DATAPATHS.md)")
	})
	if !ok {
		return 2
	}
	flows, err := fetchFlows(daemon.ControlSocket(instance), instance)
	if err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd conns: %v\n", err)
		return 1
	}
	if asJSON {
		if err := writeFlowsJSON(e.stdout, flows); err != nil {
			fmt.Fprintf(e.stderr, "ebpfwd conns: %v\n", err)
			return 1
		}
		return 0
	}
	printFlows(e, flows, time.Now())
	return 0
}

// fetchFlows asks the instance behind the control socket sock for its flows.
func fetchFlows(sock, instance string) ([]datapath.Flow, error) {
	resp, err := controlRequestAt(sock, instance, http.MethodGet, daemon.FlowsPath, 5*time.Second)
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

// writeFlowsJSON writes flows as datapath.Flow's JSON, sorted as the table
// is; the field names are a documented interface (docs/DATAPATHS.md).
func writeFlowsJSON(w io.Writer, flows []datapath.Flow) error {
	if flows == nil {
		flows = []datapath.Flow{} // [] rather than null: nothing is open
	}
	sortFlows(flows)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(flows); err != nil {
		return fmt.Errorf("write flows: %w", err)
	}
	return nil
}

func sortFlows(flows []datapath.Flow) {
	sort.SliceStable(flows, func(i, j int) bool {
		if flows[i].Service != flows[j].Service {
			return flows[i].Service < flows[j].Service
		}
		return flows[i].Started.Before(flows[j].Started)
	})
}

func printFlows(e env, flows []datapath.Flow, now time.Time) {
	sortFlows(flows)
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
	// A flow listed the instant it began may read a hair in the future:
	// the daemon and this command read the clock apart.
	return max(now.Sub(started), 0).Round(time.Second).String()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
