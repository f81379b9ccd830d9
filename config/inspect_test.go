package config

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestInspectReturnsPartialConfig(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gost.yaml")
	body := `services:
- name: svc
  addr: "10.0.0.1:99999"
  handler: {type: tcp}
  forwarder:
    nodes:
    - {name: t, addr: "10.0.1.11:8000"}
  metadata: {netns: ns-a, netns.out: ns-b}
`
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if cfg, _, err := Load(path); cfg != nil || err == nil {
		t.Fatalf("Load of an invalid config = %v, %v; want nil and an error", cfg, err)
	}
	cfg, _, err := Inspect(path)
	var errs *Errors
	if !errors.As(err, &errs) || len(errs.List) != 1 || errs.List[0].Field != "services[0].addr" {
		t.Fatalf("Inspect error = %v, want exactly the bad port", err)
	}
	if cfg == nil || len(cfg.Services) != 1 {
		t.Fatalf("Inspect returned no partial config: %+v", cfg)
	}
	if s := cfg.Services[0]; s.NetNS.Spec() != "ns-a" || s.NetNSOut.Spec() != "ns-b" || cfg.Path != path {
		t.Fatalf("partial service = %+v (path %q), want its namespaces", s, cfg.Path)
	}
}
