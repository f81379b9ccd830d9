package config

import (
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"
)

// Diagnostic is one problem at one place in a configuration file.
type Diagnostic struct {
	File   string
	Line   int // 1-based; always ≥ 1
	Column int // 1-based; 0 when the YAML parser did not say
	// Field is the path of the offending element, such as
	// "services[0].forwarder.nodes[1].addr"; "" for file-level problems.
	Field   string
	Message string
}

// String formats the diagnostic as "FILE:LINE:COL: FIELD: MESSAGE", the form
// editors and CI logs recognise. An unknown column and an empty field are
// left out rather than printed as placeholders.
func (d Diagnostic) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s:%d:", d.File, d.Line)
	if d.Column > 0 {
		fmt.Fprintf(&b, "%d:", d.Column)
	}
	b.WriteByte(' ')
	if d.Field != "" {
		b.WriteString(d.Field)
		b.WriteString(": ")
	}
	b.WriteString(d.Message)
	return b.String()
}

// Error makes a Diagnostic usable as an error.
func (d Diagnostic) Error() string { return d.String() }

// Errors is every problem that makes a configuration invalid, sorted by
// position.
type Errors struct {
	List []Diagnostic
}

// Error lists all problems, one per line.
func (e *Errors) Error() string {
	lines := make([]string, len(e.List))
	for i, d := range e.List {
		lines[i] = d.String()
	}
	return strings.Join(lines, "\n")
}

// decoder walks the yaml.Node tree of one file, building the model and
// collecting every problem instead of stopping at the first.
type decoder struct {
	file string
	env  Env // what ${NAME} expands to; nil: no expansion
	// unexpanded are the values whose ${NAME} failed: the failure is
	// reported, and whatever else their raw text would provoke is not.
	unexpanded map[*yaml.Node]bool
	errs       []Diagnostic
	warns      []Diagnostic
	// elements counts mapping and list entries visited; see maxElements.
	elements int
}

func (d *decoder) at(n *yaml.Node, field, msg string) Diagnostic {
	// Nodes built by the parser always have a position; the fallback only
	// keeps the "Line ≥ 1" promise for synthetic nodes.
	line, col := 1, 0
	if n != nil && n.Line > 0 {
		line, col = n.Line, n.Column
	}
	return Diagnostic{File: d.file, Line: line, Column: col, Field: field, Message: msg}
}

func (d *decoder) errorf(n *yaml.Node, field, format string, args ...any) {
	if d.unexpanded[n] {
		return
	}
	d.errs = append(d.errs, d.at(n, field, fmt.Sprintf(format, args...)))
}

func (d *decoder) warnf(n *yaml.Node, field, format string, args ...any) {
	if d.unexpanded[n] {
		return
	}
	d.warns = append(d.warns, d.at(n, field, fmt.Sprintf(format, args...)))
}
