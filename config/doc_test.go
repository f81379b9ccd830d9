package config

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestConfigDocListsEveryKey: docs/CONFIG.md's table of GOST keys has a row
// for every key of schema.go (implemented or refused), every metadata key
// ebpfwd reads and every GOST flag, each marked "same as GOST", "ebpfwd
// extension" or "refused: why", so the document cannot drift from the code.
func TestConfigDocListsEveryKey(t *testing.T) {
	data, err := os.ReadFile("../docs/CONFIG.md")
	if err != nil {
		t.Fatal(err)
	}
	row := regexp.MustCompile("(?m)^\\| ([a-z ]+) \\| `([^`]+)` \\| (.*) \\|$")
	doc := map[string]string{} // "where/key" -> marking
	for _, m := range row.FindAllStringSubmatch(string(data), -1) {
		doc[m[1]+"/"+m[2]] = m[3]
	}
	want := map[string][]string{}
	for where, s := range map[string]*section{
		"top level": &topLevelSection, "service": &serviceSection, "handler": &handlerSection,
		"listener": &listenerSection, "forwarder": &forwarderSection, "forward node": &forwardNodeSection,
		"selector": &selectorSection, "chain": &chainSection, "hop": &hopSection, "hop node": &hopNodeSection,
		"connector": &connectorSection, "dialer": &dialerSection, "auth": &authSection, "log": &logSection,
		"metrics": &metricsSection, "limiter": &limiterSection,
	} {
		want[where] = append(append(want[where], s.keys...), s.unsupported...)
	}
	want["service metadata"] = serviceMetadataKeys
	want["handler metadata"] = handlerMetadataKeys
	want["http handler metadata"] = httpHandlerMetadataKeys
	want["listener metadata"] = listenerMetadataKeys
	want["hop metadata"] = hopMetadataKeys
	want["node metadata"] = nodeMetadataKeys
	want["flag"] = []string{"-L", "-F", "-C", "-D", "-V", "-O"}

	refused := map[string]bool{}
	for where, s := range map[string]*section{"top level": &topLevelSection, "service": &serviceSection,
		"handler": &handlerSection, "listener": &listenerSection, "forward node": &forwardNodeSection,
		"selector": &selectorSection, "hop": &hopSection, "hop node": &hopNodeSection,
		"connector": &connectorSection, "dialer": &dialerSection, "log": &logSection, "metrics": &metricsSection,
		"limiter": &limiterSection} {
		for _, k := range s.unsupported {
			refused[where+"/"+k] = true
		}
	}
	for where, keys := range want {
		for _, k := range keys {
			id := where + "/" + k
			mark, ok := doc[id]
			switch {
			case !ok:
				t.Errorf("docs/CONFIG.md has no row | %s | `%s` |", where, k)
			case refused[id] && !strings.HasPrefix(mark, "refused: "):
				t.Errorf("%s: ebpfwd refuses it, the table says %q", id, mark)
			case !refused[id] && !strings.HasPrefix(mark, "same as GOST") && !strings.HasPrefix(mark, "ebpfwd extension"):
				t.Errorf("%s: marked %q, want \"same as GOST\" or \"ebpfwd extension\"", id, mark)
			}
		}
	}
}
