package splice

import (
	"net/netip"
	"strings"
	"testing"
)

func TestPoolDefaultsAndValidation(t *testing.T) {
	tests := []struct {
		name      string
		pool      Pool
		wantErr   string
		wantSlots int
	}{
		{name: "defaults", pool: Pool{}, wantSlots: 64},
		{name: "smaller IPv4 pool bounds both", pool: Pool{V4: netip.MustParsePrefix("169.254.201.0/28")}, wantSlots: 4},
		{name: "smaller IPv6 pool bounds both", pool: Pool{V6: netip.MustParsePrefix("fd00:1::/125")}, wantSlots: 2},
		{name: "large pools are capped", pool: Pool{V4: netip.MustParsePrefix("10.0.0.0/8"), V6: netip.MustParsePrefix("fd00::/48")}, wantSlots: maxSlots},
		{name: "unmasked prefix is masked", pool: Pool{V4: netip.MustParsePrefix("169.254.200.77/24")}, wantSlots: 64},
		{name: "IPv4 pool too small", pool: Pool{V4: netip.MustParsePrefix("169.254.200.0/31")}, wantErr: "/30 or larger"},
		{name: "IPv6 prefix as IPv4 pool", pool: Pool{V4: netip.MustParsePrefix("fd00::/64")}, wantErr: "IPv4 prefix"},
		{name: "IPv4 prefix as IPv6 pool", pool: Pool{V6: netip.MustParsePrefix("10.0.0.0/8")}, wantErr: "IPv6 prefix"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := tt.pool.withDefaults()
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := p.slots(); got != tt.wantSlots {
				t.Errorf("slots = %d, want %d", got, tt.wantSlots)
			}
		})
	}
}

func TestPoolEnds(t *testing.T) {
	p, err := Pool{}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		slot                         int
		listen4, out4, listen6, out6 string
	}{
		{0, "169.254.200.1/30", "169.254.200.2/30", "fd65:6270:6677::1/126", "fd65:6270:6677::2/126"},
		{1, "169.254.200.5/30", "169.254.200.6/30", "fd65:6270:6677::5/126", "fd65:6270:6677::6/126"},
		{63, "169.254.200.253/30", "169.254.200.254/30", "fd65:6270:6677::fd/126", "fd65:6270:6677::fe/126"},
	}
	for _, tt := range tests {
		e := p.ends(tt.slot)
		got := []string{e.Listen4.String(), e.Out4.String(), e.Listen6.String(), e.Out6.String()}
		want := []string{tt.listen4, tt.out4, tt.listen6, tt.out6}
		for i := range got {
			if got[i] != want[i] {
				t.Errorf("slot %d: ends %v, want %v", tt.slot, got, want)
				break
			}
		}
	}
}

func TestPoolFreeSkipsOverlaps(t *testing.T) {
	p, err := Pool{V4: netip.MustParsePrefix("169.254.200.0/28")}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	pfx := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	tests := []struct {
		name     string
		inUse    []netip.Prefix
		wantSlot int
		wantErr  bool
	}{
		{name: "empty namespaces", wantSlot: 0},
		{name: "unrelated addresses", inUse: pfx("10.0.0.1/24", "fd00::1/64", "fe80::1/64"), wantSlot: 0},
		{name: "slot 0 taken by IPv4", inUse: pfx("169.254.200.2/30"), wantSlot: 1},
		{name: "slot 0 taken by IPv6 only", inUse: pfx("fd65:6270:6677::1/126"), wantSlot: 1},
		{name: "host route inside slot 1", inUse: pfx("169.254.200.1/30", "169.254.200.6/32"), wantSlot: 2},
		{name: "a covering prefix takes everything", inUse: pfx("169.254.0.1/16"), wantErr: true},
		{name: "all slots used", inUse: pfx("169.254.200.1/30", "169.254.200.5/30", "169.254.200.9/30", "169.254.200.13/30"), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var masked []netip.Prefix
			for _, u := range tt.inUse {
				masked = append(masked, u.Masked())
			}
			got, err := p.free(masked)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("free = slot %d, want an exhausted pool", got)
				}
				return
			}
			if err != nil || got != tt.wantSlot {
				t.Fatalf("free = %d, %v; want slot %d", got, err, tt.wantSlot)
			}
		})
	}
}
