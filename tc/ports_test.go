package tc

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/ebpfwd/ebpfwd/netns"
)

func TestPortList(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		size     int
	}{
		{"", "", 0},
		{"40000", "40000", 1},
		{"1024-32767", "1024-32767", 31744},
		{"1024-32767,40000", "1024-32767,40000", 31745},
		{"5,3-4,1", "1,3-5", 4},
		{"1024-2000,1500-3000", "1024-3000", 1977},
		{"0-65535", "0-65535", 65536},
	} {
		set, err := parsePortList(tc.in)
		if err != nil {
			t.Fatalf("parsePortList(%q): %v", tc.in, err)
		}
		if got := set.String(); got != tc.want || set.len() != tc.size {
			t.Errorf("parsePortList(%q) = %q (%d ports), want %q (%d)", tc.in, got, set.len(), tc.want, tc.size)
		}
	}
	for _, bad := range []string{"x", "1-", "70000", "10-5", "1,,2"} {
		if _, err := parsePortList(bad); err == nil {
			t.Errorf("parsePortList(%q) succeeded, want an error", bad)
		}
	}
}

// fakeSysctls is one namespace's sysctls in memory; readOnly makes writes
// fail as a container's read-only /proc/sys does.
type fakeSysctls struct {
	values   map[string]string
	readOnly bool
}

func (f *fakeSysctls) read(_ netns.NS, path string) (string, error) {
	v, ok := f.values[path]
	if !ok {
		return "", os.ErrNotExist
	}
	return v, nil
}

func (f *fakeSysctls) write(_ netns.NS, path, value string) error {
	if f.readOnly {
		return &os.PathError{Op: "open", Path: path, Err: syscall.EROFS}
	}
	// The kernel normalises the list it is given.
	set, err := parsePortList(value)
	if err != nil {
		return err
	}
	f.values[path] = set.String()
	return nil
}

// testID is a namespace identity no real namespace has, so that state
// files of these tests never meet a real run's.
func testID(t *testing.T) netns.ID {
	id := netns.ID{Dev: 0xebf, Ino: uint64(os.Getpid())<<16 | uint64(len(t.Name()))}
	t.Cleanup(func() {
		files, _ := os.ReadDir(portStateDir)
		for _, f := range files {
			if strings.HasSuffix(f.Name(), fmt.Sprintf(".tc-reserved-ports-%d-%d", id.Dev, id.Ino)) {
				os.Remove(portStateDir + "/" + f.Name())
			}
		}
	})
	return id
}

// TestPortReservation: reserving merges the SNAT range with what the
// namespace reserved; undoing takes out only what ebpfwd added, keeping
// what the operator reserved before and meanwhile, and what another
// instance serving the namespace still holds; a crashed run's state file
// makes the next run undo the crashed run's reservation, not keep it.
func TestPortReservation(t *testing.T) {
	for _, tc := range []struct {
		name       string
		before     string
		during     func(sys *fakeSysctls) // the operator, while ebpfwd runs
		crash      bool                   // the first run dies; a second one starts, then stops
		other      bool                   // a second instance serves the namespace too and stays
		otherStops bool                   // the second instance stops before the first
		want       string                 // while serving
		wantLeft   string                 // once stopped
	}{
		{name: "nothing reserved", before: "", want: "1024-32767", wantLeft: ""},
		{name: "the operator's port", before: "40000", want: "1024-32767,40000", wantLeft: "40000"},
		{name: "the operator's ports inside the range", before: "2000-2100", want: "1024-32767", wantLeft: "2000-2100"},
		{name: "already all reserved", before: "1024-32767", want: "1024-32767", wantLeft: "1024-32767"},
		{name: "the operator reserves while ebpfwd runs", before: "40000",
			during: func(sys *fakeSysctls) {
				_ = sys.write(netns.NS{}, reservedPortsSysctl, sys.values[reservedPortsSysctl]+",50000")
			},
			want: "1024-32767,40000", wantLeft: "40000,50000"},
		{name: "after a crash", before: "40000", crash: true, want: "1024-32767,40000", wantLeft: "40000"},
		{name: "another instance stays", before: "", other: true, want: "1024-32767", wantLeft: "1024-32767"},
		{name: "another instance stops first", before: "40000", other: true, otherStops: true, want: "1024-32767,40000", wantLeft: "40000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sys := &fakeSysctls{values: map[string]string{reservedPortsSysctl: tc.before}}
			id := testID(t)
			instance := fmt.Sprintf("test-ports-%d", os.Getpid())
			res, err := reservePorts(sys, instance, netns.NS{}, id, defaultSNATRange)
			if err != nil {
				t.Fatal(err)
			}
			var other *portReservation
			if tc.other {
				if other, err = reservePorts(sys, instance+"-other", netns.NS{}, id, defaultSNATRange); err != nil {
					t.Fatal(err)
				}
			}
			if got := sys.values[reservedPortsSysctl]; got != tc.want {
				t.Fatalf("while serving: %q, want %q", got, tc.want)
			}
			if tc.otherStops {
				if err := other.restore(); err != nil {
					t.Fatal(err)
				}
				if got := sys.values[reservedPortsSysctl]; got != tc.want {
					t.Fatalf("after the other instance stopped: %q, want %q (still held)", got, tc.want)
				}
			}
			if tc.during != nil {
				tc.during(sys)
			}
			if tc.crash {
				// The run dies without restoring; the next one finds its
				// state file and the reservation still in place.
				if res, err = reservePorts(sys, instance, netns.NS{}, id, defaultSNATRange); err != nil {
					t.Fatal(err)
				}
				if got := sys.values[reservedPortsSysctl]; got != tc.want {
					t.Fatalf("after the restart: %q, want %q", got, tc.want)
				}
			}
			if err := res.restore(); err != nil {
				t.Fatal(err)
			}
			if got := sys.values[reservedPortsSysctl]; got != tc.wantLeft {
				t.Fatalf("once stopped: %q, want %q", got, tc.wantLeft)
			}
			if _, err := os.Stat(portStateFile(instance, id)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("state file left after restoring: %v", err)
			}
		})
	}
}

