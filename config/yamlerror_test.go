package config

import (
	"errors"
	"testing"
)

// TestSyntaxErrorPositions: a YAML syntax error is reported at the line and
// column of the token at fault, not where yaml.v3 says (the line the
// enclosing mapping or key began on).
func TestSyntaxErrorPositions(t *testing.T) {
	tests := []struct {
		name      string
		yaml      string
		line, col int
		msg       string
	}{
		{"second colon on a line", "services:\n- name: a\n  addr: a: b\n", 3, 10, "mapping values are not allowed"},
		{"key outdented by one", "services:\n- name: a\n  addr: x\n bad: 1\n", 4, 2, "did not find expected key"},
		// yaml.v3 says line 1 here: where the outer mapping began.
		{"key of a nested mapping outdented", "services:\n- name: a\n  addr: x\n  handler:\n    type: tcp\n   other: 1\n", 6, 4, "did not find expected key"},
		{"tab in indentation", "services:\n- name: a\n\taddr: x\n", 3, 1, "tab character"},
		{"unknown escape", "services:\n- name: a\n  addr: \"x\\q\"\n", 3, 11, "unknown escape character"},
		{"unclosed flow list", "services:\n- name: a\n  addr: [1, 2\n  foo: bar\n", 3, 9, "did not find expected ',' or ']'"},
		{"unclosed flow mapping", "services:\n- name: a\n  addr: {a: 1\nlog: x\n", 3, 9, "did not find expected ',' or '}'"},
		{"unclosed quote", "services:\n- name: a\n  addr: 'abc\n", 3, 9, "end of stream"},
		{"list entry in a mapping", "log: {}\n- b\n", 2, 1, "did not find expected key"},
		{"list entry outdented", "services:\n  - name: a\n  - addr: x\n   - y\n", 4, 4, "did not find expected '-' indicator"},
		{"reserved indicator", "services:\n- name: @a\n", 2, 9, "cannot start any token"},
		{"alias to nothing", "services:\n- name: a\n  addr: *nowhere\n", 3, 9, "unknown anchor 'nowhere'"},
		{"error in a second document", "services:\n- {addr: \":1\", handler: {type: tcp}, forwarder: {nodes: [{addr: \"10.0.0.1:1\"}]}}\n---\nlog: a: b\n", 4, 7, "mapping values are not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Parse("gost.yaml", []byte(tt.yaml))
			var list *Errors
			if !errors.As(err, &list) || len(list.List) != 1 {
				t.Fatalf("error = %v, want one syntax error", err)
			}
			checkDiagnostics(t, "error", list.List, []want{{tt.line, tt.col, "", tt.msg}})
		})
	}
}
