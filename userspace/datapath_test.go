package userspace

import (
	"context"
	"log/slog"
	"net"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
)

// loopbackPair returns both ends of one loopback TCP connection.
func loopbackPair(t *testing.T) (dialed, accepted net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	dialed, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if accepted, err = l.Accept(); err != nil {
		t.Fatal(err)
	}
	return dialed, accepted
}

// TestSpliceCountsPerConnectionAndService pushes two streams through one
// attachment: the service counters add both up, and each stream's own
// byte counts are logged when it ends.
func TestSpliceCountsPerConnectionAndService(t *testing.T) {
	var logs syncbuf.Buffer
	dp := Datapath{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	att, err := dp.Setup(t.Context(), datapath.Service{Name: "svc", Network: "tcp"})
	if err != nil {
		t.Fatal(err)
	}
	defer att.Close()

	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(peer.ServeEcho(target))

	sizes := []int{100 << 10, 300 << 10}
	for _, size := range sizes {
		app, client := loopbackPair(t)
		upstream, err := net.Dial("tcp", target.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			done <- att.(datapath.Splicer).Splice(t.Context(), datapath.Stream{Client: client, Upstream: upstream, Node: "n"})
		}()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		if err := peer.Exchange(ctx, app, size); err != nil {
			t.Fatal(err)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatalf("splice: %v", err)
		}
	}

	c := att.Counters()
	// The echo returns every byte plus a 32-byte SHA-256 trailer.
	wantUp, wantDown := uint64(sizes[0]+sizes[1]), uint64(sizes[0]+sizes[1]+2*peer.TrailerSize)
	if c.Opened != 2 || c.Active != 0 || c.BytesUp != wantUp || c.BytesDown != wantDown || c.Errors != 0 {
		t.Fatalf("counters = %+v, want 2 opened, 0 active, %d up, %d down, no errors", c, wantUp, wantDown)
	}
	for _, size := range sizes {
		re := regexp.MustCompile(`msg="connection closed" .*up_bytes=` + strconv.Itoa(size) + ` down_bytes=` + strconv.Itoa(size+peer.TrailerSize))
		if !re.MatchString(logs.String()) {
			t.Errorf("no per-connection log line for %d bytes in:\n%s", size, logs.String())
		}
	}
}
