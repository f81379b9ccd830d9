package config

import (
	"net/netip"
	"reflect"
	"testing"
)

func TestLimiters(t *testing.T) {
	mb := int64(1 << 20)
	tests := []struct {
		name string
		yaml string
		want Limits // Pos fields are not compared
	}{
		{
			name: "GOST's documented example",
			yaml: base + `  limiter: limiter-0
  climiter: climiter-0
  rlimiter: rlimiter-0
limiters:
- name: limiter-0
  limits:
  - '$ 100MB 100MB'
  - '$$ 10MB'
  - '192.168.1.1  512KB 1MB'
  - '192.168.0.0/16  1MB  5MB'
climiters:
- name: climiter-0
  limits: ['$ 1000', '$$ 100', '192.168.1.1  10']
rlimiters:
- name: rlimiter-0
  limits: ['$ 100', '$$ 10', '192.168.0.0/16  5', '10.0.0.1 0.5']
`,
			want: Limits{
				Traffic: &Limiter{Name: "limiter-0", Kind: TrafficLimiter, Rules: []LimitRule{
					{Scope: ScopeService, In: 100 * mb, Out: 100 * mb},
					{Scope: ScopeEach, In: 10 * mb},
					{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("192.168.1.1/32"), In: 512 << 10, Out: mb},
					{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("192.168.0.0/16"), In: mb, Out: 5 * mb},
				}},
				Conns: &Limiter{Name: "climiter-0", Kind: ConnLimiter, Rules: []LimitRule{
					{Scope: ScopeService, N: 1000}, {Scope: ScopeEach, N: 100},
					{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("192.168.1.1/32"), N: 10},
				}},
				Rate: &Limiter{Name: "rlimiter-0", Kind: RateLimiter, Rules: []LimitRule{
					{Scope: ScopeService, N: 100}, {Scope: ScopeEach, N: 10},
					{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("192.168.0.0/16"), N: 5},
					{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("10.0.0.1/32"), N: 0.5},
				}},
			},
		},
		{
			// What GOST's command line makes of
			// "?limiter.in=1MB&limiter.conn.out=64KB&climiter=10&rlimiter=2.5".
			name: "command-line options in metadata",
			yaml: base + `  metadata:
    limiter.in: 1MB
    limiter.conn.out: 64KB
    climiter: 10
    rlimiter: 2.5
`,
			want: Limits{
				Traffic: &Limiter{Name: "a-limiter", Kind: TrafficLimiter, Rules: []LimitRule{
					{Scope: ScopeService, In: mb}, {Scope: ScopeEach, Out: 64 << 10},
				}},
				Conns: &Limiter{Name: "a-climiter", Kind: ConnLimiter, Rules: []LimitRule{{Scope: ScopeService, N: 10}}},
				Rate:  &Limiter{Name: "a-rlimiter", Kind: RateLimiter, Rules: []LimitRule{{Scope: ScopeService, N: 2.5}}},
			},
		},
		{
			name: "zero and negative rates are unlimited, as in GOST",
			yaml: base + `  climiter: c
climiters:
- name: c
  limits: ['$ 0', '$$ -1']
`,
			want: Limits{Conns: &Limiter{Name: "c", Kind: ConnLimiter}},
		},
		{
			name: "IPv6 scopes, mapped addresses unmapped",
			yaml: base + `  climiter: c
climiters:
- name: c
  limits: ['fd00::/64 3', '::ffff:10.0.0.1 4']
`,
			want: Limits{Conns: &Limiter{Name: "c", Kind: ConnLimiter, Rules: []LimitRule{
				{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("fd00::/64"), N: 3},
				{Scope: ScopePrefix, Prefix: netip.MustParsePrefix("10.0.0.1/32"), N: 4},
			}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg, _, err := Parse("gost.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			got := cfg.Services[0].Limits
			for _, l := range []*Limiter{got.Traffic, got.Conns, got.Rate} {
				if l != nil {
					l.Pos = Pos{}
					for i := range l.Rules {
						l.Rules[i].Pos = Pos{}
					}
				}
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("limits:\n got %+v\nwant %+v", describeLimits(got), describeLimits(tt.want))
			}
		})
	}
}

func describeLimits(l Limits) []any {
	var out []any
	for _, x := range []*Limiter{l.Traffic, l.Conns, l.Rate} {
		if x == nil {
			out = append(out, nil)
		} else {
			out = append(out, *x)
		}
	}
	return out
}

func TestLimiterErrors(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		errs  []want
		warns []want
	}{
		{
			name: "unknown limiter",
			yaml: base + "  climiter: nope\nclimiters:\n- name: c1\n  limits: ['$ 1']\n",
			errs: []want{{9, 13, "services[0].climiter", `no climiters entry named "nope"`}},
		},
		{
			name: "a limiter of the wrong section",
			yaml: base + "  limiter: c1\nclimiters:\n- name: c1\n  limits: ['$ 1']\n",
			errs: []want{{9, 12, "services[0].limiter", `no limiters entry named "c1"`}},
		},
		{
			name: "bad lines, each at its place",
			yaml: base + `  limiter: l
limiters:
- name: l
  limits:
  - '$ fast'
  - 'nowhere 1MB'
  - '$'
climiters:
- name: c
  limits: ['$ 1.5', '$ 1 2']
`,
			errs: []want{
				{13, 5, "limiters[0].limits[0]", `"fast" is not a byte rate`},
				{14, 5, "limiters[0].limits[1]", `scope "nowhere" is not $, $$`},
				{15, 5, "limiters[0].limits[2]", "must read SCOPE IN [OUT [BURST]]"},
				{18, 12, "climiters[0].limits[0]", "not a whole number of connections"},
				{18, 21, "climiters[0].limits[1]", "must read SCOPE N"},
			},
		},
		{
			name: "other data sources are refused",
			yaml: base + "  rlimiter: r\nrlimiters:\n- name: r\n  limits: ['$ 1']\n  redis: {addr: 127.0.0.1:6379}\n",
			errs: []want{{13, 3, "rlimiters[0].redis", "GOST feature ebpfwd does not support"}},
		},
		{
			name: "a limiter needs a name and limits",
			yaml: base + "climiters:\n- limits: ['$ 1']\n- name: c\n",
			errs: []want{
				{10, 3, "climiters[0].name", "is required"},
				{11, 3, "climiters[1].limits", "is required"},
			},
		},
		{
			name: "duplicate names",
			yaml: base + "climiters:\n- {name: c, limits: ['$ 1']}\n- {name: c, limits: ['$ 2']}\n",
			errs: []want{{11, 3, "climiters[1].name", `duplicate climiter name "c"`}},
		},
		{
			name: "named and metadata forms at once",
			yaml: base + "  climiter: c\n  metadata: {climiter: 5}\nclimiters:\n- {name: c, limits: ['$ 1']}\n",
			errs: []want{{10, 24, "services[0].metadata.climiter", `conflicts with the service's climiter "c"`}},
		},
		{
			name:  "plugin-only metadata warns",
			yaml:  base + "  metadata: {limiter.refreshInterval: 30s}\n",
			warns: []want{{9, 14, "services[0].metadata.limiter.refreshInterval", "has no effect"}},
		},
		{
			name: "bandwidth on a udp service",
			yaml: `services:
- name: u
  addr: ":53"
  handler: {type: udp}
  forwarder: {nodes: [{addr: "10.0.0.2:53"}]}
  metadata: {limiter.in: 1MB}
`,
			errs: []want{{6, 26, "services[0].metadata.limiter.in", "bandwidth limits apply to TCP services only"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) { checkParse(t, tt.yaml, tt.errs, tt.warns) })
	}
}
