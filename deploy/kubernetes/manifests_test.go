// Package kubernetes holds ebpfwd's Kubernetes manifests and their proof
// without a cluster: every manifest decodes strictly into the Kubernetes
// API types (a misspelt field fails), the ConfigMap's configuration
// parses, and the binary runs with exactly the DaemonSet's capabilities,
// arguments and environment (and fails, naming the capability, without
// any one of them).
package kubernetes

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/ebpfwd/ebpfwd/config"
	"github.com/ebpfwd/ebpfwd/daemon"
	"github.com/ebpfwd/ebpfwd/loader"
)

// serviceMonitor is the part of the Prometheus Operator's
// monitoring.coreos.com/v1 ServiceMonitor these manifests may use; k8s.io/api
// has no type for it. Strict decoding into it refuses any other field, so
// a field added to servicemonitor.yaml must be added here from the
// operator's API reference (prometheus-operator.dev, "API reference",
// ServiceMonitorSpec, Endpoint, RelabelConfig) with the same JSON name.
type serviceMonitor struct {
	metav1.TypeMeta `json:",inline"`
	Metadata        metav1.ObjectMeta `json:"metadata"`
	Spec            struct {
		Selector          metav1.LabelSelector `json:"selector"`
		NamespaceSelector struct {
			Any        bool     `json:"any,omitempty"`
			MatchNames []string `json:"matchNames,omitempty"`
		} `json:"namespaceSelector"`
		Endpoints []struct {
			Port        string `json:"port"`
			Path        string `json:"path,omitempty"`
			Scheme      string `json:"scheme,omitempty"`
			Interval    string `json:"interval,omitempty"`
			Relabelings []struct {
				SourceLabels []string `json:"sourceLabels,omitempty"`
				Separator    string   `json:"separator,omitempty"`
				TargetLabel  string   `json:"targetLabel,omitempty"`
				Regex        string   `json:"regex,omitempty"`
				Replacement  string   `json:"replacement,omitempty"`
				Action       string   `json:"action,omitempty"`
			} `json:"relabelings,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// kinds maps each apiVersion/kind the manifests hold to a new object of
// its API type.
var kinds = map[string]func() any{
	"v1/Namespace":      func() any { return &corev1.Namespace{} },
	"v1/ConfigMap":      func() any { return &corev1.ConfigMap{} },
	"v1/Service":        func() any { return &corev1.Service{} },
	"apps/v1/DaemonSet": func() any { return &appsv1.DaemonSet{} },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return &serviceMonitor{} },
}

// decodeStrict decodes one manifest into its API type as the API server
// does, strictly: YAML to JSON refusing duplicate keys, then JSON with
// field names matched case-sensitively (encoding/json would take
// "clusterIp" for "clusterIP"; the API server drops it), refusing unknown
// and duplicate fields.
func decodeStrict(data []byte) (any, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(data, &tm); err != nil {
		return nil, fmt.Errorf("read apiVersion and kind: %w", err)
	}
	newObj, ok := kinds[tm.APIVersion+"/"+tm.Kind]
	if !ok {
		return nil, fmt.Errorf("apiVersion %q kind %q: no API type known to this test (add it to kinds)", tm.APIVersion, tm.Kind)
	}
	obj := newObj()
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
	}
	strictErrs, err := kjson.UnmarshalStrict(js, obj)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, err)
	}
	if len(strictErrs) > 0 {
		return nil, fmt.Errorf("%s %s: %w", tm.APIVersion, tm.Kind, errors.Join(strictErrs...))
	}
	return obj, nil
}

// manifests decodes every *.yaml here, by file name.
func manifests(t *testing.T) map[string]any {
	t.Helper()
	files, err := filepath.Glob("*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests found (%v)", err)
	}
	out := map[string]any{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		// One object per file: a "---" would hide a second one from
		// this decoding.
		if bytes.Contains(data, []byte("\n---")) || bytes.HasPrefix(data, []byte("---")) {
			t.Fatalf("%s: more than one YAML document; keep one object per file", f)
		}
		obj, err := decodeStrict(data)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out[f] = obj
	}
	return out
}

func TestManifestsDecodeStrictly(t *testing.T) {
	got := manifests(t)
	for _, f := range []string{"namespace.yaml", "configmap.yaml", "daemonset.yaml", "service.yaml", "servicemonitor.yaml"} {
		if got[f] == nil {
			t.Errorf("%s missing", f)
		}
	}
}

// TestStrictDecodingCatchesTypos: the decoding above would fail on each
// of these mistakes in a real manifest.
func TestStrictDecodingCatchesTypos(t *testing.T) {
	tests := []struct {
		file, from, to string
	}{
		{"daemonset.yaml", "mountPropagation: HostToContainer", "mountPropogation: HostToContainer"},
		{"daemonset.yaml", "terminationGracePeriodSeconds: 30", "terminationGracePeriod: 30"},
		{"daemonset.yaml", "hostNetwork: true", "hostNetwork: true\n      hostNetwork: true"},
		{"daemonset.yaml", "maxSurge: 0", "maxSurge: 0\n      maxSurges: 0"},
		{"service.yaml", "clusterIP: None", "clusterIp: None"},
		{"servicemonitor.yaml", "interval: 15s", "intervall: 15s"},
		{"servicemonitor.yaml", "targetLabel: node", "targetLabels: node"},
		{"configmap.yaml", "kind: ConfigMap", "kind: ConfigMapp"},
	}
	for _, tt := range tests {
		t.Run(tt.file+": "+tt.to, func(t *testing.T) {
			data, err := os.ReadFile(tt.file)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Contains(data, []byte(tt.from)) {
				t.Fatalf("%s no longer contains %q: update this case", tt.file, tt.from)
			}
			bad := bytes.Replace(data, []byte(tt.from), []byte(tt.to), 1)
			if _, err := decodeStrict(bad); err == nil {
				t.Fatalf("%s with %q instead of %q decoded without error", tt.file, tt.to, tt.from)
			}
		})
	}
}

// theDaemonSet returns the DaemonSet, its one container and the
// ConfigMap.
func theDaemonSet(t *testing.T) (*appsv1.DaemonSet, *corev1.Container, *corev1.ConfigMap) {
	t.Helper()
	m := manifests(t)
	ds := m["daemonset.yaml"].(*appsv1.DaemonSet)
	if n := len(ds.Spec.Template.Spec.Containers); n != 1 {
		t.Fatalf("%d containers, want 1", n)
	}
	return ds, &ds.Spec.Template.Spec.Containers[0], m["configmap.yaml"].(*corev1.ConfigMap)
}

// runArgs splits the container's arguments into `ebpfwd run`'s flags
// (flag name to value) and the config file.
func runArgs(t *testing.T, c *corev1.Container) (flags map[string]string, order []string, cfgPath string) {
	t.Helper()
	args := c.Args
	if len(args) < 2 || args[0] != "run" {
		t.Fatalf("args %q: want run [flags] CONFIG", args)
	}
	flags = map[string]string{}
	rest := args[1:]
	for len(rest) > 1 {
		name, ok := strings.CutPrefix(rest[0], "--")
		if !ok {
			t.Fatalf("args %q: %q is not a flag", args, rest[0])
		}
		flags[name] = rest[1]
		order = append(order, name)
		rest = rest[2:]
	}
	if len(rest) != 1 || strings.HasPrefix(rest[0], "-") {
		t.Fatalf("args %q: want exactly one config file after the flags", args)
	}
	return flags, order, rest[0]
}

func mountAt(c *corev1.Container, path string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if m.MountPath == path {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

func volume(ds *appsv1.DaemonSet, name string) *corev1.Volume {
	for i, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return &ds.Spec.Template.Spec.Volumes[i]
		}
	}
	return nil
}

// TestDaemonSetMatchesTheDaemon checks the DaemonSet against what the
// daemon does: the paths it uses, its flags, its drain, its metrics port.
func TestDaemonSetMatchesTheDaemon(t *testing.T) {
	ds, c, cm := theDaemonSet(t)
	pod := ds.Spec.Template.Spec
	flags, _, cfgPath := runArgs(t, c)
	sc := c.SecurityContext

	if !pod.HostNetwork {
		t.Error("hostNetwork is not true: services would listen in the pod's namespace, not the node's")
	}
	if sc == nil || sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Fatal("capabilities do not drop ALL: the list would add to the runtime's defaults")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("privileged: the capabilities are listed so that it need not be")
	}

	// Host paths where the daemon keeps what must outlive a container.
	hostPaths := []struct{ path, why string }{
		{loader.DefaultBPFFS, "pinned maps and links"},
		{daemon.ControlDir, "the control socket and saved sysctls"},
		{"/var/run/netns", "the named namespaces"},
	}
	for _, hp := range hostPaths {
		m := mountAt(c, hp.path)
		if m == nil {
			t.Errorf("no mount at %s (%s)", hp.path, hp.why)
			continue
		}
		v := volume(ds, m.Name)
		if v == nil || v.HostPath == nil || v.HostPath.Path != hp.path {
			t.Errorf("mount at %s is not the host's %s (%s)", hp.path, hp.path, hp.why)
		}
		// The API server admits Bidirectional only for privileged
		// containers (validateMountPropagation).
		if m.MountPropagation != nil && *m.MountPropagation == corev1.MountPropagationBidirectional {
			t.Errorf("mount at %s is Bidirectional, which a container that is not privileged may not have", hp.path)
		}
	}
	if m := mountAt(c, "/var/run/netns"); m == nil || m.MountPropagation == nil || *m.MountPropagation != corev1.MountPropagationHostToContainer {
		t.Error("/var/run/netns is not HostToContainer: a namespace made after the pod started would be an empty file in it")
	}

	// The config file is the ConfigMap's key.
	m := mountAt(c, filepath.Dir(cfgPath))
	if m == nil || volume(ds, m.Name) == nil || volume(ds, m.Name).ConfigMap == nil ||
		volume(ds, m.Name).ConfigMap.Name != cm.Name {
		t.Fatalf("config %s is not in a volume of ConfigMap %s", cfgPath, cm.Name)
	}
	if _, ok := cm.Data[filepath.Base(cfgPath)]; !ok {
		t.Fatalf("ConfigMap %s has no key %s", cm.Name, filepath.Base(cfgPath))
	}
	if m.SubPath != "" {
		t.Error("the config volume uses subPath, which the kubelet never updates: reloads would not see edits")
	}
	if _, ok := flags["watch-config"]; !ok {
		t.Error("no --watch-config: a ConfigMap edit would not be applied without a restart")
	}

	// Readiness reads the ready file the daemon writes.
	rp := c.ReadinessProbe
	if rp == nil || rp.Exec == nil || !slices.Contains(rp.Exec.Command, flags["ready-file"]) {
		t.Errorf("readiness probe %+v does not test --ready-file %s", rp, flags["ready-file"])
	}

	// Stopping drains for --drain-timeout, then cleans up: the grace
	// period must hold both, else the kubelet kills mid-cleanup and
	// leaves pins and splice links behind.
	drain, err := time.ParseDuration(flags["drain-timeout"])
	if err != nil {
		t.Fatalf("--drain-timeout %q: %v", flags["drain-timeout"], err)
	}
	grace := pod.TerminationGracePeriodSeconds
	if grace == nil || time.Duration(*grace)*time.Second < drain+5*time.Second {
		t.Errorf("terminationGracePeriodSeconds %v leaves under 5s after the %v drain", grace, drain)
	}

	// One daemon per node at any time, one node at a time.
	ru := ds.Spec.UpdateStrategy.RollingUpdate
	if ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType || ru == nil ||
		ru.MaxSurge == nil || ru.MaxSurge.IntValue() != 0 || ru.MaxUnavailable == nil || ru.MaxUnavailable.IntValue() != 1 {
		t.Errorf("update strategy %+v: want RollingUpdate, maxUnavailable 1, maxSurge 0", ds.Spec.UpdateStrategy)
	}

	// The metrics port: the config's, the container's, the annotation's,
	// the Service's and the ServiceMonitor's.
	cfg := parseConfigMap(t, cm, c, map[string]string{"HOST_IP": "192.0.2.10"})
	_, port, ok := strings.Cut(cfg.Metrics.Addr, "192.0.2.10:")
	if !ok {
		t.Fatalf("metrics addr %q is not on the node's address", cfg.Metrics.Addr)
	}
	if a := ds.Spec.Template.Annotations["prometheus.io/port"]; a != port {
		t.Errorf("prometheus.io/port %q, config's metrics port %s", a, port)
	}
	if p := ds.Spec.Template.Annotations["prometheus.io/path"]; p != cfg.Metrics.Path {
		t.Errorf("prometheus.io/path %q, config's metrics path %s", p, cfg.Metrics.Path)
	}
	if len(c.Ports) != 1 || strconv.Itoa(int(c.Ports[0].ContainerPort)) != port {
		t.Errorf("container ports %+v, want the metrics port %s", c.Ports, port)
	}
	svc := manifests(t)["service.yaml"].(*corev1.Service)
	if len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.String() != c.Ports[0].Name {
		t.Errorf("Service ports %+v do not target the container's %q port", svc.Spec.Ports, c.Ports[0].Name)
	}
	sm := manifests(t)["servicemonitor.yaml"].(*serviceMonitor)
	if len(sm.Spec.Endpoints) != 1 || sm.Spec.Endpoints[0].Port != svc.Spec.Ports[0].Name || sm.Spec.Endpoints[0].Path != cfg.Metrics.Path {
		t.Errorf("ServiceMonitor endpoints %+v do not scrape the Service's port %q at %s", sm.Spec.Endpoints, svc.Spec.Ports[0].Name, cfg.Metrics.Path)
	}
	for k, v := range sm.Spec.Selector.MatchLabels {
		if svc.Labels[k] != v {
			t.Errorf("ServiceMonitor selects %s=%s, which the Service does not carry", k, v)
		}
	}
}

// downwardSample stands for what the kubelet puts in each Downward API
// field the DaemonSet reads.
var downwardSample = map[string]string{
	"spec.nodeName": "node-a",
	"status.hostIP": "192.0.2.10",
}

// podEnv is the container's environment as the kubelet would set it,
// with the Downward API's fields from downwardSample, then override on top.
func podEnv(t *testing.T, c *corev1.Container, override map[string]string) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			v, ok := downwardSample[e.ValueFrom.FieldRef.FieldPath]
			if !ok {
				t.Fatalf("env %s: fieldRef %s has no sample value in downwardSample", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		default:
			t.Fatalf("env %s: a source this test does not know", e.Name)
		}
	}
	for k, v := range override {
		env[k] = v
	}
	return env
}

// parseConfigMap parses the ConfigMap's configuration in the pod's
// environment: a variable the DaemonSet does not set (and that has no
// default) is an error.
func parseConfigMap(t *testing.T, cm *corev1.ConfigMap, c *corev1.Container, override map[string]string) *config.Config {
	t.Helper()
	_, _, cfgPath := runArgs(t, c)
	env := podEnv(t, c, override)
	cfg, warns, err := config.ParseEnv(cfgPath, []byte(cm.Data[filepath.Base(cfgPath)]),
		func(name string) (string, bool) { v, ok := env[name]; return v, ok })
	if err != nil {
		t.Fatalf("the ConfigMap's configuration does not parse in the pod's environment:\n%v", err)
	}
	for _, w := range warns {
		t.Errorf("warning: %s", w)
	}
	return cfg
}

func TestConfigMapParses(t *testing.T) {
	_, c, cm := theDaemonSet(t)
	cfg := parseConfigMap(t, cm, c, nil)
	want := map[string]string{"web": "tc", "admin": "userspace"}
	if len(cfg.Services) != len(want) {
		t.Fatalf("%d services, want %d", len(cfg.Services), len(want))
	}
	for _, s := range cfg.Services {
		if want[s.Name] != s.Datapath {
			t.Errorf("service %s on %q, want %q", s.Name, s.Datapath, want[s.Name])
		}
		if s.Addr != "192.0.2.10:8443" && s.Addr != "192.0.2.10:8444" {
			t.Errorf("service %s listens on %s, not on the node's address", s.Name, s.Addr)
		}
		if n := s.Forwarder.Nodes[0]; n.Name != "backend-node-a" || s.NetNSOut.Spec() != "backend" {
			t.Errorf("service %s: node %q out of %q, want backend-node-a out of backend", s.Name, n.Name, s.NetNSOut.Spec())
		}
	}
	// Without the Downward API's HOST_IP the file says where it is needed.
	env := podEnv(t, c, nil)
	delete(env, "HOST_IP")
	_, _, err := config.ParseEnv("config.yaml", []byte(cm.Data["config.yaml"]),
		func(name string) (string, bool) { v, ok := env[name]; return v, ok })
	if err == nil || !strings.Contains(err.Error(), "environment variable HOST_IP is not set") {
		t.Fatalf("without HOST_IP: %v, want it named as not set", err)
	}
}
