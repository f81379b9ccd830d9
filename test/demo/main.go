// Command demo runs GOST's network-namespace example (seed 000) end to end
// with ebpfwd: it builds the seed's topology, starts a target server, an
// ebpfwd HTTP proxy as the chain's hop and ebpfwd with the seed's YAML as
// written, sends data through from a client, verifies every byte, prints
// what it did and removes everything again. It needs root.
//
// The seed's "default namespace" is played by a namespace of its own, so
// nothing is added to the machine's root namespace.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ebpfwd/ebpfwd/internal/peer"
	"github.com/ebpfwd/ebpfwd/internal/topo"
	"github.com/ebpfwd/ebpfwd/netns"
)

// hostNS plays the seed's default namespace: the target at 10.0.1.11:8000
// lives there and ebpfwd runs the seed's YAML inside it.
const hostNS = "ebpfwd-demo-host"

// The seed's YAML names ns1 and ns2; the demo keeps those names so that
// the YAML runs exactly as written.
var names = []string{hostNS, "ns1", "ns2"}

// proxyConfig is the chain's hop (10.0.1.1:8080 in ns2): ebpfwd's own HTTP
// proxy service, run inside ns2.
const proxyConfig = `services:
- name: hop-proxy
  addr: "10.0.1.1:8080"
  handler:
    type: http
    # A hop inside ns2, reached only over veth3: no auth on purpose.
    metadata: {allowOpenProxy: true}
  listener:
    type: tcp
`

const (
	transferBytes = 4 << 20 // per direction, per connection
	connections   = 8
	startTimeout  = 10 * time.Second
	stopTimeout   = 15 * time.Second
)

