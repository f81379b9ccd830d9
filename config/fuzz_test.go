package config

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse checks that Parse never panics and always answers with either a
// config or an *Errors whose every diagnostic points at a real line.
func FuzzParse(f *testing.F) {
	files, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		f.Fatal(err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(""))
	f.Add([]byte("services: *a\n"))
	f.Add([]byte("log: &l {<<: *l}\n"))
	f.Add([]byte("services:\n- &s {addr: :1, handler: {type: tcp}, forwarder: {nodes: [{addr: :2}]}, metadata: {x: *s}}\n"))

	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, warns, err := Parse("fuzz.yaml", data)
		for _, w := range warns {
			if w.Line < 1 {
				t.Errorf("warning without a line: %q", w)
			}
		}
		if err == nil {
			if cfg == nil {
				t.Fatal("nil config and nil error")
			}
			if len(cfg.Services) == 0 {
				t.Fatal("config accepted without services")
			}
			return
		}
		if cfg != nil {
			t.Error("config returned together with an error")
		}
		var list *Errors
		if !errors.As(err, &list) {
			t.Fatalf("error is %T, want *Errors: %v", err, err)
		}
		if len(list.List) == 0 {
			t.Fatal("*Errors with no diagnostics")
		}
		for _, d := range list.List {
			if d.Line < 1 {
				t.Errorf("error without a line: %q", d)
			}
		}
	})
}
