package main

import (
	"errors"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/config"
)

func TestMissingPrivilegesOf(t *testing.T) {
	const (
		inNS = `services:
- name: relay
  addr: ":8000"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.0.0.2:80"}]}
  metadata: {netns: blue, datapath: userspace}
`
		tc = `services:
- name: fast
  addr: ":8000"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.0.0.2:80"}]}
  metadata: {netns: blue, datapath: tc}
`
		auto = `services:
- name: maybe
  addr: ":8000"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.0.0.2:80"}]}
  metadata: {netns: blue}
`
		lowOwn = `services:
- name: web
  addr: ":80"
  handler: {type: tcp}
  forwarder: {nodes: [{addr: "10.0.0.2:80"}]}
`
	)
	bit := func(caps ...uint) uint64 {
		var set uint64
		for _, c := range caps {
			set |= 1 << c
		}
		return set
	}
	tests := []struct {
		name    string
		yaml    string
		caps    uint64
		missing []string // substrings of the error; none: no error
	}{
		{"userspace in a namespace", inNS, bit(capSysAdmin), nil},
		{"userspace in a namespace, no CAP_SYS_ADMIN", inNS, bit(capNetAdmin, capBPF), []string{"CAP_SYS_ADMIN"}},
		{"tc with CAP_SYS_ADMIN and CAP_NET_ADMIN (CAP_SYS_ADMIN covers CAP_BPF)", tc, bit(capSysAdmin, capNetAdmin), nil},
		{"tc without CAP_NET_ADMIN", tc, bit(capSysAdmin, capBPF), []string{"CAP_NET_ADMIN (for the tc datapath of service fast"}},
		{"tc without CAP_SYS_ADMIN", tc, bit(capNetAdmin, capBPF), []string{"CAP_SYS_ADMIN"}},
		{"tc with only CAP_NET_ADMIN", tc, bit(capNetAdmin), []string{"CAP_SYS_ADMIN", "CAP_BPF (to load"}},
		{"auto needs no tc capability (it falls back)", auto, bit(capSysAdmin), nil},
		{"a low port", lowOwn, 0, []string{"CAP_NET_BIND_SERVICE (to listen on :80)"}},
		{"a low port, granted", lowOwn, bit(capNetBindService), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := config.Parse("t.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			err = missingPrivilegesOf(cfg, tt.caps)
			if len(tt.missing) == 0 {
				if err != nil {
					t.Fatalf("missingPrivilegesOf: %v, want nil", err)
				}
				return
			}
			if !errors.Is(err, errNoPrivileges) {
				t.Fatalf("missingPrivilegesOf: %v, want errNoPrivileges", err)
			}
			for _, m := range tt.missing {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not say %q", err, m)
				}
			}
		})
	}
}
