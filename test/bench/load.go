package main

// The load programs: small workloads that iperf3 does not cover. The driver
// runs them by re-executing its own binary inside a namespace
// (`nsenter --net=NS bench load MODE ...`), so every socket they open lives
// in that namespace and the driver stays in the root namespace. Each prints
// one JSON result line on stdout.

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// msgSize is the request and response size of the connection-rate and
// latency workloads.
const msgSize = 64

// ioTimeout bounds every single read, write and dial of the load programs,
// so a stuck forwarder fails a run instead of hanging it.
const ioTimeout = 5 * time.Second

// Server ports in the server namespace. Forwarders expose the same ports on
// the gateway address.
const (
	portIperf = 5201
	portRR    = 7000 // one request, one response, server closes
	portEcho  = 7001 // echoes 64-byte messages for the latency and keep-alive workloads
	portHold  = 7002 // accepts and holds connections open until the client closes
)

var allPorts = []int{portIperf, portRR, portEcho, portHold}

// connRateResult is what `load connrate` prints.
type connRateResult struct {
	Conns      int64   `json:"conns"`
	Errors     int64   `json:"errors"`
	Seconds    float64 `json:"seconds"`
	FirstError string  `json:"first_error,omitempty"`
}

// latencyResult is what `load pingpong` prints.
type latencyResult struct {
	Samples int     `json:"samples"`
	P50us   float64 `json:"p50_us"`
	P99us   float64 `json:"p99_us"`
}

// keepAliveResult is what `load keepalive` prints.
type keepAliveResult struct {
	Requests int64   `json:"requests"`
	Seconds  float64 `json:"seconds"`
}

// holdResult is what `load hold` prints once all its connections are open.
type holdResult struct {
	Open int `json:"open"`
}

// runLoad dispatches `load MODE flags...`.
func runLoad(args []string) error {
	if len(args) == 0 {
		return errors.New("load: missing mode (serve, connrate, pingpong, keepalive, hold)")
	}
	mode, args := args[0], args[1:]
	fs := flag.NewFlagSet("load "+mode, flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	duration := fs.Duration("duration", 3*time.Second, "how long to run")
	workers := fs.Int("workers", 16, "concurrent connections (connrate, keepalive)")
	n := fs.Int("n", 10000, "connections to hold open (hold)")
	maxHold := fs.Duration("max-hold", 2*time.Minute, "hold: give up waiting for the driver after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var (
		res any
		err error
	)
	switch mode {
	case "serve":
		return serve()
	case "connrate":
		res, err = connRate(*addr, *duration, *workers)
	case "pingpong":
		res, err = pingPong(*addr, *duration)
	case "keepalive":
		res, err = keepAlive(*addr, *duration, *workers)
	case "hold":
		return hold(*addr, *n, *maxHold)
	default:
		return fmt.Errorf("load: unknown mode %q", mode)
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// serve runs the three servers on every address of its namespace and
// prints "ready" once all listen. It runs until killed.
func serve() error {
	handlers := map[int]func(net.Conn){portRR: serveRR, portEcho: serveEcho, portHold: serveHold}
	for port, h := range handlers {
		l, err := net.Listen("tcp", fmt.Sprintf(":%d", port))
		if err != nil {
			return fmt.Errorf("serve: listen on port %d: %w", port, err)
		}
		go acceptLoop(l, h)
	}
	fmt.Println("ready")
	select {}
}

func acceptLoop(l net.Listener, handle func(net.Conn)) {
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Transient errors (EMFILE) are retried after a pause so that a
			// burst does not kill the server.
			slog.Warn("accept", "addr", l.Addr(), "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handle(c)
	}
}

// serveRR reads one request and answers it, then closes first: the server
// takes the TIME_WAIT, as busy servers do, so the client's port range is
// not what limits the connection rate.
func serveRR(c net.Conn) {
	defer c.Close()
	buf := make([]byte, msgSize)
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := io.ReadFull(c, buf); err != nil {
		return
	}
	_, _ = c.Write(buf)
}

// serveEcho echoes until the client closes.
func serveEcho(c net.Conn) {
	defer c.Close()
	buf := make([]byte, msgSize)
	for {
		if _, err := io.ReadFull(c, buf); err != nil {
			return
		}
		if _, err := c.Write(buf); err != nil {
			return
		}
	}
}

// serveHold keeps the connection until the client closes it.
func serveHold(c net.Conn) {
	defer c.Close()
	_, _ = io.Copy(io.Discard, c)
}

// connRate opens connections from workers goroutines for d: each sends a
// request, reads the response and the server's close, and closes.
func connRate(addr string, d time.Duration, workers int) (connRateResult, error) {
	var (
		conns, errs atomic.Int64
		firstErr    atomic.Value
	)
	start := time.Now()
	deadline := start.Add(d)
	inParallel(workers, func() {
		req := make([]byte, msgSize)
		resp := make([]byte, msgSize+1)
		for time.Now().Before(deadline) {
			if err := oneRequest(addr, req, resp); err != nil {
				errs.Add(1)
				firstErr.CompareAndSwap(nil, err.Error())
				continue
			}
			conns.Add(1)
		}
	})
	res := connRateResult{Conns: conns.Load(), Errors: errs.Load(), Seconds: time.Since(start).Seconds()}
	if s, ok := firstErr.Load().(string); ok {
		res.FirstError = s
	}
	if res.Conns == 0 {
		return res, fmt.Errorf("connrate %s: no connection succeeded: %s", addr, res.FirstError)
	}
	return res, nil
}

// inParallel runs f in n goroutines at once and waits for all of them.
func inParallel(n int, f func()) {
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f()
		}()
	}
	wg.Wait()
}

func oneRequest(addr string, req, resp []byte) error {
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(ioTimeout))
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("write request to %s: %w", addr, err)
	}
	// Read the response and then EOF: the exchange counts only when the
	// server's close made it back through the forwarder.
	n, err := io.ReadFull(c, resp)
	if n != msgSize || !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("response from %s: got %d bytes then %v, want %d bytes then EOF", addr, n, err, msgSize)
	}
	return nil
}

