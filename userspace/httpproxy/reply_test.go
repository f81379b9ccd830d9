package httpproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/syncbuf"
)

// blockingDial gives up only when its context does, as a dial to a target
// that drops SYNs does.
func blockingDial(ctx context.Context, _, addr string) (net.Conn, error) {
	<-ctx.Done()
	return nil, fmt.Errorf("dial %s: %w", addr, ctx.Err())
}

// TestDialTimeoutIsAnswered: a dial that runs out its timeout is answered
// with a complete 504, also when the dial timeout is as long as the
// handshake deadline (which has then passed by the time the dial gives
// up: the reply has a deadline of its own).
func TestDialTimeoutIsAnswered(t *testing.T) {
	const target = "192.0.2.1:80" // never dialed: blockingDial only waits
	tests := []struct {
		name               string
		request            string
		handshake, dialFor time.Duration
	}{
		{
			name:      "CONNECT, dial timeout equal to the handshake deadline",
			request:   "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n",
			handshake: 200 * time.Millisecond, dialFor: 200 * time.Millisecond,
		},
		{
			name:      "absolute-URI GET, dial timeout equal to the handshake deadline",
			request:   "GET http://" + target + "/x HTTP/1.1\r\nHost: " + target + "\r\n\r\n",
			handshake: 200 * time.Millisecond, dialFor: 200 * time.Millisecond,
		},
		{
			name:      "CONNECT, dial timeout below the handshake deadline",
			request:   "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n\r\n",
			handshake: time.Second, dialFor: 100 * time.Millisecond,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			proxy, results := startProxy(t, &Server{Dial: blockingDial, HandshakeTimeout: tt.handshake, DialTimeout: tt.dialFor})
			resp, br, _ := rawExchange(t, proxy, tt.request)
			if resp.Proto != "HTTP/1.1" || resp.StatusCode != http.StatusGatewayTimeout {
				t.Fatalf("reply %s %s, want HTTP/1.1 504", resp.Proto, resp.Status)
			}
			// Complete: the bodiless reply, then the proxy's close.
			if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
				t.Fatalf("after the 504 header: %q, %v; want nothing, then EOF", rest, err)
			}
			r := nextResult(t, results)
			if r.Status != http.StatusGatewayTimeout || !r.Sent || r.ReplyErr != nil || !errors.Is(r.Err, context.DeadlineExceeded) {
				t.Fatalf("result = %+v, want a sent 504 for a dial timeout", r)
			}
		})
	}
}

// TestDefaultDialTimeoutLeavesRoom: by default a dial gives up well before
// the handshake deadline, so a client on the same budget still hears 504.
func TestDefaultDialTimeoutLeavesRoom(t *testing.T) {
	if DefaultDialTimeout >= DefaultHandshakeTimeout {
		t.Fatalf("DefaultDialTimeout %v is not below DefaultHandshakeTimeout %v", DefaultDialTimeout, DefaultHandshakeTimeout)
	}
}

// TestUnsentReplyIsReported: a reply the client never gets is reported and
// logged as not sent, and does not hold the connection past the reply
// timeout.
func TestUnsentReplyIsReported(t *testing.T) {
	const (
		request      = "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n"
		replyTimeout = 50 * time.Millisecond
	)
	refused := func(_ context.Context, _, addr string) (net.Conn, error) {
		return nil, fmt.Errorf("dial %s: %w", addr, syscall.ECONNREFUSED)
	}
	tests := []struct {
		name string
		// after runs on the client's end once the request is written.
		after     func(client net.Conn)
		wantReply error
	}{
		{name: "client does not read", after: func(net.Conn) {}, wantReply: os.ErrDeadlineExceeded},
		{name: "client gone", after: func(c net.Conn) { c.Close() }, wantReply: io.ErrClosedPipe},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A pipe has no buffer: a reply nobody reads cannot be written.
			client, server := net.Pipe()
			defer client.Close()
			var logs syncbuf.Buffer
			results := make(chan Result, 1)
			srv := &Server{
				Dial:         refused,
				ReplyTimeout: replyTimeout,
				Logger:       slog.New(slog.NewTextHandler(&logs, nil)),
				OnResult:     func(r Result) { results <- r },
			}
			go srv.ServeConn(t.Context(), server)
			if err := client.SetDeadline(time.Now().Add(testTimeout)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(client, request); err != nil {
				t.Fatalf("write request: %v", err)
			}
			tt.after(client)

			r := nextResult(t, results)
			if r.Status != http.StatusBadGateway || r.Sent || !errors.Is(r.ReplyErr, tt.wantReply) || !errors.Is(r.Err, syscall.ECONNREFUSED) {
				t.Fatalf("result = %+v, want a 502 not sent because of %v", r, tt.wantReply)
			}
			if line := logs.String(); !strings.Contains(line, "status=502") || !strings.Contains(line, "status_sent=false") {
				t.Fatalf("log %q does not say the 502 was not sent", line)
			}
		})
	}
}
