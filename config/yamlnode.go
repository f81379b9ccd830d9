package config

import (
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// field is one value of the configuration together with where it sits: the
// key it was written under (for positions) and its path (for messages).
type field struct {
	key   *yaml.Node // the key as written; nil for list items
	value *yaml.Node // the value, with aliases resolved
	path  string     // e.g. "services[0].handler.type"
}

// pos is where a diagnostic about the field points: the value when there is
// one, else the key.
func (f field) pos() *yaml.Node {
	if f.value != nil && f.value.Line > 0 {
		return f.value
	}
	return f.key
}

// fields are the keys of one mapping that ebpfwd implements, by canonical name.
type fields map[string]field

// maxElements bounds how many mapping and list entries one file may expand
// to. YAML aliases let a few hundred bytes stand for billions of entries;
// real configurations stay far below this.
const maxElements = 100_000

// maxAliasChain bounds alias-to-alias resolution; yaml.v3 never produces such
// chains, so hitting it only means the node tree is not what we expect.
const maxAliasChain = 8

func resolve(n *yaml.Node) *yaml.Node {
	for i := 0; i < maxAliasChain && n != nil && n.Kind == yaml.AliasNode && n.Alias != nil; i++ {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n == nil || n.Kind == 0 || (n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null")
}

// describe names a node's kind for messages such as "must be a list, not a mapping".
func describe(n *yaml.Node) string {
	switch {
	case isNull(n):
		return "null"
	case n.Kind == yaml.MappingNode:
		return "a mapping"
	case n.Kind == yaml.SequenceNode:
		return "a list"
	case n.Kind == yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!bool":
			return "a boolean"
		case "!!int", "!!float":
			return "a number"
		}
		return "a string"
	}
	return "an alias"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// count charges n entries against the file's expansion budget and reports
// false (once, with an error) when the budget is exhausted.
func (d *decoder) count(n int, at *yaml.Node) bool {
	if d.elements > maxElements {
		return false
	}
	d.elements += n
	if d.elements > maxElements {
		d.errorf(at, "", "the configuration expands to more than %d entries (YAML aliases?); refusing to process it", maxElements)
		return false
	}
	return true
}

// pair is one key and its (alias-resolved) value.
type pair struct {
	key, value *yaml.Node
}

// pairs returns the entries of mapping n with YAML merge keys ("<<") applied
// the way yaml.v3 applies them when GOST decodes the file: keys written in
// the mapping win over merged ones, earlier merge sources over later ones.
// Duplicate keys are reported; GOST's loader treats keys case-insensitively,
// so "Addr" and "addr" are duplicates too.
func (d *decoder) pairs(n *yaml.Node, path string) []pair {
	return d.mergedPairs(n, path, map[*yaml.Node]bool{})
}

func (d *decoder) mergedPairs(n *yaml.Node, path string, active map[*yaml.Node]bool) []pair {
	if !d.count(len(n.Content)/2, n) {
		return nil
	}
	// active may already hold n when plainValue is converting it.
	if !active[n] {
		active[n] = true
		defer delete(active, n)
	}

	var out []pair
	var merges []*yaml.Node
	seen := map[string]*yaml.Node{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k := resolve(n.Content[i])
		if k.Kind != yaml.ScalarNode {
			d.errorf(n.Content[i], path, "a key must be a plain string, not %s", describe(k))
			continue
		}
		if k.ShortTag() == "!!merge" {
			merges = append(merges, n.Content[i+1])
			continue
		}
		lower := strings.ToLower(k.Value)
		if first, dup := seen[lower]; dup {
			d.errorf(k, join(path, k.Value), "duplicate key %q (first at line %d)", k.Value, first.Line)
			continue
		}
		seen[lower] = k
		out = append(out, pair{key: k, value: resolve(n.Content[i+1])})
	}
	for _, m := range merges {
		// Positions come from the nodes as written (the alias), not from
		// the anchored mapping they point to, which may be far away.
		sources := []*yaml.Node{m}
		if resolved := resolve(m); resolved.Kind == yaml.SequenceNode {
			sources = resolved.Content
		}
		if !d.count(len(sources), m) {
			return out
		}
		for _, written := range sources {
			src := resolve(written)
			if src.Kind != yaml.MappingNode {
				d.errorf(written, path, "a merge key (<<) needs a mapping or a list of mappings, not %s", describe(src))
				continue
			}
			if active[src] {
				d.errorf(written, path, "a merge key (<<) refers to a mapping that contains it")
				continue
			}
			for _, p := range d.mergedPairs(src, path, active) {
				lower := strings.ToLower(p.key.Value)
				if _, overridden := seen[lower]; overridden {
					continue
				}
				seen[lower] = p.key
				out = append(out, p)
			}
		}
	}
	return out
}

// mapping decodes the keys of f as section s. GOST keys ebpfwd does not
// implement and keys GOST does not know are reported; the implemented ones
// are returned. A null value is an empty mapping. ok is false when f is not
// a mapping at all.
func (d *decoder) mapping(n *yaml.Node, path string, s *section) (fs fields, ok bool) {
	n = resolve(n)
	if isNull(n) {
		return fields{}, true
	}
	if n.Kind != yaml.MappingNode {
		what := path
		if what == "" {
			what = "the top level"
		}
		d.errorf(n, path, "%s must be a mapping, not %s", what, describe(n))
		return nil, false
	}
	fs = fields{}
	for _, p := range d.pairs(n, path) {
		canonical, supported, known := s.lookup(p.key.Value)
		fieldPath := join(path, canonical)
		switch {
		case supported:
			fs[canonical] = field{key: p.key, value: p.value, path: fieldPath}
		case known:
			d.errorf(p.key, fieldPath, "%q is a GOST feature ebpfwd does not support", canonical)
		default:
			d.errorf(p.key, fieldPath, "unknown field %q%s", p.key.Value, s.suggest(p.key.Value))
		}
	}
	return fs, true
}

// fieldMapping is mapping for a field's value.
func (d *decoder) fieldMapping(f field, s *section) (fields, bool) {
	return d.mapping(f.value, f.path, s)
}

// sequence returns the items of list f. A null value is an empty list.
func (d *decoder) sequence(f field) []field {
	n := f.value
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		d.errorf(f.pos(), f.path, "must be a list, not %s", describe(n))
		return nil
	}
	if !d.count(len(n.Content), n) {
		return nil
	}
	items := make([]field, len(n.Content))
	for i, item := range n.Content {
		items[i] = field{value: resolve(item), path: f.path + "[" + strconv.Itoa(i) + "]"}
	}
	return items
}

// str returns a scalar as written. GOST decodes any scalar into a string
// field (a password of 1234 is the string "1234"), so numbers and booleans
// are accepted; lists and mappings are not. Null is "".
func (d *decoder) str(f field) (string, bool) {
	n := f.value
	if isNull(n) {
		return "", true
	}
	if n.Kind != yaml.ScalarNode {
		d.errorf(f.pos(), f.path, "must be a string, not %s", describe(n))
		return "", false
	}
	if len(n.Value) > maxStringBytes {
		d.errorf(f.pos(), f.path, "is %d bytes long; at most %d", len(n.Value), maxStringBytes)
		return "", false
	}
	return n.Value, true
}

// Bounds on strings: every value ends up in logs, metric labels or the
// kernel, where a megabyte-long name would be printed in every line.
const (
	maxStringBytes = 4096
	maxNameBytes   = 128
)

// name decodes the name of a service, chain, hop or node: a string of at
// most maxNameBytes without control characters (names are log fields and
// metric label values).
func (d *decoder) name(f field) (string, bool) {
	s, ok := d.str(f)
	if !ok {
		return "", false
	}
	if len(s) > maxNameBytes {
		d.errorf(f.pos(), f.path, "name is %d bytes long; at most %d", len(s), maxNameBytes)
		return "", false
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			d.errorf(f.pos(), f.path, "name %q contains a control character", s)
			return "", false
		}
	}
	return s, true
}

// metadata decodes a metadata mapping. Keys are lower-cased, as GOST stores
// them. Keys ebpfwd reads here (known) are returned by canonical name for
// typed decoding; any other key is ignored by ebpfwd and earns a warning,
// since it most likely configures a GOST feature or is a typo.
func (d *decoder) metadata(f field, known []string) (map[string]any, fields) {
	n := f.value
	if isNull(n) {
		return nil, fields{}
	}
	if n.Kind != yaml.MappingNode {
		d.errorf(f.pos(), f.path, "must be a mapping, not %s", describe(n))
		return nil, fields{}
	}
	md := map[string]any{}
	found := fields{}
	for _, p := range d.pairs(n, f.path) {
		name := p.key.Value
		canonical := ""
		for _, k := range known {
			if strings.EqualFold(k, name) {
				canonical = k
			}
		}
		path := join(f.path, name)
		if canonical != "" {
			path = join(f.path, canonical)
		}
		v, ok := d.plainValue(p.value, path, map[*yaml.Node]bool{}, 0)
		if !ok {
			continue
		}
		md[strings.ToLower(name)] = v
		if canonical != "" {
			found[canonical] = field{key: p.key, value: p.value, path: path}
			continue
		}
		if len(known) == 0 {
			d.warnf(p.key, path, "unknown metadata key %q is ignored (ebpfwd reads no metadata here)", name)
		} else {
			d.warnf(p.key, path, "unknown metadata key %q is ignored (ebpfwd reads here: %s)%s",
				name, strings.Join(known, ", "), suggestion(name, known))
		}
	}
	return md, found
}

// maxValueDepth bounds the nesting of metadata values.
const maxValueDepth = 64

// plainValue converts a metadata value into plain Go values as yaml.v3
// would (string, int, float64, bool, nil, []any, map[string]any), charging
// every entry against the expansion budget. yaml.v3's own Decode would
// expand aliases millions of times before giving up. active holds the
// collections being converted, to catch values that contain themselves.
func (d *decoder) plainValue(n *yaml.Node, path string, active map[*yaml.Node]bool, depth int) (any, bool) {
	n = resolve(n)
	if active[n] || depth >= maxValueDepth {
		d.errorf(n, path, "the value contains itself or is nested too deeply")
		return nil, false
	}
	switch n.Kind {
	case yaml.SequenceNode:
		if !d.count(len(n.Content), n) {
			return nil, false
		}
		active[n] = true
		defer delete(active, n)
		list := make([]any, 0, len(n.Content))
		for i, item := range n.Content {
			v, ok := d.plainValue(item, path+"["+strconv.Itoa(i)+"]", active, depth+1)
			if !ok {
				return nil, false
			}
			list = append(list, v)
		}
		return list, true
	case yaml.MappingNode:
		active[n] = true
		defer delete(active, n)
		m := map[string]any{}
		for _, p := range d.mergedPairs(n, path, active) {
			v, ok := d.plainValue(p.value, join(path, p.key.Value), active, depth+1)
			if !ok {
				return nil, false
			}
			m[p.key.Value] = v
		}
		return m, true
	case yaml.ScalarNode:
		var v any
		if err := n.Decode(&v); err != nil {
			d.errorf(n, path, "cannot decode value: %s", strings.TrimPrefix(err.Error(), "yaml: "))
			return nil, false
		}
		return v, true
	}
	d.errorf(n, path, "cannot decode value: unexpected YAML node")
	return nil, false
}
