package netns

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/testutil"
)

func TestResolveWithNamespaceResolvConf(t *testing.T) {
	ns := newTestNS(t)
	ctx := testContext(t)
	// The server exists only inside the namespace, on an address the
	// system resolv.conf does not name: answers can only come through the
	// namespace's resolv.conf, dialed from inside the namespace.
	pc, err := ns.ListenPacket(ctx, "udp", "127.0.0.53:53")
	if err != nil {
		t.Fatalf("listen dns: %v", err)
	}
	defer pc.Close()
	want := netip.MustParseAddr("198.51.100.7")
	answered := testutil.ServeDNS(pc, want)
	writeNSEtc(t, ns, "resolv.conf", "# test\nnameserver 127.0.0.53\n")

	addrs, err := ns.Resolve(ctx, "db.ebpfwd.test")
	if err != nil {
		t.Fatalf("Resolve through the namespace's nameserver: %v", err)
	}
	if got := addrStrings(addrs); len(got) != 1 || got[0] != want.String() {
		t.Fatalf("Resolve = %v, want [%s]", got, want)
	}
	if answered.Load() == 0 {
		t.Fatal("the namespace's nameserver answered no query")
	}

	// Dial uses the same resolution; nothing listens on 198.51.100.7 and
	// the namespace has no route there, so the error must name that address.
	_, err = ns.Dial(ctx, "tcp", "db.ebpfwd.test:80")
	if err == nil || !strings.Contains(err.Error(), "198.51.100.7:80: ") {
		t.Fatalf("Dial error = %v, want it to name 198.51.100.7:80", err)
	}
}
