package relay

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// lingerOf reads c's SO_LINGER.
func lingerOf(t *testing.T, c *net.TCPConn) unix.Linger {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var (
		l    *unix.Linger
		gerr error
	)
	if err := raw.Control(func(fd uintptr) { l, gerr = unix.GetsockoptLinger(int(fd), unix.SOL_SOCKET, unix.SO_LINGER) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt SO_LINGER: %v", gerr)
	}
	return *l
}

// TestTCPArmsResetOnDeath: while relaying, both sockets the relay holds
// carry SO_LINGER{on, 0}, so that the kernel resets both peers should the
// process die mid-stream; a tunnel's raw socket is the one that gets it.
func TestTCPArmsResetOnDeath(t *testing.T) {
	tests := []struct {
		name string
		wrap func(client, upstream net.Conn) (net.Conn, net.Conn)
	}{
		{name: "plain"},
		{name: "client tunnel", wrap: func(client, upstream net.Conn) (net.Conn, net.Conn) {
			return &tunnelConn{Conn: client}, upstream
		}},
		{name: "upstream tunnel", wrap: func(client, upstream net.Conn) (net.Conn, net.Conn) {
			return client, &tunnelConn{Conn: upstream}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rig := startRelay(t, t.Context(), 0, tt.wrap)
			// The option is set before either direction starts, so once a
			// byte has crossed, it is in place.
			if _, err := rig.app.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(rig.server, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			for name, c := range map[string]*net.TCPConn{"client": rig.relayClient, "upstream": rig.relayUpstream} {
				if l := lingerOf(t, c); l.Onoff != 1 || l.Linger != 0 {
					t.Errorf("relay's %s socket has SO_LINGER %+v while relaying, want {Onoff:1 Linger:0}", name, l)
				}
			}
			for _, c := range []*net.TCPConn{rig.app, rig.server} {
				if err := c.CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			if err := rig.wait(t); err != nil {
				t.Fatalf("relay: %v", err)
			}
		})
	}
}

// TestTCPCleanEndClosesGracefully: after an exchange that ends cleanly by
// half-closes, the relay's final close must not reset. The server answers
// and half-closes first, then reads the upload only after the relay has
// returned, so the upload's tail is still queued in the relay's upstream
// socket when that socket is closed: closed with linger{on, 0} it would be
// dropped and the server reset; closed gracefully it arrives, then EOF.
func TestTCPCleanEndClosesGracefully(t *testing.T) {
	const (
		uploadSize = 512 << 10
		// The server's small window keeps most of the upload in the relay's
		// send queue; the relay's large send buffer takes all of it, so the
		// relay can finish without the server reading.
		serverReadBuffer = 64 << 10
		relayWriteBuffer = 4 << 20
	)
	rig := startRelay(t, t.Context(), 0, nil)
	if err := rig.server.SetReadBuffer(serverReadBuffer); err != nil {
		t.Fatal(err)
	}
	if err := rig.relayUpstream.SetWriteBuffer(relayWriteBuffer); err != nil {
		t.Fatal(err)
	}
	upload, reply := randomBytes(t, uploadSize), []byte("reply")
	if _, err := rig.server.Write(reply); err != nil {
		t.Fatal(err)
	}
	if err := rig.server.CloseWrite(); err != nil {
		t.Fatal(err)
	}

	if _, err := rig.app.Write(upload); err != nil {
		t.Fatalf("client upload: %v", err)
	}
	if err := rig.app.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(rig.app)
	if err != nil {
		t.Fatalf("client read: %v (want the reply, then EOF)", err)
	}
	if !bytes.Equal(got, reply) {
		t.Fatalf("client got %q, want %q", got, reply)
	}
	if err := rig.wait(t); err != nil {
		t.Fatalf("relay: %v", err)
	}

	got, err = readAllWithin(rig.server, testDeadline)
	if err != nil {
		t.Fatalf("server read %d of %d bytes, then %v; want all of them, then EOF", len(got), len(upload), err)
	}
	if !bytes.Equal(got, upload) {
		t.Fatalf("server got %d bytes that differ from the %d-byte upload", len(got), len(upload))
	}
	// Nothing more: a reset arriving after the FIN would show here.
	if n, err := rig.app.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("client read after the end = %d, %v; want 0, EOF", n, err)
	}
}

// readAllWithin reads c to EOF under one deadline.
func readAllWithin(c *net.TCPConn, d time.Duration) ([]byte, error) {
	if err := c.SetReadDeadline(time.Now().Add(d)); err != nil {
		return nil, fmt.Errorf("arm read deadline: %w", err)
	}
	return io.ReadAll(c)
}
