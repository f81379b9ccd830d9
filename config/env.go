package config

import (
	"bytes"
	"fmt"
	"strings"
	"unicode/utf8"

	"gopkg.in/yaml.v3"
)

// Environment variable expansion, an ebpfwd extension to GOST's YAML (GOST
// reads values as written). It lets one file serve every node of a fleet:
// the node's name, its addresses and its namespaces come from the
// process's environment (a Kubernetes pod's Downward API, a systemd unit's
// Environment=).
//
//   - ${NAME} is the value of NAME; an unset NAME is an error at the
//     place it is written. A set but empty NAME expands to "".
//   - ${NAME:-default} is default when NAME is unset or empty;
//     ${NAME-default} only when it is unset.
//   - ${NAME:?message} and ${NAME?message} are errors saying message when
//     NAME is unset or empty (":?"), or unset ("?").
//   - $${ is a literal ${. Every other $ is literal, so GOST's own uses
//     of $ (limiter lines such as "$ 100MB" and "$$ 10MB") mean what they
//     mean in GOST.
//
// Expansion works on the parsed YAML, one scalar value at a time, never
// on keys: a variable's value is text inside that value (it can add no
// key, list item or document), and every position a diagnostic gives is
// where the file has it. An unquoted value is typed after expansion, as
// if the result had been written there (port: ${PORT} is a number);
// a quoted one stays a string. Inside a flow collection ([...], {...})
// a value holding ${...} must be quoted: YAML reads the braces there.

// Env looks a variable up, as os.LookupEnv does.
type Env func(name string) (string, bool)

// expandEnv expands every scalar value under root in place, reporting
// each problem at the expression's position in data.
func (d *decoder) expandEnv(root *yaml.Node, data []byte) {
	if d.env == nil || root == nil || !bytes.Contains(data, []byte("${")) {
		return
	}
	src := newSource(data)
	seen := map[*yaml.Node]bool{}
	var walk func(n *yaml.Node, path string)
	walk = func(n *yaml.Node, path string) {
		// Aliases are not followed: the anchored node is expanded once,
		// where it is written.
		if n == nil || n.Kind == yaml.AliasNode || seen[n] {
			return
		}
		seen[n] = true
		switch n.Kind {
		case yaml.MappingNode:
			for i := 0; i+1 < len(n.Content); i += 2 {
				walk(n.Content[i+1], join(path, n.Content[i].Value))
			}
		case yaml.SequenceNode:
			for i, item := range n.Content {
				walk(item, fmt.Sprintf("%s[%d]", path, i))
			}
		case yaml.ScalarNode:
			d.expandScalar(n, path, src)
		}
	}
	// Not following aliases keeps the walk linear in the file's size,
	// whatever the aliases expand to.
	walk(root, "")
}

// expandScalar expands n's value.
func (d *decoder) expandScalar(n *yaml.Node, path string, src *source) {
	if !strings.Contains(n.Value, "${") {
		return
	}
	cursor := src.offset(n.Line, n.Column)
	value, problems := expand(n.Value, d.env)
	for _, p := range problems {
		line, col := n.Line, n.Column
		// The expression as written is in the file from the value's
		// start on, unless escapes of a double-quoted value changed it.
		if at := src.find(p.expr, cursor); at >= 0 {
			line, col = src.position(at)
			cursor = at + len(p.expr)
		}
		d.errs = append(d.errs, Diagnostic{File: d.file, Line: line, Column: col, Field: path, Message: p.msg})
	}
	if len(problems) > 0 {
		if d.unexpanded == nil {
			d.unexpanded = map[*yaml.Node]bool{}
		}
		d.unexpanded[n] = true
		return
	}
	if value == n.Value {
		return
	}
	n.Value = value
	// An unquoted, untagged value is typed from what it now says.
	if n.Style&(yaml.TaggedStyle|yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle|yaml.LiteralStyle|yaml.FoldedStyle) == 0 {
		n.Tag = ""
	}
}

// envProblem is one expression that could not be expanded.
type envProblem struct {
	expr string // as written, from "${" on
	msg  string
}

