// Command bench is `make bench`: a side-by-side benchmark of every ebpfwd
// datapath against the kernel's own paths (plain routing and iptables
// DNAT+SNAT) and, for the userspace relay, HAProxy, over throwaway network
// namespaces. Every run sets up all contenders and measures them
// interleaved, one workload step at a time (interleave.go), so that drift
// of the machine's speed hits them alike.
// It prints a Markdown table of medians with every figure's paired ratio
// to the direct path (the median of the per-run ratios), and with -write
// puts the same report into docs/BENCHMARKS.md. It never asserts timings.
//
// It needs root, iperf3, iptables, nsenter and ip; HAProxy's columns need
// haproxy and are left out, with a note, without it. The same binary also
// holds the small load programs (`bench load MODE`), which the driver runs
// inside the client and server namespaces.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// openFiles is the RLIMIT_NOFILE the benchmark gives itself and, through
// inheritance, every daemon and load program: 10k idle connections through
// a chain cost the hop 20k descriptors.
const openFiles = 1 << 18

func main() {
	if len(os.Args) > 1 && os.Args[1] == "load" {
		if err := runLoad(os.Args[2:]); err != nil {
			fmt.Fprintf(os.Stderr, "%v\n", err)
			os.Exit(1)
		}
		return
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	os.Exit(runDriver())
}

func runDriver() int {
	ebpfwdBin := flag.String("ebpfwd", "bin/ebpfwd", "the ebpfwd binary to benchmark")
	quick := flag.Bool("quick", os.Getenv("BENCH_QUICK") == "1", "one short run per contender (default from BENCH_QUICK=1)")
	runs := flag.Int("runs", 0, "runs; each measures every contender, interleaved step by step (default 3, quick 1)")
	write := flag.String("write", "", "also write the report to this file (e.g. docs/BENCHMARKS.md); full mode only")
	idle := flag.Int("idle-conns", 0, "idle connections for the memory figure (default 10000, fewer if the open-file limit is lower)")
	only := flag.String("only", "", "run only contenders whose name contains this (the direct path always runs, and so does a selected contender's HAProxy rival)")
	flag.Parse()

	set := settings{runs: 3, tputSeconds: 4, shortRun: 3 * time.Second, idleConns: 10000, connWorkers: 16}
	if *quick {
		set = settings{runs: 1, tputSeconds: 2, shortRun: 2 * time.Second, idleConns: 10000, connWorkers: 16}
	}
	if *runs > 0 {
		set.runs = *runs
	}
	if *write != "" && *quick {
		slog.Error("-write needs a full run: the documented table must be medians of several runs")
		return 2
	}
	if err := preflight(); err != nil {
		slog.Error("cannot benchmark", "err", err)
		return 2
	}
	limit, err := raiseOpenFiles()
	if err != nil {
		slog.Error("cannot benchmark", "err", err)
		return 2
	}
	set.fdLimit = limit
	set.idleConns = idleConnections(limit)
	if *idle > 0 {
		set.idleConns = min(*idle, set.idleConns)
	}
	bin, err := filepath.Abs(*ebpfwdBin)
	if err != nil {
		slog.Error("ebpfwd binary path", "err", err)
		return 2
	}
	self, err := os.Executable()
	if err != nil {
		slog.Error("cannot find my own binary for the load programs", "err", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	sweepStale()

	dir, err := os.MkdirTemp("", "ebpfwd-bench-")
	if err != nil {
		slog.Error("temp dir", "err", err)
		return 2
	}
	defer os.RemoveAll(dir)

	haproxyBin := findHAProxy()
	res := &results{
		contenders: selectContenders(*only, haproxyBin != ""),
		samples:    map[string][]sample{},
		set:        set,
		quick:      *quick,
		machine:    machineInfo(bin, haproxyBin),
		command:    "go run ./test/bench " + strings.Join(os.Args[1:], " "),
	}
	if set.idleConns < 10000 {
		res.notes = append(res.notes, fmt.Sprintf("%d idle connections instead of 10,000: the open-file limit here is %d and "+
			"cannot be raised (no CAP_SYS_RESOURCE), and the daemon's fd budget counts %d descriptors per stream.",
			set.idleConns, limit, budgetFDsPerStream))
	}
	if haproxyBin == "" {
		res.notes = append(res.notes, "HAProxy not found (`make bench` installs Debian's haproxy; apt-get install haproxy): "+
			"its columns, the comparison with it and its targets are left out of this run.")
	}
	start := time.Now()
	base := runEnv{self: self, ebpfwd: bin, haproxy: haproxyBin, dir: dir, set: set}
	steps := workloadSteps()
	for run := 0; run < set.runs && ctx.Err() == nil; run++ {
		slog.Info("run starts", "run", fmt.Sprintf("%d/%d", run+1, set.runs),
			"first", rotated(res.contenders, run)[0].name, "elapsed", time.Since(start).Round(time.Second))
		stages := benchRun(ctx, run, res.contenders, steps, func(ctx context.Context, st *stage) error {
			return st.setUp(ctx, base)
		})
		if ctx.Err() != nil {
			break
		}
		for _, st := range stages {
			if st.err != nil {
				res.failures = append(res.failures, fmt.Sprintf("run %d, %s: %v", run+1, st.c.name, st.err))
				continue
			}
			res.samples[st.c.name] = append(res.samples[st.c.name], st.sample)
		}
	}
	res.took = time.Since(start)
	if ctx.Err() != nil {
		slog.Warn("interrupted: everything the benchmark created has been removed")
		return 130
	}

	var out bytes.Buffer
	res.writeReport(&out)
	os.Stdout.Write(out.Bytes())
	if *write != "" {
		if err := os.WriteFile(*write, out.Bytes(), 0o644); err != nil {
			slog.Error("write report", "file", *write, "err", err)
			return 1
		}
		slog.Info("report written", "file", *write)
	}
	fmt.Fprintf(os.Stderr, "bench: total time %v (%s mode)\n", res.took.Round(time.Second), map[bool]string{true: "quick", false: "full"}[*quick])
	if len(res.failures) > 0 {
		return 1
	}
	return 0
}

// selectContenders applies -only; the direct path stays because every
// ratio is taken against it, and a selected contender keeps its HAProxy
// rival, which its figures are read beside. Without haproxy (haveHAProxy
// false) the HAProxy contenders are left out.
func selectContenders(only string, haveHAProxy bool) []contender {
	all := contenders()
	keep := map[string]bool{}
	for _, c := range all {
		if only == "" || c.name == directName || strings.Contains(c.name, only) {
			keep[c.name] = true
			if c.rival != "" {
				keep[c.rival] = true
			}
		}
	}
	var out []contender
	for _, c := range all {
		if keep[c.name] && (haveHAProxy || !c.needsHAProxy) {
			out = append(out, c)
		}
	}
	return out
}

// preflight checks that the benchmark can run: root and the tools.
func preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("the benchmark creates network namespaces: run it as root")
	}
	for _, tool := range []string{"ip", "nsenter", "sysctl", "iperf3", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found (Debian: apt-get install -y iperf3 iptables iproute2 util-linux procps): %w", tool, err)
		}
	}
	return nil
}