func main() {
	bin := flag.String("ebpfwd", "bin/ebpfwd", "the ebpfwd binary to run")
	cfgPath := flag.String("config", "docs/examples/seed000.yaml", "the seed's YAML")
	flag.Parse()
	if err := run(*bin, *cfgPath); err != nil {
		fmt.Fprintf(os.Stderr, "demo failed: %v\n", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run(bin, cfgPath string) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo creates network namespaces: run it as root")
	}
	for _, n := range names {
		if topo.Exists(n) {
			return fmt.Errorf("network namespace %q already exists; the demo needs that name for the seed's topology and will not touch what is not its own (remove it with: ip netns del %s)", n, n)
		}
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return err
	}
	yaml, err := os.ReadFile(cfgPath)
	if err != nil {
		return fmt.Errorf("read the seed's YAML: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var cleanups []func()
	defer func() {
		step("removing everything the demo created")
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()

	step("creating the seed's topology: %s (plays the default namespace), ns1, ns2", hostNS)
	nss := map[string]*topo.NS{}
	for _, n := range names {
		ns, err := topo.Create(n)
		if err != nil {
			return err
		}
		nss[n] = ns
		cleanups = append(cleanups, func() {
			if err := ns.Delete(); err != nil {
				fmt.Fprintf(os.Stderr, "remove %s: %v\n", ns.Name, err)
			}
		})
	}
	if err := topo.Veth(nss[hostNS], "veth0", "10.0.0.11/24", nss["ns1"], "veth1", "10.0.0.1/24"); err != nil {
		return err
	}
	if err := topo.Veth(nss[hostNS], "veth2", "10.0.1.11/24", nss["ns2"], "veth3", "10.0.1.1/24"); err != nil {
		return err
	}
	fmt.Println("    veth0 10.0.0.11/24 (host) <-> veth1 10.0.0.1/24 (ns1)")
	fmt.Println("    veth2 10.0.1.11/24 (host) <-> veth3 10.0.1.1/24 (ns2)")

	host, err := netns.Parse(hostNS)
	if err != nil {
		return err
	}
	step("starting the target: an echo server at 10.0.1.11:8000 in %s", hostNS)
	l, err := host.Listen(ctx, "tcp", "10.0.1.11:8000")
	if err != nil {
		return fmt.Errorf("target listen: %w", err)
	}
	stopEcho := peer.ServeEcho(l)
	cleanups = append(cleanups, stopEcho)

	dir, err := os.MkdirTemp("", "ebpfwd-demo-")
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() { os.RemoveAll(dir) })
	proxyPath := filepath.Join(dir, "hop-proxy.yaml")
	if err := os.WriteFile(proxyPath, []byte(proxyConfig), 0o644); err != nil {
		return err
	}

	step("starting ebpfwd as the chain's hop: HTTP proxy at 10.0.1.1:8080 in ns2")
	proxy, err := startDaemon(ctx, dir, "hop-proxy", "ns2", bin, proxyPath)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, proxy.stop)

	step("running the seed's YAML as written (%s) with ebpfwd inside %s:", cfgPath, hostNS)
	for _, line := range strings.Split(strings.TrimRight(string(yaml), "\n"), "\n") {
		fmt.Println("    | " + line)
	}
	seed, err := startDaemon(ctx, dir, "seed", hostNS, bin, cfgPath)
	if err != nil {
		return err
	}
	cleanups = append(cleanups, seed.stop)

	step("client in %s: %d connections to 10.0.0.1:8000 (service-0 in ns1), %d MiB each way, SHA-256 checked both ways",
		hostNS, connections, transferBytes>>20)
	start := time.Now()
	errs := make(chan error, connections)
	for i := 0; i < connections; i++ {
		go func() {
			cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			defer cancel()
			c, err := host.Dial(cctx, "tcp", "10.0.0.1:8000")
			if err != nil {
				errs <- err
				return
			}
			errs <- peer.Exchange(cctx, c, transferBytes)
		}()
	}
	var failed []error
	for i := 0; i < connections; i++ {
		if err := <-errs; err != nil {
			failed = append(failed, err)
		}
	}
	took := time.Since(start)
	if len(failed) > 0 {
		return fmt.Errorf("%d of %d connections failed: %w", len(failed), connections, errors.Join(failed...))
	}
	moved := float64(2*connections*transferBytes) / (1 << 20)
	fmt.Printf("    ok: %.0f MiB moved through client -> ns1:8000 -> hop 10.0.1.1:8080 (ns2) -> target 10.0.1.11:8000 in %v, every byte verified\n",
		moved, took.Round(time.Millisecond))

	step("stopping ebpfwd (SIGTERM: stop accepting, drain, exit 0)")
	if err := seed.stopErr(); err != nil {
		return err
	}
	if err := proxy.stopErr(); err != nil {
		return err
	}
	step("demo passed")
	return nil
}

// daemon is an ebpfwd process started by the demo.
type daemon struct {
	name   string
	cmd    *exec.Cmd
	log    *bytes.Buffer
	done   chan error
	exited bool
}

// startDaemon runs ebpfwd inside the namespace ns with nsenter, which
// (unlike `ip netns exec`) keeps the host's mounts, and waits for its
// ready file.
func startDaemon(ctx context.Context, dir, name, ns, bin, cfg string) (*daemon, error) {
	ready := filepath.Join(dir, name+".ready")
	cmd := exec.Command("nsenter", "--net=/var/run/netns/"+ns, bin, "run", "--ready-file", ready, cfg)
	var log bytes.Buffer
	cmd.Stdout = &log
	cmd.Stderr = io.MultiWriter(&log, prefixWriter{"    [" + name + "] "})
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start ebpfwd %s: %w", name, err)
	}
	d := &daemon{name: name, cmd: cmd, log: &log, done: make(chan error, 1)}
	go func() { d.done <- cmd.Wait() }()
	deadline := time.After(startTimeout)
	for {
		if _, err := os.Stat(ready); err == nil {
			return d, nil
		}
		select {
		case err := <-d.done:
			d.exited = true
			return nil, fmt.Errorf("ebpfwd %s exited before it was ready (%v)", name, err)
		case <-deadline:
			d.stop()
			return nil, fmt.Errorf("ebpfwd %s not ready after %v", name, startTimeout)
		case <-ctx.Done():
			d.stop()
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stopErr sends SIGTERM and expects a clean exit within stopTimeout.
func (d *daemon) stopErr() error {
	if d.exited {
		return nil
	}
	d.exited = true
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		if err != nil {
			return fmt.Errorf("ebpfwd %s did not exit cleanly: %w", d.name, err)
		}
		return nil
	case <-time.After(stopTimeout):
		d.cmd.Process.Kill()
		<-d.done
		return fmt.Errorf("ebpfwd %s did not stop within %v", d.name, stopTimeout)
	}
}

func (d *daemon) stop() {
	if err := d.stopErr(); err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
}

// prefixWriter indents a daemon's log lines under the demo's own output.
type prefixWriter struct{ prefix string }

func (p prefixWriter) Write(b []byte) (int, error) {
	for _, line := range strings.SplitAfter(string(b), "\n") {
		if line != "" {
			fmt.Fprint(os.Stdout, p.prefix+line)
		}
	}
	return len(b), nil
}
