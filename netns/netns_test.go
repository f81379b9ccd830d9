package netns

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		spec              string
		wantErr           string // substring; "" for success
		wantString, wantP string
		wantOwn           bool
		wantName          string
	}{
		{spec: "", wantString: "(own)", wantP: "", wantOwn: true},
		{spec: "ns1", wantString: "ns1", wantP: "/var/run/netns/ns1", wantName: "ns1"},
		{spec: "/proc/1/ns/net", wantString: "/proc/1/ns/net", wantP: "/proc/1/ns/net"},
		{spec: "/var/run/docker/netns//abc/", wantString: "/var/run/docker/netns/abc", wantP: "/var/run/docker/netns/abc"},
		{spec: "a/b", wantErr: "relative path"},
		{spec: "./ns1", wantErr: "relative path"},
		{spec: ".", wantErr: "is not valid"},
		{spec: "..", wantErr: "is not valid"},
		{spec: "bad\x00name", wantErr: "NUL"},
		{spec: strings.Repeat("n", 256), wantErr: "longer than 255"},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			ns, err := Parse(tt.spec)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Parse(%q) error = %v, want it to contain %q", tt.spec, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.spec, err)
			}
			if got := ns.String(); got != tt.wantString {
				t.Errorf("String() = %q, want %q", got, tt.wantString)
			}
			if got := ns.Path(); got != tt.wantP {
				t.Errorf("Path() = %q, want %q", got, tt.wantP)
			}
			if got := ns.IsOwn(); got != tt.wantOwn {
				t.Errorf("IsOwn() = %v, want %v", got, tt.wantOwn)
			}
			if ns.name != tt.wantName {
				t.Errorf("name = %q, want %q", ns.name, tt.wantName)
			}
		})
	}
}

func TestParseHosts(t *testing.T) {
	data := []byte(`# leading comment
127.0.0.1   localhost  Local.Domain.   # trailing comment
::1         localhost ip6-localhost
10.0.0.1 web WEB2
10.0.0.2 web
not-an-ip  broken
fe80::1%eth0 linklocal
192.0.2.1
	# indented comment
10.0.0.3	tabbed	#web
`)
	tests := []struct {
		host string
		want []string
	}{
		{"localhost", []string{"127.0.0.1", "::1"}},
		{"LOCALHOST.", []string{"127.0.0.1", "::1"}},
		{"local.domain", []string{"127.0.0.1"}},
		{"ip6-localhost", []string{"::1"}},
		{"web", []string{"10.0.0.1", "10.0.0.2"}},
		{"web2", []string{"10.0.0.1"}},
		{"broken", nil},
		{"linklocal", []string{"fe80::1%eth0"}},
		{"tabbed", []string{"10.0.0.3"}},
		{"absent", nil},
	}
	table := parseHosts(data)
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			if got := addrStrings(table.lookup(tt.host)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("lookup(%q) = %v, want %v", tt.host, got, tt.want)
			}
		})
	}
}

func TestHostsLookupReturnsCopy(t *testing.T) {
	table := parseHosts([]byte("10.0.0.1 a\n10.0.0.2 a\n"))
	got := table.lookup("a")
	got[0] = netip.MustParseAddr("192.0.2.99")
	if again := addrStrings(table.lookup("a")); again[0] != "10.0.0.1" {
		t.Fatalf("modifying a lookup result changed the table: %v", again)
	}
}

