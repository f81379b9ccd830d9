package config

import (
	"errors"
	"strings"
	"testing"
)

// envOf is an Env over a map.
func envOf(vars map[string]string) Env {
	return func(name string) (string, bool) {
		v, ok := vars[name]
		return v, ok
	}
}

func TestExpand(t *testing.T) {
	env := envOf(map[string]string{"NODE": "node-1", "EMPTY": "", "IP": "10.0.0.7", "DOLLAR": "$x"})
	tests := []struct {
		in, want string
		problem  string // substring of the one problem; "" for none
	}{
		{in: "no variables", want: "no variables"},
		{in: "${NODE}", want: "node-1"},
		{in: "svc-${NODE}-a", want: "svc-node-1-a"},
		{in: "${IP}:${NODE}", want: "10.0.0.7:node-1"},
		{in: "${EMPTY}", want: ""},
		{in: "${DOLLAR}", want: "$x"}, // a value is not expanded again
		{in: "${UNSET:-dflt}", want: "dflt"},
		{in: "${EMPTY:-dflt}", want: "dflt"},
		{in: "${NODE:-dflt}", want: "node-1"},
		{in: "${UNSET-dflt}", want: "dflt"},
		{in: "${EMPTY-dflt}", want: ""},
		{in: "${UNSET:-}", want: ""},
		{in: "${UNSET:-a:b-c}", want: "a:b-c"},
		{in: "${NODE:?must be set}", want: "node-1"},
		// GOST's own dollars are literal.
		{in: "$ 100MB 100MB", want: "$ 100MB 100MB"},
		{in: "$$ 10MB", want: "$$ 10MB"},
		{in: "$NODE", want: "$NODE"},
		{in: "cost: 5$", want: "cost: 5$"},
		{in: "$(NODE)", want: "$(NODE)"},
		// $${ is the escape.
		{in: "$${NODE}", want: "${NODE}"},
		{in: "$$${NODE}", want: "$${NODE}"},
		{in: "a$${b", want: "a${b"},
		// Problems.
		{in: "${UNSET}", problem: "${UNSET}: environment variable UNSET is not set"},
		{in: "x ${UNSET:?the node's name} y", problem: "environment variable UNSET is not set: the node's name"},
		{in: "${EMPTY:?}", problem: "environment variable EMPTY is empty"},
		{in: "${NODE", problem: `"${" without a closing "}"`},
		{in: "${}", problem: `"" is not a variable name`},
		{in: "${1X}", problem: `"1X" is not a variable name`},
		{in: "${A B}", problem: `"A B" is not a variable name`},
		{in: "${NODE:+x}", problem: "unknown form"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, problems := expand(tt.in, env)
			if tt.problem == "" {
				if len(problems) > 0 {
					t.Fatalf("expand(%q): problems %v", tt.in, problems)
				}
				if got != tt.want {
					t.Fatalf("expand(%q) = %q, want %q", tt.in, got, tt.want)
				}
				return
			}
			if len(problems) != 1 || !strings.Contains(problems[0].msg, tt.problem) {
				t.Fatalf("expand(%q): problems %v, want one saying %q", tt.in, problems, tt.problem)
			}
		})
	}
}

// envBase is a service whose values come from the environment (lines 1-10).
const envBase = `services:
- name: web-${NODE}
  addr: "${IP}:8000"
  handler:
    type: tcp
  forwarder:
    nodes:
    - addr: ${BACKEND:-10.0.0.2:80}
  metadata:
    netns.out: ${NS}
`

