package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "gost.yaml")
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const direct = `services:
- name: svc
  addr: 127.0.0.1:18000
  handler: {type: tcp}
  listener: {type: tcp}
  forwarder:
    nodes:
    - {name: target-0, addr: "127.0.0.1:19000"}
`

func TestDispatch(t *testing.T) {
	good := writeConfig(t, direct)
	bad := writeConfig(t, strings.Replace(direct, "127.0.0.1:19000", "127.0.0.1", 1))
	socks := writeConfig(t, strings.Replace(direct, "type: tcp}\n  listener", "type: socks5}\n  listener", 1))
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string // regexp
		wantStderr string // regexp
	}{
		{name: "no command", args: nil, wantCode: 2, wantStderr: `usage: ebpfwd`},
		{name: "unknown command", args: []string{"frobnicate"}, wantCode: 2, wantStderr: `unknown command "frobnicate"`},
		{name: "version", args: []string{"version"}, wantCode: 0, wantStdout: `^ebpfwd \S+\n$`},
		{name: "check good", args: []string{"check", good}, wantCode: 0, wantStdout: `gost.yaml: ok \(1 services, 0 chains\)`},
		{name: "check bad addr", args: []string{"check", bad}, wantCode: 1,
			wantStderr: `gost.yaml:8:30: services\[0\]\.forwarder\.nodes\[0\]\.addr: .*missing port`},
		{name: "check unsupported handler", args: []string{"check", socks}, wantCode: 1,
			wantStderr: `handler\.type: "socks5" is not supported by ebpfwd \(supported: tcp, udp, http\)`},
		{name: "check missing file", args: []string{"check", "/nonexistent/gost.yaml"}, wantCode: 1, wantStderr: `/nonexistent/gost.yaml`},
		{name: "check needs one file", args: []string{"check"}, wantCode: 2, wantStderr: `exactly one CONFIG`},
		{name: "plan", args: []string{"plan", good}, wantCode: 0, wantStdout: "svc\tuserspace\t"},
		{name: "run bad flag", args: []string{"run", "--drain-timeout", "soon", good}, wantCode: 2, wantStderr: `invalid value "soon"`},
		{name: "run bad config", args: []string{"run", bad}, wantCode: 1, wantStderr: `missing port`},
		{name: "run splice pool not a prefix", args: []string{"run", "--splice-pool4", "10.0.0.1", good}, wantCode: 2,
			wantStderr: `invalid value "10.0.0.1" for flag -splice-pool4`},
		{name: "run splice pool too small", args: []string{"run", "--splice-pool4", "169.254.9.0/31", good}, wantCode: 2,
			wantStderr: `--splice-pool4/--splice-pool6: splice pool 169.254.9.0/31: want an IPv4 prefix of /30 or larger`},
		{name: "run splice pool of the wrong family", args: []string{"run", "--splice-pool6", "10.9.0.0/16", good}, wantCode: 2,
			wantStderr: `want an IPv6 prefix`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := dispatch(env{stdout: &stdout, stderr: &stderr}, tt.args)
			if code != tt.wantCode {
				t.Errorf("exit code %d, want %d\nstdout: %s\nstderr: %s", code, tt.wantCode, &stdout, &stderr)
			}
			if tt.wantStdout != "" && !regexp.MustCompile(tt.wantStdout).MatchString(stdout.String()) {
				t.Errorf("stdout %q does not match %q", &stdout, tt.wantStdout)
			}
			if tt.wantStderr != "" && !regexp.MustCompile(tt.wantStderr).MatchString(stderr.String()) {
				t.Errorf("stderr %q does not match %q", &stderr, tt.wantStderr)
			}
		})
	}
}

// TestValidConfigGatesRestart: SIGUSR2 restarts only into a configuration
// that loads.
func TestValidConfigGatesRestart(t *testing.T) {
	tests := []struct {
		name    string
		path    string
		wantErr string // regexp; "" means valid
	}{
		{"valid", writeConfig(t, direct), ""},
		{"bad node address", writeConfig(t, strings.Replace(direct, "127.0.0.1:19000", "127.0.0.1", 1)), `missing port`},
		{"missing file", "/nonexistent/gost.yaml", `/nonexistent/gost.yaml`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := validConfig(tt.path)
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("validConfig: %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !regexp.MustCompile(tt.wantErr).MatchString(err.Error())):
				t.Errorf("validConfig: %v, want an error matching %q", err, tt.wantErr)
			}
		})
	}
}
