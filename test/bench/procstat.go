package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of /proc/stat and /proc/PID/stat CPU
// times. Linux fixes it at 100 for user space on every architecture,
// whatever CONFIG_HZ the kernel runs at.
const clockTicks = 100

// machineBusySeconds returns the CPU time all CPUs have spent busy since
// boot, from the aggregate "cpu" line of /proc/stat. Busy is everything but
// idle and iowait, so softirq (where veth and the forwarding path run) and
// kernel threads such as kworkers are counted: the point is to see what a
// byte costs the whole machine, not just one process.
func machineBusySeconds() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, fmt.Errorf("read /proc/stat: %w", err)
	}
	return parseMachineBusy(b)
}

// parseMachineBusy parses the aggregate "cpu" line: user nice system idle
// iowait irq softirq steal guest guest_nice. guest time is already part of
// user, so it is not added again.
func parseMachineBusy(stat []byte) (float64, error) {
	line, _, _ := bytes.Cut(stat, []byte("\n"))
	fields := strings.Fields(string(line))
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, fmt.Errorf("parse /proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	for i, f := range fields[1:9] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/stat field %d %q: %w", i+1, f, err)
		}
		const idle, iowait = 3, 4 // 0-based among the fields after "cpu"
		if i != idle && i != iowait {
			busy += v
		}
	}
	return float64(busy) / clockTicks, nil
}

// processCPUSeconds returns utime+stime of one process (all its threads).
func processCPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("read CPU time of pid %d: %w", pid, err)
	}
	return parseProcessCPU(b)
}

// parseProcessCPU reads fields 14 (utime) and 15 (stime) of
// /proc/PID/stat. The command name (field 2) is in parentheses and may
// contain spaces and parentheses itself, so counting starts after the last
// ')'.
func parseProcessCPU(stat []byte) (float64, error) {
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 {
		return 0, fmt.Errorf("parse /proc/PID/stat: no command name in %q", stat)
	}
	fields := strings.Fields(string(stat[end+1:]))
	// fields[0] is field 3 (state), so field N is fields[N-3].
	const utime, stime = 14 - 3, 15 - 3
	if len(fields) <= stime {
		return 0, fmt.Errorf("parse /proc/PID/stat: only %d fields after the command name", len(fields))
	}
	var total uint64
	for _, i := range []int{utime, stime} {
		v, err := strconv.ParseUint(fields[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse /proc/PID/stat field %d %q: %w", i+3, fields[i], err)
		}
		total += v
	}
	return float64(total) / clockTicks, nil
}

// residentBytes returns VmRSS of a process.
func residentBytes(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("read RSS of pid %d: %w", pid, err)
	}
	defer f.Close()
	return parseStatusKiB(f, "VmRSS")
}

// parseStatusKiB finds "KEY:   N kB" in a /proc/PID/status stream and
// returns N in bytes.
func parseStatusKiB(f io.Reader, key string) (int64, error) {
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != key {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, fmt.Errorf("parse %s: unexpected value %q", key, rest)
		}
		kib, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s: %w", key, err)
		}
		return kib << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("scan for %s: %w", key, err)
	}
	return 0, fmt.Errorf("%s not found", key)
}

// openFDs counts the file descriptors a process holds.
func openFDs(pid int) (int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, fmt.Errorf("count open files of pid %d: %w", pid, err)
	}
	return len(entries), nil
}

// openFileLimit returns the soft RLIMIT_NOFILE of a process, read from
// /proc/PID/limits so that it is what the process really got.
func openFileLimit(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return 0, fmt.Errorf("read limits of pid %d: %w", pid, err)
	}
	return parseOpenFileLimit(b)
}

// parseOpenFileLimit reads the soft limit from the "Max open files" line
// of /proc/PID/limits.
func parseOpenFileLimit(limits []byte) (int64, error) {
	for _, line := range strings.Split(string(limits), "\n") {
		rest, ok := strings.CutPrefix(line, "Max open files")
		if !ok {
			continue
		}
		fields := strings.Fields(rest)
		if len(fields) < 1 {
			break
		}
		if fields[0] == "unlimited" {
			return -1, nil
		}
		v, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse max open files %q: %w", fields[0], err)
		}
		return v, nil
	}
	return 0, fmt.Errorf("no \"Max open files\" line in limits")
}

// listening reports whether every port has a TCP socket in LISTEN state in
// the network namespace of pid. Servers announce readiness differently
// (iperf3 only prints to a buffered pipe), but the kernel's socket table is
// the same for all.
func listening(pid int, ports []int) bool {
	var table []byte
	for _, f := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, f))
		if err == nil {
			table = append(table, b...)
		}
	}
	listen := listeningPorts(table)
	for _, p := range ports {
		if !listen[p] {
			return false
		}
	}
	return true
}

// listeningPorts parses /proc/net/tcp{,6} lines ("sl local_address
// rem_address st ...", addresses as HEXIP:HEXPORT, state 0A = LISTEN).
func listeningPorts(table []byte) map[int]bool {
	const stateListen = "0A"
	out := map[int]bool{}
	for _, line := range strings.Split(string(table), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || f[3] != stateListen {
			continue
		}
		_, hexPort, ok := strings.Cut(f[1], ":")
		if !ok {
			continue
		}
		port, err := strconv.ParseUint(hexPort, 16, 16)
		if err != nil {
			continue
		}
		out[int(port)] = true
	}
	return out
}