// TestRestoreLeftPortsFirstFormat: a state file of the first form (the
// namespace's value before the reservation) is still undone right.
func TestRestoreLeftPortsFirstFormat(t *testing.T) {
	id := testID(t)
	instance := fmt.Sprintf("test-ports-old-%d", os.Getpid())
	if err := os.MkdirAll(portStateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(portStateFile(instance, id), []byte("40000"), 0o600); err != nil {
		t.Fatal(err)
	}
	sys := &fakeSysctls{values: map[string]string{reservedPortsSysctl: "1024-32767,40000"}}
	res := &portReservation{sys: sys, stateFile: portStateFile(instance, id)}
	st, err := readPortState(res.stateFile)
	if err != nil {
		t.Fatal(err)
	}
	res.added = st.added
	if err := res.restore(); err != nil {
		t.Fatal(err)
	}
	if got := sys.values[reservedPortsSysctl]; got != "40000" {
		t.Fatalf("restored to %q, want 40000", got)
	}
}

// TestSNATPortsReadOnly: where the reservation cannot be written (a
// read-only /proc/sys), the SNAT range stays clear of the namespace's
// ephemeral ports: the default when they do not overlap, else the larger
// free side, else an error naming what to change. A reservation the
// operator made already needs no write.
func TestSNATPortsReadOnly(t *testing.T) {
	for _, tc := range []struct {
		name, local, reserved string
		want                  portRange
		reserves              bool
		wantErr               string
	}{
		{name: "kernel default range", local: "32768 60999", want: defaultSNATRange},
		{name: "operator reserved the range", local: "1024 65000", reserved: "1024-32767", want: defaultSNATRange, reserves: true},
		{name: "room above", local: "1024 60999", want: portRange{61000, 65535}},
		{name: "room below", local: "20000 50000", want: portRange{1024, 19999}},
		{name: "no room", local: "1024 65000", wantErr: "leaves fewer than 1024 ports outside it"},
		{name: "whole range", local: "1024 65535", wantErr: "leaves fewer than 1024 ports outside it"},
		{name: "unreadable range", local: "", wantErr: "nor read its ip_local_port_range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sys := &fakeSysctls{readOnly: true, values: map[string]string{reservedPortsSysctl: tc.reserved}}
			if tc.local != "" {
				sys.values[localPortRangeSysctl] = tc.local
			}
			d := &Datapath{Instance: fmt.Sprintf("test-ro-%d", os.Getpid()), sysctls: sys,
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
			got, res, err := d.snatPorts(netns.NS{}, testID(t))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("snatPorts = %v, %v; want an error with %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want || (res != nil) != tc.reserves {
				t.Fatalf("snatPorts = %v (reservation %v), want %v (reservation %v)", got, res != nil, tc.want, tc.reserves)
			}
			if res != nil {
				if err := res.restore(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
