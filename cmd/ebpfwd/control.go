package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"

	"github.com/ebpfwd/ebpfwd/daemon"
)

// instanceArg reads the instance a control command talks to: --instance
// NAME, or the CONFIG the instance runs (named after it). more adds the
// command's own flags (nil: none).
func instanceArg(e env, cmd string, args []string, more func(*flag.FlagSet)) (string, bool) {
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	instance := fs.String("instance", "", "the instance to ask (default: the CONFIG file's name without extension)")
	if more != nil {
		more(fs)
	}
	if fs.Parse(args) != nil {
		return "", false
	}
	switch {
	case *instance == "" && fs.NArg() == 1:
		*instance = instanceOf(fs.Arg(0))
	case *instance == "" || fs.NArg() > 0:
		fmt.Fprintf(e.stderr, "ebpfwd %s: give either --instance NAME or the CONFIG the instance runs\n", cmd)
		return "", false
	}
	if err := daemon.ValidateInstance(*instance); err != nil {
		fmt.Fprintf(e.stderr, "ebpfwd %s: %v\n", cmd, err)
		return "", false
	}
	return *instance, true
}

// controlRequest asks a running instance over its control socket. An
// instance that does not run is said so, not as a socket error.
func controlRequest(instance, method, path string, timeout time.Duration) (*http.Response, error) {
	return controlRequestAt(daemon.ControlSocket(instance), instance, method, path, timeout)
}

// controlRequestAt is controlRequest to the control socket at sock.
func controlRequestAt(sock, instance, method, path string, timeout time.Duration) (*http.Response, error) {
	client := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		}},
	}
	req, err := http.NewRequest(method, "http://ebpfwd"+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return nil, fmt.Errorf("instance %s is not running (no daemon answers on %s)", instance, sock)
	}
	if err != nil {
		return nil, fmt.Errorf("instance %s (control socket %s): %w", instance, sock, err)
	}
	return resp, nil
}