// raiseOpenFiles sets RLIMIT_NOFILE as high as the benchmark is allowed
// and returns the limit in force. Setting it explicitly (rather than
// relying on Go raising the soft limit at start-up) is what makes children
// inherit it: Go restores the original soft limit in children unless the
// program set its own. Raising the hard limit needs CAP_SYS_RESOURCE,
// which containers often drop; then the soft limit goes up to the hard one.
func raiseOpenFiles() (uint64, error) {
	var cur syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &cur); err != nil {
		return 0, fmt.Errorf("read RLIMIT_NOFILE: %w", err)
	}
	want := syscall.Rlimit{Cur: max(openFiles, cur.Max), Max: max(openFiles, cur.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err == nil {
		return want.Cur, nil
	}
	slog.Warn("cannot raise the hard open-file limit (no CAP_SYS_RESOURCE); using it as it is", "hard", cur.Max)
	want = syscall.Rlimit{Cur: cur.Max, Max: cur.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		return 0, fmt.Errorf("raise RLIMIT_NOFILE to %d: %w", cur.Max, err)
	}
	return cur.Max, nil
}

// budgetFDsPerStream is what the daemon's fd budget counts per relayed
// stream (daemon/budget.go): its two sockets; the splice pipes a stream
// borrows while bytes move come from an allowance set aside in the
// daemon's reserve. It sizes the idle-connection workload to what the
// open-file limit allows.
const budgetFDsPerStream = 2

// budgetReserve bounds what the daemon's fd budget keeps for itself: the
// descriptors open at start (a few dozen here), 64 of headroom and at most
// 512 splice pipes of two descriptors.
const budgetReserve = 2048

// idleConnections is how many idle connections the memory workload opens:
// 10,000, unless one service of a daemon cannot hold that many under the
// open-file limit (budgetFlows).
func idleConnections(limit uint64) int {
	const want = 10000
	return int(min(budgetFlows(int64(limit)), want))
}

// machineInfo describes what the figures were measured on.
func machineInfo(bin, haproxyBin string) []string {
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			return "unknown"
		}
		return strings.TrimSpace(string(b))
	}
	firstLine := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			return "unknown"
		}
		line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
		return line
	}
	field := func(text, key string) string {
		for _, line := range strings.Split(text, "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == key {
				return strings.TrimSpace(v)
			}
		}
		return "unknown"
	}
	osName := "unknown"
	for _, line := range strings.Split(read("/etc/os-release"), "\n") {
		if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
			osName = strings.Trim(v, `"`)
		}
	}
	haproxy := "HAProxy not installed"
	if haproxyBin != "" {
		haproxy = haproxyVersion(haproxyBin)
	}
	return []string{
		fmt.Sprintf("Machine: %s, %d CPUs, %s RAM", field(read("/proc/cpuinfo"), "model name"), runtime.NumCPU(), field(read("/proc/meminfo"), "MemTotal")),
		fmt.Sprintf("Kernel: Linux %s (%s)", read("/proc/sys/kernel/osrelease"), osName),
		fmt.Sprintf("Tools: %s; %s; %s; %s", firstLine("iperf3", "--version"), firstLine("iptables", "--version"), haproxy, runtime.Version()),
		fmt.Sprintf("ebpfwd: %s", firstLine(bin, "version")),
		fmt.Sprintf("Date: %s", time.Now().UTC().Format("2006-01-02 15:04 MST")),
	}
}