// pingPong sends 64-byte messages one at a time over one connection for d
// and reports the round-trip percentiles.
func pingPong(addr string, d time.Duration) (latencyResult, error) {
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return latencyResult{}, fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	buf := make([]byte, msgSize)
	var rtts []time.Duration
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		t0 := time.Now()
		if _, err := c.Write(buf); err != nil {
			return latencyResult{}, fmt.Errorf("ping %s: %w", addr, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return latencyResult{}, fmt.Errorf("pong from %s: %w", addr, err)
		}
		rtts = append(rtts, time.Since(t0))
	}
	if len(rtts) == 0 {
		return latencyResult{}, fmt.Errorf("pingpong %s: no sample in %v", addr, d)
	}
	slices.Sort(rtts)
	us := func(q float64) float64 { return float64(percentile(rtts, q)) / float64(time.Microsecond) }
	return latencyResult{Samples: len(rtts), P50us: us(0.50), P99us: us(0.99)}, nil
}

// keepAlive runs workers connections for d, each sending a 64-byte
// request and reading its 64-byte answer, one at a time, over and over:
// the request rate of persistent connections, where the forwarder's cost
// per exchange shows without its cost per connection. Any failure fails
// the run: on open connections nothing should go wrong.
func keepAlive(addr string, d time.Duration, workers int) (keepAliveResult, error) {
	var (
		requests atomic.Int64
		errOnce  sync.Once
		firstErr error
	)
	start := time.Now()
	deadline := start.Add(d)
	inParallel(workers, func() {
		if err := exchangeUntil(addr, deadline, &requests); err != nil {
			errOnce.Do(func() { firstErr = err })
		}
	})
	res := keepAliveResult{Requests: requests.Load(), Seconds: time.Since(start).Seconds()}
	if firstErr != nil {
		return res, fmt.Errorf("keepalive %s: %w", addr, firstErr)
	}
	if res.Requests == 0 {
		return res, fmt.Errorf("keepalive %s: no exchange in %v", addr, d)
	}
	return res, nil
}

// exchangeUntil does request/response exchanges on one connection until
// deadline, counting each in n.
func exchangeUntil(addr string, deadline time.Time, n *atomic.Int64) error {
	c, err := net.DialTimeout("tcp", addr, ioTimeout)
	if err != nil {
		return fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	buf := make([]byte, msgSize)
	for time.Now().Before(deadline) {
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := c.Write(buf); err != nil {
			return fmt.Errorf("request to %s: %w", addr, err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("response from %s: %w", addr, err)
		}
		n.Add(1)
	}
	return nil
}

// percentile returns the q-quantile (0 < q <= 1) of sorted samples by the
// nearest-rank method.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	rank := int(q*float64(len(sorted))+0.999999999) - 1
	return sorted[max(0, min(rank, len(sorted)-1))]
}

// hold opens n connections, prints how many are open, and keeps them until
// its standard input closes (the driver measures in between) or maxHold
// passes.
func hold(addr string, n int, maxHold time.Duration) error {
	const dialers = 64
	conns := make([]net.Conn, n)
	var (
		next     atomic.Int64
		firstErr error
		errOnce  sync.Once
		wg       sync.WaitGroup
	)
	for range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				c, err := net.DialTimeout("tcp", addr, ioTimeout)
				if err != nil {
					errOnce.Do(func() { firstErr = fmt.Errorf("hold: dial %s (connection %d of %d): %w", addr, i+1, n, err) })
					return
				}
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	if firstErr != nil {
		return firstErr
	}
	if err := json.NewEncoder(os.Stdout).Encode(holdResult{Open: n}); err != nil {
		return err
	}
	released := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, bufio.NewReader(os.Stdin))
		close(released)
	}()
	select {
	case <-released:
		return nil
	case <-time.After(maxHold):
		return fmt.Errorf("hold: the driver did not release the connections within %v", maxHold)
	}
}
