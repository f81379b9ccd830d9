package limiter

import (
	"net/netip"
	"testing"
	"time"
)

var (
	clientA = netip.MustParseAddr("192.168.1.1")
	clientB = netip.MustParseAddr("192.168.1.2")
	clientC = netip.MustParseAddr("10.0.0.3")
	clientD = netip.MustParseAddr("10.0.0.4")
)

func prefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// step is one admission: a client opens (or, with close, ends the i-th
// connection admitted so far), and want is the refusal ("" admitted).
type step struct {
	client netip.Addr
	close  int // >0: release the close-th admitted connection (1-based)
	want   Refusal
	after  time.Duration // advance the clock first
}

func TestAdmission(t *testing.T) {
	tests := []struct {
		name         string
		conns, rates []Rule
		steps        []step
	}{
		{
			name:  "service and per-client counts",
			conns: []Rule{{Scope: Service, N: 3}, {Scope: Each, N: 2}},
			steps: []step{
				{client: clientA}, {client: clientA}, {client: clientA, want: ConnLimit},
				{client: clientB}, {client: clientC, want: ConnLimit},
				{close: 1}, {client: clientC}, {client: clientB, want: ConnLimit},
			},
		},
		{
			// A prefix rule replaces $$ for its clients: the longest wins.
			name: "prefix rules, longest first",
			conns: []Rule{
				{Scope: Each, N: 1},
				{Scope: Prefix, Prefix: prefix("192.168.0.0/16"), N: 2},
				{Scope: Prefix, Prefix: prefix("192.168.1.1/32"), N: 3},
			},
			steps: []step{
				{client: clientA}, {client: clientA}, {client: clientA}, {client: clientA, want: ConnLimit},
				{client: clientB}, {client: clientB}, {client: clientB, want: ConnLimit},
				{client: clientC}, {client: clientC, want: ConnLimit},
				{client: clientD},
			},
		},
		{
			name:  "service rate, refilled by time",
			rates: []Rule{{Scope: Service, N: 2}},
			steps: []step{
				{client: clientA}, {client: clientB}, {client: clientC, want: RateLimit},
				{client: clientC, after: 500 * time.Millisecond}, {client: clientC, want: RateLimit},
			},
		},
		{
			// A client the per-client rate refuses spends no token of the
			// service's, and one the count refuses spends none at all.
			name:  "rates together, counts first",
			conns: []Rule{{Scope: Prefix, Prefix: prefix("10.0.0.4/32"), N: 0.5}},
			rates: []Rule{{Scope: Service, N: 3}, {Scope: Each, N: 1}},
			steps: []step{
				{client: clientA}, {client: clientA, want: RateLimit}, {client: clientA, want: RateLimit},
				{client: clientD, want: ConnLimit}, {client: clientD, want: ConnLimit},
				{client: clientB}, {client: clientC}, {client: netip.MustParseAddr("10.9.9.9"), want: RateLimit},
			},
		},
		{
			name:  "IPv4-mapped clients are their IPv4 address",
			conns: []Rule{{Scope: Prefix, Prefix: prefix("192.168.1.1/32"), N: 1}},
			steps: []step{
				{client: clientA}, {client: netip.MustParseAddr("::ffff:192.168.1.1"), want: ConnLimit},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := NewAdmission(tt.conns, tt.rates)
			now := time.Unix(1_000_000, 0)
			a.now = func() time.Time { return now }
			var releases []func()
			for i, s := range tt.steps {
				now = now.Add(s.after)
				if s.close > 0 {
					releases[s.close-1]()
					releases[s.close-1]() // twice: counted once
					continue
				}
				release, refused := a.Admit(s.client)
				if refused != s.want {
					t.Fatalf("step %d (%v): refused %q, want %q", i, s.client, refused, s.want)
				}
				if refused == "" {
					releases = append(releases, release)
				}
			}
			for _, r := range releases {
				r()
			}
			if a.Held() != 0 || len(a.heldBy) != 0 {
				t.Errorf("after every release: held %d, %d clients tracked", a.Held(), len(a.heldBy))
			}
		})
	}
}

func TestNoLimits(t *testing.T) {
	if NewAdmission(nil, nil) != nil || NewTraffic(nil) != nil {
		t.Fatal("no rules must make no limiter")
	}
	var a *Admission
	if release, refused := a.Admit(clientA); refused != "" || release == nil {
		t.Fatal("a nil Admission must admit")
	}
	var tr *Traffic
	if up, down, release := tr.Stream(clientA); up != nil || down != nil || release == nil {
		t.Fatal("a nil Traffic must not limit")
	}
}

func TestTrafficBuckets(t *testing.T) {
	tr := NewTraffic([]Rule{
		{Scope: Service, In: 100 << 20, Out: 100 << 20},
		{Scope: Each, In: 10 << 20},
		{Scope: Prefix, Prefix: prefix("192.168.0.0/16"), Out: 1 << 20},
	})
	up1, down1, rel1 := tr.Stream(clientA)
	up2, down2, rel2 := tr.Stream(clientA)
	up3, down3, rel3 := tr.Stream(clientC)
	// Service (both ways) + per connection (up) + the client's range (down).
	if len(up1) != 2 || len(down1) != 2 || len(up3) != 2 || len(down3) != 1 {
		t.Fatalf("buckets: a %d up %d down, c %d up %d down; want 2/2 and 2/1", len(up1), len(down1), len(up3), len(down3))
	}
	if up1[0] != up2[0] || up1[0] != up3[0] {
		t.Error("the service's bucket is not shared by its streams")
	}
	if up1[1] == up2[1] {
		t.Error("two streams share a per-connection bucket")
	}
	if down1[1] != down2[1] {
		t.Error("two streams of one client in a limited range do not share its bucket")
	}
	// A tenth of a second of the rate, never above a chunk's worth.
	if b := up1[1].Burst(); b != (10<<20)/defaultBurstPerSecond {
		t.Errorf("per-connection burst %d, want %d", b, (10<<20)/defaultBurstPerSecond)
	}
	if b := down1[1].Burst(); b != (1<<20)/defaultBurstPerSecond {
		t.Errorf("client burst %d, want %d", b, (1<<20)/defaultBurstPerSecond)
	}
	rel1()
	rel1()
	rel2()
	rel3()
	if len(tr.byAddr) != 0 {
		t.Errorf("%d clients still tracked after their streams ended", len(tr.byAddr))
	}
}
