package layering

import (
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/ebpfwd/ebpfwd/"

// rules say, for packages under a prefix, which ebpfwd packages they may
// depend on (directly or not): each allowed entry is a prefix too.
var rules = []struct {
	pkg     string
	allowed []string
	why     string
}{
	{"netns", nil, "the namespace helper is the foundation"},
	{"selector", nil, "node selection needs nothing of ebpfwd"},
	{"config", []string{"netns", "selector"}, "config knows nothing of BPF or datapaths"},
	{"datapath", []string{"netns", "selector"}, "the contract holds only the contract"},
	{"bpf", nil, "generated objects stand alone"},
	{"loader", []string{"bpf", "netns"}, "kernel side: never userspace/"},
	{"tc", []string{"tc", "datapath", "loader", "bpf", "netns", "selector"}, "kernel side: never userspace/"},
	{"userspace", []string{"userspace", "datapath", "netns", "selector"}, "a datapath is a sibling of the others"},
	{"metrics", []string{"datapath", "netns", "selector"}, "metrics read the contract, not a datapath"},
}

// TestImportsPointDown fails when a package depends on one above it.
func TestImportsPointDown(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", `{{.ImportPath}}:{{join .Deps " "}}`, module+"...").Output()
	if err != nil {
		t.Skipf("go list unavailable: %v", err)
	}
	checked := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, deps, _ := strings.Cut(line, ":")
		rel, ours := strings.CutPrefix(path, module)
		if !ours {
			continue
		}
		for _, r := range rules {
			if rel != r.pkg && !strings.HasPrefix(rel, r.pkg+"/") {
				continue
			}
			checked++
			for _, dep := range strings.Fields(deps) {
				drel, ours := strings.CutPrefix(dep, module)
				if !ours || allowed(drel, r.allowed) {
					continue
				}
				t.Errorf("%s depends on %s: %s", rel, drel, r.why)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no package checked: the module path or the go list output changed")
	}
}

func allowed(pkg string, prefixes []string) bool {
	for _, p := range prefixes {
		if pkg == p || strings.HasPrefix(pkg, p+"/") {
			return true
		}
	}
	return false
}
