package config

import (
	"bytes"
	"errors"
	"io"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"
)

// yaml.v3 reports a syntax error with a line only, and often the wrong one:
// the line where the construct being parsed began (a block mapping, a
// simple key), not the token at fault. locateSyntaxError finds the token:
// the first line of the file at which parsing the file up to and including
// that line fails with the same message is the line that holds it (a
// prefix that stops before the token either parses or fails differently);
// the column is then that of the token the message names on that line.

// maxLocateBytes bounds the prefix search: each step parses the file up to
// a line, so the work grows with the square of the file's length. It stops
// once it parsed this many bytes in all (a few thousand lines of a real
// configuration); the error then keeps yaml.v3's line.
const maxLocateBytes = 8 << 20

// yamlAnchorError matches yaml.v3's message for an alias to no anchor, which
// carries no position at all.
var yamlAnchorError = regexp.MustCompile(`^unknown anchor '(.*)' referenced$`)

// locateSyntaxError returns the line and column (1-based; column 0 when it
// cannot be told) of the token yaml.v3's message msg is about. line is
// yaml.v3's own line (0 when it gave none).
func locateSyntaxError(data []byte, msg string, line int) (int, int) {
	lines := bytes.SplitAfter(data, []byte("\n"))
	if m := yamlAnchorError.FindStringSubmatch(msg); m != nil {
		if l, c, ok := findAlias(lines, m[1]); ok {
			return l, c
		}
		return max(line, 1), 0
	}
	// The construct yaml.v3 names starts at or before the token at fault.
	found, end, parsed := 0, 0, 0
	for i, l := range lines {
		end += len(l)
		if i+1 < line {
			continue
		}
		if parsed += end; parsed > maxLocateBytes {
			break
		}
		if syntaxMessage(data[:end]) == msg {
			found = i + 1
			break
		}
	}
	if found == 0 {
		return max(line, 1), 0
	}
	return found, tokenColumn(string(bytes.TrimRight(lines[found-1], "\r\n")), msg)
}

// syntaxMessage is the message of the first syntax error in data, as
// document reports it, or "".
func syntaxMessage(data []byte) string {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	for {
		var n yaml.Node
		err := dec.Decode(&n)
		switch {
		case err == nil:
			continue
		case errors.Is(err, io.EOF):
			return ""
		}
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		if m := yamlLineError.FindStringSubmatch(err.Error()); m != nil {
			msg = m[2]
		}
		return msg
	}
}

// tokenColumn finds, on the line that holds it, the token msg is about.
func tokenColumn(line, msg string) int {
	col := func(i int) int {
		if i < 0 {
			return 0
		}
		return i + 1
	}
	switch {
	case strings.Contains(msg, "tab character"):
		return col(strings.IndexByte(line, '\t'))
	case strings.Contains(msg, "cannot start any token"):
		return col(strings.IndexAny(line, "\t@`%"))
	case strings.Contains(msg, "escape character"), strings.Contains(msg, "hexdecimal number"):
		return col(strings.IndexByte(line, '\\'))
	case strings.Contains(msg, "mapping values are not allowed"):
		// The second key indicator on the line (`addr: a: b`), or the
		// only one when the line continues a scalar.
		first := keyIndicator(line, 0)
		if second := keyIndicator(line, first+1); first >= 0 && second >= 0 {
			return col(second)
		}
		return col(first)
	case strings.Contains(msg, "expected ',' or ']'"):
		return col(strings.LastIndexByte(line, '['))
	case strings.Contains(msg, "expected ',' or '}'"):
		return col(strings.LastIndexByte(line, '{'))
	case strings.Contains(msg, "expected node content"):
		// `[` or `{` with nothing after it; else the line's first token.
		if i := strings.LastIndexAny(line, "[{"); i >= 0 {
			return col(i)
		}
	case strings.Contains(msg, "end of stream"):
		// An unclosed quote, block or flow collection.
		return col(strings.LastIndexAny(line, `"'[{`))
	}
	// Parser errors (a key, an entry or a node where none may stand)
	// are about the line's first token.
	return col(len(line) - len(strings.TrimLeft(line, " \t")))
}

// keyIndicator is the index of the first ':' at or after from that ends a
// plain key (followed by a space or the end of the line), or -1.
func keyIndicator(line string, from int) int {
	for i := from; i < len(line); i++ {
		if line[i] == ':' && (i+1 == len(line) || line[i+1] == ' ' || line[i+1] == '\t') {
			return i
		}
	}
	return -1
}

// findAlias finds the alias *name in the file.
func findAlias(lines [][]byte, name string) (int, int, bool) {
	tok := []byte("*" + name)
	for i, l := range lines {
		for off := 0; ; {
			j := bytes.Index(l[off:], tok)
			if j < 0 {
				break
			}
			at := off + j
			after := at + len(tok)
			if after == len(l) || bytes.IndexByte([]byte(" \t\r\n,]}"), l[after]) >= 0 {
				return i + 1, at + 1, true
			}
			off = after
		}
	}
	return 0, 0, false
}