// expand expands s (see the top of this file), returning every problem.
func expand(s string, env Env) (string, []envProblem) {
	var b strings.Builder
	var problems []envProblem
	for i := 0; i < len(s); {
		switch {
		case strings.HasPrefix(s[i:], "$${"):
			b.WriteString("${")
			i += 3
			continue
		case !strings.HasPrefix(s[i:], "${"):
			b.WriteByte(s[i])
			i++
			continue
		}
		end := strings.IndexByte(s[i:], '}')
		if end < 0 {
			problems = append(problems, envProblem{expr: "${", msg: `"${" without a closing "}" (write $${ for a literal ${)`})
			b.WriteString(s[i:])
			return b.String(), problems
		}
		expr := s[i : i+end+1]
		i += end + 1
		v, msg := expandOne(expr[2:len(expr)-1], env)
		if msg != "" {
			problems = append(problems, envProblem{expr: expr, msg: expr + ": " + msg})
			continue
		}
		b.WriteString(v)
	}
	return b.String(), problems
}

// expandOne expands the inside of one ${...}.
func expandOne(inner string, env Env) (value, problem string) {
	name, op, arg := inner, "", ""
	if i := strings.IndexAny(inner, ":-?"); i >= 0 {
		name = inner[:i]
		rest := inner[i:]
		for _, o := range []string{":-", ":?", "-", "?"} {
			if strings.HasPrefix(rest, o) {
				op, arg = o, rest[len(o):]
				break
			}
		}
		if op == "" {
			return "", fmt.Sprintf("unknown form: write ${%s}, ${%s:-default}, ${%s-default}, ${%s:?message} or ${%s?message}",
				name, name, name, name, name)
		}
	}
	if !isEnvName(name) {
		return "", fmt.Sprintf("%q is not a variable name (letters, digits and _, not starting with a digit; write $${ for a literal ${)", name)
	}
	v, set := env(name)
	switch op {
	case "":
		if !set {
			return "", fmt.Sprintf("environment variable %s is not set (${%s:-default} gives a default)", name, name)
		}
	case ":-":
		if v == "" {
			v = arg
		}
	case "-":
		if !set {
			v = arg
		}
	case ":?", "?":
		if !set || (op == ":?" && v == "") {
			what := "is not set"
			if set {
				what = "is empty"
			}
			if arg == "" {
				return "", fmt.Sprintf("environment variable %s %s", name, what)
			}
			return "", fmt.Sprintf("environment variable %s %s: %s", name, what, arg)
		}
	}
	return v, ""
}

func isEnvName(s string) bool {
	if s == "" || (s[0] >= '0' && s[0] <= '9') {
		return false
	}
	for _, c := range []byte(s) {
		if c != '_' && (c < '0' || c > '9') && (c < 'a' || c > 'z') && (c < 'A' || c > 'Z') {
			return false
		}
	}
	return true
}

// source maps between byte offsets of a file and the 1-based line and
// column (in characters, as yaml.v3 counts them) of its nodes.
type source struct {
	data  []byte
	lines []int // byte offset where each line starts
}

func newSource(data []byte) *source {
	lines := []int{0}
	for i, c := range data {
		if c == '\n' {
			lines = append(lines, i+1)
		}
	}
	return &source{data: data, lines: lines}
}

// offset is the byte offset of line:col, clamped to the file.
func (s *source) offset(line, col int) int {
	if line < 1 || line > len(s.lines) {
		return 0
	}
	off := s.lines[line-1]
	for c := 1; c < col && off < len(s.data) && s.data[off] != '\n'; c++ {
		_, size := utf8.DecodeRune(s.data[off:])
		off += size
	}
	return off
}

// find returns the offset of the first expr at or after from that is not
// part of an escaped $${, or -1.
func (s *source) find(expr string, from int) int {
	for from >= 0 && from <= len(s.data) {
		i := bytes.Index(s.data[from:], []byte(expr))
		if i < 0 {
			return -1
		}
		at := from + i
		if at == 0 || s.data[at-1] != '$' {
			return at
		}
		from = at + 1
	}
	return -1
}

// position is the line and column of byte offset off.
func (s *source) position(off int) (line, col int) {
	line = 1
	for line < len(s.lines) && s.lines[line] <= off {
		line++
	}
	return line, utf8.RuneCount(s.data[s.lines[line-1]:off]) + 1
}