func TestParseResolvConf(t *testing.T) {
	tests := []struct {
		name, data string
		want       []string
	}{
		{"empty", "", nil},
		{"two servers", "nameserver 10.0.0.53\nnameserver 2001:db8::53\n", []string{"10.0.0.53", "2001:db8::53"}},
		{"comments and options", "# c\n; c\nsearch example.com\noptions ndots:2\nnameserver 127.0.0.53 # local\n", []string{"127.0.0.53"}},
		{"commented out", "#nameserver 10.0.0.1\n;nameserver 10.0.0.2\n", nil},
		{"invalid skipped", "nameserver dns.example.com\nnameserver\nnameserver 10.0.0.9\n", []string{"10.0.0.9"}},
		{"zone", "nameserver fe80::1%eth0\n", []string{"fe80::1%eth0"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := addrStrings(parseResolvConf([]byte(tt.data)).nameservers); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("nameservers = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestFileCacheSeesChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "hosts")
	cache := newFileCache(parseHosts)
	steps := []struct {
		content string // "" removes the file
		want    []string
		exists  bool
	}{
		{content: "10.0.0.1 svc\n", want: []string{"10.0.0.1"}, exists: true},
		{content: "10.0.0.2 svc\n", want: []string{"10.0.0.2"}, exists: true}, // same size, same second
		{content: "10.0.0.2 svc\n10.0.0.3 svc\n", want: []string{"10.0.0.2", "10.0.0.3"}, exists: true},
		{content: "", want: nil, exists: false},
	}
	for i, step := range steps {
		if step.content == "" {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(path, []byte(step.content), 0o644); err != nil {
			t.Fatal(err)
		}
		table, exists, err := cache.get(path)
		if err != nil {
			t.Fatalf("step %d: get: %v", i, err)
		}
		if exists != step.exists {
			t.Fatalf("step %d: exists = %v, want %v", i, exists, step.exists)
		}
		if got := addrStrings(table.lookup("svc")); !reflect.DeepEqual(got, step.want) {
			t.Fatalf("step %d: lookup = %v, want %v", i, got, step.want)
		}
	}
}

func TestPartialDeadline(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name      string
		left      time.Duration
		remaining int
		want      time.Duration
	}{
		{"last address gets all", 10 * time.Second, 1, 10 * time.Second},
		{"even split", 10 * time.Second, 2, 5 * time.Second},
		{"three ways", 9 * time.Second, 3, 3 * time.Second},
		{"floor of two seconds", 3 * time.Second, 3, 2 * time.Second},
		{"less than floor left", time.Second, 4, time.Second},
		{"already passed", -time.Second, 2, -time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := partialDeadline(now, now.Add(tt.left), tt.remaining)
			if want := now.Add(tt.want); !got.Equal(want) {
				t.Errorf("partialDeadline = now+%v, want now+%v", got.Sub(now), tt.want)
			}
		})
	}
}

func TestFilterFamily(t *testing.T) {
	addrs := []netip.Addr{
		netip.MustParseAddr("::1"),
		netip.MustParseAddr("127.0.0.1"),
		netip.MustParseAddr("::ffff:10.0.0.1"),
		netip.MustParseAddr("2001:db8::1"),
	}
	tests := []struct {
		network string
		want    []string
	}{
		{"tcp", []string{"::1", "127.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"}},
		{"udp", []string{"::1", "127.0.0.1", "::ffff:10.0.0.1", "2001:db8::1"}},
		{"tcp4", []string{"127.0.0.1", "::ffff:10.0.0.1"}},
		{"udp6", []string{"::1", "2001:db8::1"}},
	}
	for _, tt := range tests {
		t.Run(tt.network, func(t *testing.T) {
			if got := addrStrings(filterFamily(tt.network, addrs)); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("filterFamily(%s) = %v, want %v", tt.network, got, tt.want)
			}
		})
	}
}

func TestErrorText(t *testing.T) {
	ns2, err := Parse("ns2")
	if err != nil {
		t.Fatal(err)
	}
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	gone := &nsError{ns: ns2, err: &os.PathError{Op: "open", Path: "/var/run/netns/ns2", Err: syscall.ENOENT}, gone: true}
	tests := []struct {
		name   string
		err    error
		want   string
		wantIs []error
	}{
		{
			name:   "refused",
			err:    &opError{op: "dial", network: "tcp", addr: "10.0.1.11:8000", ns: ns2, err: refused},
			want:   "dial tcp 10.0.1.11:8000 in netns ns2: connect: connection refused",
			wantIs: []error{syscall.ECONNREFUSED},
		},
		{
			name:   "namespace gone",
			err:    &opError{op: "dial", network: "tcp", addr: "10.0.1.11:8000", ns: ns2, err: gone},
			want:   "dial tcp 10.0.1.11:8000 in netns ns2: open /var/run/netns/ns2: no such file or directory",
			wantIs: []error{ErrGone, syscall.ENOENT},
		},
		{
			name:   "bare namespace error",
			err:    gone,
			want:   `netns "ns2": open /var/run/netns/ns2: no such file or directory`,
			wantIs: []error{ErrGone},
		},
		{
			name: "every address tried",
			err: &opError{op: "dial", network: "tcp", addr: "db:8000", ns: ns2, err: attemptsError{
				{addr: "[::1]:8000", err: refused},
				{addr: "127.0.0.1:8000", err: gone},
			}},
			want:   "dial tcp db:8000 in netns ns2: [::1]:8000: connect: connection refused; 127.0.0.1:8000: open /var/run/netns/ns2: no such file or directory",
			wantIs: []error{syscall.ECONNREFUSED, ErrGone},
		},
		{
			name: "lookup failure",
			err: &opError{op: "dial", network: "tcp", addr: "db:8000", ns: ns2,
				err: &opError{op: "lookup", addr: "db", ns: ns2, err: &net.DNSError{Err: "no such host", Name: "db", Server: "10.255.255.53:53", IsNotFound: true}}},
			want: "dial tcp db:8000 in netns ns2: lookup db: no such host",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() =\n  %s\nwant\n  %s", got, tt.want)
			}
			for _, target := range tt.wantIs {
				if !errors.Is(tt.err, target) {
					t.Errorf("errors.Is(err, %v) = false", target)
				}
			}
		})
	}
}

func addrStrings(addrs []netip.Addr) []string {
	if len(addrs) == 0 {
		return nil
	}
	out := make([]string, len(addrs))
	for i, a := range addrs {
		out[i] = a.String()
	}
	return out
}
