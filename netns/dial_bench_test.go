package netns

import (
	"context"
	"net"
	"testing"
)

// BenchmarkDial measures one TCP connection set up and torn down over
// loopback, dialed in the daemon's own namespace and in another one: the
// difference is what entering a namespace costs per new connection.
func BenchmarkDial(b *testing.B) {
	other := newTestNS(b)
	for _, bc := range []struct {
		name string
		ns   NS
	}{
		{"own", NS{}},
		{"other", other},
	} {
		b.Run(bc.name, func(b *testing.B) {
			addr := discardListener(b, bc.ns)
			b.ReportAllocs()
			for b.Loop() {
				dialAndAbort(b, bc.ns, addr)
			}
		})
		// Dials from several goroutines at once: how well the way into
		// a namespace serves concurrent callers.
		b.Run(bc.name+"-parallel", func(b *testing.B) {
			addr := discardListener(b, bc.ns)
			b.ReportAllocs()
			b.SetParallelism(4)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					dialAndAbort(b, bc.ns, addr)
				}
			})
		})
	}
}

func dialAndAbort(b *testing.B, ns NS, addr string) {
	conn, err := ns.Dial(context.Background(), "tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	// An abortive close leaves no TIME_WAIT entry, so a long run does not
	// exhaust loopback's ephemeral ports.
	conn.(*net.TCPConn).SetLinger(0)
	conn.Close()
}

// discardListener listens on 127.0.0.1:0 in ns and closes every connection
// it accepts, until the test or benchmark ends. It returns the address.
func discardListener(b testing.TB, ns NS) string {
	b.Helper()
	ln, err := ns.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatalf("listen in %s: %v", ns, err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return ln.Addr().String()
}
