package kubernetes

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
	"github.com/ebpfwd/ebpfwd/internal/testutil"
	"github.com/ebpfwd/ebpfwd/internal/topo"
)

func TestMain(m *testing.M) { os.Exit(e2e.Main(m)) }

// The namespaces of TestCapabilities: the node (where the daemon runs, as
// the pod does with hostNetwork), a client reaching the node's address,
// and the "backend" namespace the ConfigMap forwards into, whose address
// is on its loopback (the tc datapath's splice link reaches it).
const (
	clientAddr  = "10.100.0.2/24"
	nodeAddr    = "10.100.0.1" // HOST_IP
	backendAddr = "10.200.0.2" // the ConfigMap's default BACKEND_ADDR
)

// setprivArgs runs a command with exactly caps (as a container whose
// capabilities are drop ALL + caps): effective, permitted, inheritable,
// ambient and bounding sets all caps, uid 0.
func setprivArgs(caps []corev1.Capability) []string {
	set := "-all"
	for _, c := range caps {
		set += ",+" + strings.ToLower(string(c))
	}
	return []string{"setpriv", "--inh-caps=" + set, "--ambient-caps=" + set, "--bounding-set=" + set, "--reuid", "0", "--"}
}

// TestCapabilities runs the binary as the DaemonSet runs it: its
// capabilities exactly, its arguments, its environment (the Downward
// API's values played by the test's namespaces) and the ConfigMap's
// configuration; bytes cross the tc service and the userspace one. Then
// without each listed capability it must refuse to start and name it.
func TestCapabilities(t *testing.T) {
	testutil.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) is not installed")
	}
	_, c, cm := theDaemonSet(t)
	caps := c.SecurityContext.Capabilities.Add
	if len(caps) == 0 {
		t.Fatal("the DaemonSet adds no capability")
	}
	flags, order, cfgPath := runArgs(t, c)

	client := testutil.NewNS(t, "k8s-client")
	node := testutil.NewNS(t, "k8s-node")
	backend := testutil.NewNS(t, "k8s-backend")
	testutil.Veth(t, client, "veth0", clientAddr, node, "veth1", nodeAddr+"/24")
	if err := backend.AddAddr("lo", backendAddr+"/32"); err != nil {
		t.Fatal(err)
	}
	e2e.EchoIn(t, backend, backendAddr+":8443")
	e2e.EchoIn(t, backend, backendAddr+":8444")

	// The pod's environment, with the namespace names of this test.
	override := map[string]string{"HOST_IP": nodeAddr, "BACKEND_NETNS": backend.Name}
	env := podEnv(t, c, override)
	cfg := parseConfigMap(t, cm, c, override) // the same file, checked
	yaml := cm.Data[filepath.Base(cfgPath)]
	var envList []string
	for k, v := range env {
		envList = append(envList, k+"="+v)
	}
	// The manifest's flags but those e2e.Start sets itself (instance,
	// ready file: unique per test) and the config path (a temp file).
	var extra []string
	for _, name := range order {
		if name != "instance" && name != "ready-file" {
			extra = append(extra, "--"+name, flags[name])
		}
	}

	t.Run("with the manifest's capabilities", func(t *testing.T) {
		d := e2e.Start(t, "k8s", yaml, e2e.Options{In: node, Args: extra, Env: envList, Wrap: setprivArgs(caps)})
		for _, s := range cfg.Services {
			// The ConfigMap logs JSON.
			d.WaitLog(t, 10*time.Second, `"msg":"service started"`, `"service":"`+s.Name+`"`, `"datapath":"`+s.Datapath+`"`)
			t.Run(s.Name+" on "+s.Datapath, func(t *testing.T) {
				if err := e2e.Exchange(t, client, s.Addr, 1<<20, 30*time.Second); err != nil {
					t.Fatalf("1 MiB each way through %s: %v", s.Addr, err)
				}
				// Carried by the datapath itself: a tc service's listener
				// would relay what the program passed to the stack.
				series := fmt.Sprintf(`ebpfwd_connections_opened_total{datapath=%q,service=%q} `, s.Datapath, s.Name)
				body := scrape(t, node, "http://"+cfg.Metrics.Addr+cfg.Metrics.Path)
				if !hasPositive(body, series) {
					t.Fatalf("no %s>0 in the metrics:\n%s", series, body)
				}
			})
		}
	})

	// Each listed capability is needed: without it the daemon refuses to
	// start and says which. CAP_BPF in place of CAP_SYS_ADMIN does not
	// do either (entering namespaces needs CAP_SYS_ADMIN).
	for _, drop := range caps {
		without := slices.DeleteFunc(slices.Clone(caps), func(c corev1.Capability) bool { return c == drop })
		variants := [][]corev1.Capability{without}
		if drop == "SYS_ADMIN" {
			variants = append(variants, append(slices.Clone(without), "BPF"))
		}
		for _, set := range variants {
			t.Run(fmt.Sprintf("without %s (%v)", drop, set), func(t *testing.T) {
				out, err := runToExit(t, node, setprivArgs(set), extra, yaml, envList)
				var exit *exec.ExitError
				if !errors.As(err, &exit) || exit.ExitCode() != 1 {
					t.Fatalf("ebpfwd run without CAP_%s: %v, want exit status 1; output:\n%s", drop, err, out)
				}
				if !strings.Contains(out, "missing privileges: ") || !strings.Contains(out, "CAP_"+string(drop)+" (") {
					t.Fatalf("output does not name the missing CAP_%s:\n%s", drop, out)
				}
			})
		}
	}
}

// scrape GETs url from inside ns.
func scrape(t *testing.T, ns *topo.NS, url string) string {
	t.Helper()
	h := e2e.Handle(t, ns)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) { return h.Dial(ctx, network, addr) },
	}}
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %s, %v", url, resp.Status, err)
	}
	return string(body)
}

// hasPositive reports whether the exposition has series (name and labels
// and a space) with a value above 0.
func hasPositive(body, series string) bool {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series); ok {
			n, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return err == nil && n > 0
		}
	}
	return false
}

// runToExit runs `ebpfwd run` inside ns under wrap and waits (bounded)
// for it to exit, returning its output.
func runToExit(t *testing.T, ns *topo.NS, wrap, flags []string, yaml string, env []string) (string, error) {
	t.Helper()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args := append([]string{"--net=" + ns.Path()}, wrap...)
	args = append(args, e2e.Bin, "run", "--instance", testutil.UniqueName(t, "k8s-denied"), "--ready-file", filepath.Join(dir, "ready"))
	args = append(append(args, flags...), cfg)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if ctx.Err() != nil {
		return out.String(), fmt.Errorf("still running after 20s (killed): %w", err)
	}
	return out.String(), err
}