func TestParseEnv(t *testing.T) {
	vars := map[string]string{"NODE": "node-1", "IP": "10.0.0.7", "NS": "backend", "PORT": "9100", "TRUE": "true"}
	tests := []struct {
		name  string
		yaml  string
		unset []string // variables of vars left out
		check func(t *testing.T, cfg *Config)
		errs  []want
	}{
		{
			name: "values from the environment",
			yaml: envBase,
			check: func(t *testing.T, cfg *Config) {
				s := cfg.Services[0]
				if s.Name != "web-node-1" || s.Addr != "10.0.0.7:8000" || s.NetNSOut.Spec() != "backend" {
					t.Errorf("service %q at %q out %q, want web-node-1 at 10.0.0.7:8000 out backend", s.Name, s.Addr, s.NetNSOut.Spec())
				}
				if got := s.Forwarder.Nodes[0].Addr; got != "10.0.0.2:80" {
					t.Errorf("node addr %q, want the default 10.0.0.2:80", got)
				}
			},
		},
		{
			name: "an unquoted value is typed after expansion",
			yaml: strings.Replace(envBase, "type: tcp", "type: udp", 1) + "  listener:\n    type: udp\n    metadata:\n      keepAlive: ${TRUE}\n" +
				"metrics:\n  addr: \":${PORT}\"\n",
			check: func(t *testing.T, cfg *Config) {
				if !cfg.Services[0].Listener.KeepAlive {
					t.Errorf("keepAlive: ${TRUE} (true) did not decode as a boolean")
				}
				if cfg.Metrics.Addr != ":9100" {
					t.Errorf("metrics addr %q, want :9100", cfg.Metrics.Addr)
				}
			},
		},
		{
			name: "GOST limiter lines keep their dollars",
			yaml: strings.Replace(envBase, "  metadata:\n", "  limiter: lim\n  metadata:\n", 1) +
				"limiters:\n- name: lim\n  limits:\n  - '$ 100MB 100MB'\n  - '$$ 10MB'\n",
			check: func(t *testing.T, cfg *Config) {
				l := cfg.Services[0].Limits.Traffic
				if l == nil || len(l.Rules) != 2 || l.Rules[0].Scope != ScopeService || l.Rules[1].Scope != ScopeEach {
					t.Errorf("traffic limiter %+v, want a $ and a $$ rule", l)
				}
			},
		},
		{
			name: "an anchor is expanded once and its aliases share the value",
			yaml: strings.Replace(envBase, "netns.out: ${NS}", "netns.out: &ns ${NS}\n    netns: *ns", 1),
			check: func(t *testing.T, cfg *Config) {
				if s := cfg.Services[0]; s.NetNS.Spec() != "backend" || s.NetNSOut.Spec() != "backend" {
					t.Errorf("netns %q out %q, want backend twice", s.NetNS.Spec(), s.NetNSOut.Spec())
				}
			},
		},
		{
			name: "keys are not expanded",
			yaml: envBase + "  ${NODE}: x\n",
			errs: []want{{11, 3, "services[0].${NODE}", `unknown field "${NODE}"`}},
		},
		{
			name:  "an unset variable is reported where it is written",
			yaml:  envBase,
			unset: []string{"NS"},
			errs:  []want{{10, 16, "services[0].metadata.netns.out", "${NS}: environment variable NS is not set"}},
		},
		{
			name:  "in a quoted value, after the quote",
			yaml:  envBase,
			unset: []string{"IP"},
			// Only the variable: not also the address check of the
			// unexpanded text.
			errs: []want{{3, 10, "services[0].addr", "environment variable IP is not set"}},
		},
		{
			name:  "two in one value, each at its own column",
			yaml:  strings.Replace(envBase, "name: web-${NODE}", "name: ${NODE}-$${NODE}-${NODE}", 1),
			unset: []string{"NODE"},
			errs: []want{
				{2, 9, "services[0].name", "environment variable NODE is not set"},
				{2, 26, "services[0].name", "environment variable NODE is not set"},
			},
		},
		{
			name: "in a literal block",
			yaml: strings.Replace(envBase, "    netns.out: ${NS}\n", "    netns.out: |-\n      ${NS}${MISSING}\n", 1),
			errs: []want{{11, 12, "services[0].metadata.netns.out", "environment variable MISSING is not set"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range vars {
				env[k] = v
			}
			for _, k := range tt.unset {
				delete(env, k)
			}
			cfg, _, err := ParseEnv("env.yaml", []byte(tt.yaml), envOf(env))
			if tt.errs == nil {
				if err != nil {
					t.Fatalf("ParseEnv: %v", err)
				}
				tt.check(t, cfg)
				return
			}
			var list *Errors
			if !errors.As(err, &list) {
				t.Fatalf("ParseEnv: %v, want *Errors", err)
			}
			checkDiagnostics(t, "error", list.List, tt.errs)
		})
	}
}

// TestCommandLineDollarBraces: a ${ in a command-line URL is text; the
// YAML it becomes parses back to the same text.
func TestCommandLineDollarBraces(t *testing.T) {
	for _, tt := range []struct{ user, escaped string }{{"a${b", "a%24%7Bb"}, {"a$${b", "a%24%24%7Bb"}} {
		user := tt.user
		t.Run(user, func(t *testing.T) {
			cl := CommandLine{Services: []string{"tcp://" + tt.escaped + ":pw@:8000/10.0.0.2:80"}}
			data, err := cl.YAML()
			if err != nil {
				t.Fatal(err)
			}
			cfg, _, err := ParseEnv("cli", data, envOf(nil))
			if err != nil {
				t.Fatalf("ParseEnv of\n%s: %v", data, err)
			}
			if a := cfg.Services[0].Handler.Auth; a == nil || a.Username != user {
				t.Fatalf("auth %+v, want username %q; YAML:\n%s", a, user, data)
			}
		})
	}
}
