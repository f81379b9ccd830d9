package peer

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"net"
	"os"
	"sync"
	"time"
)

// maxDatagram is the largest UDP payload the echo server and client handle.
const maxDatagram = 65535

// UDP retry policy: veth and loopback do not lose datagrams under test
// load, but a forwarder creating its first flow may, so each datagram gets
// a short timeout and a few resends before the exchange fails.
const (
	udpAttemptTimeout = 500 * time.Millisecond
	udpAttempts       = 4
)

// ServeUDPEcho sends every datagram received on pc back to its sender,
// unchanged, until pc is closed. The returned stop closes pc and waits for
// the server loop to end.
func ServeUDPEcho(pc net.PacketConn) (stop func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, maxDatagram)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				if !errors.Is(err, net.ErrClosed) {
					slog.Debug("udp echo stopped", "addr", pc.LocalAddr(), "err", err)
				}
				return
			}
			if _, err := pc.WriteTo(buf[:n], from); err != nil {
				slog.Debug("udp echo reply failed", "to", from, "err", err)
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			pc.Close()
			<-done
		})
	}
}

// UDPExchange sends count datagrams on the connected socket c, one at a
// time, and checks that each reply is byte-for-byte the datagram sent.
// Sizes cycle through 1..size, the first datagram exactly size bytes, so
// that both tiny datagrams and the largest asked for cross the forwarder
// (a path that drops datagrams too big for it fails at once). Each datagram's content is derived from a per-exchange
// random salt and its sequence number, so replies meant for another client
// or a stale reply to an earlier datagram are recognised. A datagram that
// gets no reply is resent a few times before the exchange fails. Bounded by
// ctx; closes c.
func UDPExchange(ctx context.Context, c net.Conn, count, size int) error {
	defer c.Close()
	if count < 0 || size < 1 || size > maxDatagram {
		return fmt.Errorf("udp exchange: invalid count %d or size %d (want count >= 0, 1 <= size <= %d)", count, size, maxDatagram)
	}
	stopAfter := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Now()) })
	defer stopAfter()

	var salt [32]byte
	if _, err := rand.Read(salt[:]); err != nil {
		return fmt.Errorf("udp exchange: salt: %w", err)
	}
	reply := make([]byte, maxDatagram+1)
	for seq := range uint32(count) {
		want := datagram(salt, seq, size)
		if err := udpRoundTrip(ctx, c, salt, seq, size, want, reply); err != nil {
			return fmt.Errorf("udp exchange with %s: datagram %d/%d (%d bytes): %w", c.RemoteAddr(), seq+1, count, len(want), err)
		}
	}
	return nil
}

func udpRoundTrip(ctx context.Context, c net.Conn, salt [32]byte, seq uint32, size int, want, reply []byte) error {
	var stale int
	for attempt := 1; attempt <= udpAttempts; attempt++ {
		if _, err := c.Write(want); err != nil {
			return fmt.Errorf("send (attempt %d): %w", attempt, err)
		}
		deadline := time.Now().Add(udpAttemptTimeout)
		if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
			deadline = dl
		}
		if err := c.SetReadDeadline(deadline); err != nil {
			return fmt.Errorf("set read deadline: %w", err)
		}
		for {
			n, err := c.Read(reply)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if err := contextDone(ctx); err != nil {
					return fmt.Errorf("no reply after %d attempts: %w", attempt, err)
				}
				break // resend
			}
			if err != nil {
				return fmt.Errorf("receive (attempt %d): %w", attempt, err)
			}
			got := reply[:n]
			if string(got) == string(want) {
				return nil
			}
			// A reply to an earlier datagram that was resent arrives late;
			// it is not corruption. Anything else is.
			if isEarlierDatagram(got, salt, seq, size) {
				stale++
				continue
			}
			return fmt.Errorf("reply of %d bytes does not match (first difference at offset %d, %d stale replies skipped)",
				n, firstDifference(got, want), stale)
		}
	}
	return fmt.Errorf("no reply after %d attempts of %v each", udpAttempts, udpAttemptTimeout)
}

// datagram returns the payload for seq: size - seq*7919 mod size bytes
// (7919 is prime, so lengths spread over the whole range, and seq 0 is the
// full size), starting with the
// sequence number when there is room, followed by ChaCha8 output keyed by
// the salt and the sequence number.
func datagram(salt [32]byte, seq uint32, size int) []byte {
	b := make([]byte, DatagramSize(seq, size))
	n := len(b)
	key := salt
	binary.BigEndian.PutUint32(key[:4], binary.BigEndian.Uint32(key[:4])^seq)
	_, _ = mrand.NewChaCha8(key).Read(b)
	if n >= 4 {
		binary.BigEndian.PutUint32(b, seq)
	}
	return b
}

// DatagramSize is the length of UDPExchange's datagram seq when it sends
// datagrams of at most size bytes, for tests that count bytes.
func DatagramSize(seq uint32, size int) int {
	return size - int(uint64(seq)*7919%uint64(size))
}

// lookBack bounds how far back a late reply is searched for.
const lookBack = 8

func isEarlierDatagram(got []byte, salt [32]byte, seq uint32, size int) bool {
	for back := uint32(1); back <= lookBack && back <= seq; back++ {
		if string(datagram(salt, seq-back, size)) == string(got) {
			return true
		}
	}
	return false
}

// firstDifference returns the first offset at which a and b differ,
// including the point where the shorter one ends.
func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
