package config

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/ebpfwd/ebpfwd/selector"
)

func defaultSelector() Selector {
	return Selector{Strategy: defaultStrategy, MaxFails: defaultMaxFails, FailTimeout: defaultFailTimeout}
}

// topHops decodes the top-level hops list. Chains refer to these by name, so
// every one needs a unique name.
func (d *decoder) topHops(f field) ([]*Hop, map[string]*Hop) {
	var hops []*Hop
	byName := map[string]*Hop{}
	for _, item := range d.sequence(f) {
		fs, ok := d.fieldMapping(item, &hopSection)
		if !ok {
			continue
		}
		name, nameOK := "", true
		if nf, ok := fs["name"]; ok {
			name, nameOK = d.name(nf)
		}
		if name == "" && nameOK {
			d.errorf(item.value, join(item.path, "name"), "is required: chains refer to top-level hops by name")
		}
		h := d.hopBody(item, fs, name)
		if name != "" {
			if first, dup := byName[name]; dup {
				d.errorf(fs["name"].pos(), join(item.path, "name"), "duplicate hop name %q (first at line %d)", name, first.Pos.Line)
			} else {
				byName[name] = h
			}
		}
		hops = append(hops, h)
	}
	return hops, byName
}

// chains decodes the chains list, resolving hops that refer to top-level
// hops by name.
func (d *decoder) chains(f field, topHops map[string]*Hop) ([]*Chain, map[string]*Chain) {
	var chains []*Chain
	byName := map[string]*Chain{}
	for _, item := range d.sequence(f) {
		fs, ok := d.fieldMapping(item, &chainSection)
		if !ok {
			continue
		}
		c := &Chain{Pos: posOf(item.value)}
		nameOK := true
		if nf, ok := fs["name"]; ok {
			c.Name, nameOK = d.name(nf)
		}
		if c.Name == "" {
			if nameOK {
				d.errorf(item.value, join(item.path, "name"), "is required: handlers refer to chains by name")
			}
		} else if first, dup := byName[c.Name]; dup {
			d.errorf(fs["name"].pos(), join(item.path, "name"), "duplicate chain name %q (first at line %d)", c.Name, first.Pos.Line)
		} else {
			byName[c.Name] = c
		}
		// GOST chains may carry metadata, but none of it is read by ebpfwd;
		// decoding it still warns about every key.
		if mf, ok := fs["metadata"]; ok {
			d.metadata(mf, nil)
		}
		hf, hasHops := fs["hops"]
		var items []field
		if hasHops {
			items = d.sequence(hf)
		}
		if len(items) == 0 {
			at, path := item.value, join(item.path, "hops")
			if hasHops {
				at = hf.pos()
			}
			d.errorf(at, path, "a chain needs at least one hop")
		}
		if len(items) > 0 { // d.sequence reported anything else already
			c.Hops = decodeUnique(d, hf, "hop", func(item field, i int) (*Hop, string) {
				h := d.chainHop(item, i, topHops)
				if h == nil {
					return nil, ""
				}
				return h, h.Name
			})
		}
		chains = append(chains, c)
	}
	return chains, byName
}

// chainHop decodes one entry of a chain's hops. As in GOST, an entry without
// nodes refers to the top-level hop of the same name.
func (d *decoder) chainHop(f field, i int, topHops map[string]*Hop) *Hop {
	fs, ok := d.fieldMapping(f, &hopSection)
	if !ok {
		return nil
	}
	nf, hasNodes := fs["nodes"]
	if hasNodes && !isEmptyList(nf.value) {
		name := fmt.Sprintf("hop-%d", i)
		if nameField, ok := fs["name"]; ok {
			if s, ok := d.name(nameField); ok && s != "" {
				name = s
			}
		}
		return d.laterHopProxyProtocol(f, i, d.hopBody(f, fs, name))
	}

	nameField, hasName := fs["name"]
	name := ""
	if hasName {
		name, _ = d.str(nameField)
	}
	if name == "" {
		d.errorf(f.pos(), join(f.path, "nodes"), "a hop needs nodes, or the name of a top-level hop (hops[]) to use")
		return nil
	}
	h, found := topHops[name]
	if !found {
		d.errorf(nameField.pos(), nameField.path, "no top-level hop named %q (a hop without nodes refers to hops[] by name)%s",
			name, suggestion(name, slices.Sorted(maps.Keys(topHops))))
		return nil
	}
	for _, key := range []string{"selector", "metadata", "nodes"} {
		if other, ok := fs[key]; ok {
			d.warnf(other.key, other.path, "ignored: this hop refers to top-level hop %q, whose own settings apply", name)
		}
	}
	return d.laterHopProxyProtocol(f, i, h)
}

// laterHopProxyProtocol warns that a PROXY header is sent only to the first
// hop: as in GOST, only the first hop's node is dialed, every later one is
// reached through the tunnel and gets none.
func (d *decoder) laterHopProxyProtocol(f field, i int, h *Hop) *Hop {
	if i == 0 || h == nil {
		return h
	}
	for _, n := range h.Nodes {
		if n.ProxyProtocol > 0 {
			d.warnf(f.pos(), f.path, "proxyProtocol is sent only to the first hop's nodes (as in GOST: later hops are reached through the tunnel); ignored for hop %q", h.Name)
			break
		}
	}
	return h
}

func isEmptyList(n *yaml.Node) bool {
	return isNull(n) || (n.Kind == yaml.SequenceNode && len(n.Content) == 0)
}

// hopBody decodes a hop's selector, metadata and nodes from its fields.
func (d *decoder) hopBody(f field, fs fields, name string) *Hop {
	h := &Hop{Name: name, Selector: defaultSelector(), Pos: posOf(f.value)}
	if sf, ok := fs["selector"]; ok {
		h.Selector = d.selector(sf)
	}
	if mf, ok := fs["metadata"]; ok {
		md, known := d.metadata(mf, hopMetadataKeys)
		h.Metadata = md
		if nsf, ok := known["netns"]; ok {
			h.NetNS, _ = d.netns(nsf)
			h.NetNSPos = posOf(nsf.value)
		}
		if pf, ok := known["proxyProtocol"]; ok {
			h.ProxyProtocol, _ = d.proxyVersion(pf)
		}
	}
	nf, hasNodes := fs["nodes"]
	if hasNodes {
		h.Nodes = d.nodes(nf, true)
		for _, n := range h.Nodes {
			// GOST's hop passes its proxyProtocol to nodes without one.
			if _, own := n.Metadata["proxyprotocol"]; !own {
				n.ProxyProtocol = h.ProxyProtocol
			}
		}
	}
	if !hasNodes || isEmptyList(nf.value) {
		at := f.value
		if hasNodes {
			at = nf.pos()
		}
		d.errorf(at, join(f.path, "nodes"), "a hop needs at least one node")
	}
	return h
}

// nodes decodes a list of nodes, of a hop (proxies) or of a forwarder
// (targets). Names default to node-<i> and must be unique in the list.
func (d *decoder) nodes(f field, inHop bool) []*Node {
	return decodeUnique(d, f, "node", func(item field, i int) (*Node, string) {
		n := d.node(item, i, inHop)
		if n == nil {
			return nil, ""
		}
		return n, n.Name
	})
}

func (d *decoder) node(f field, i int, inHop bool) *Node {
	s := &forwardNodeSection
	if inHop {
		s = &hopNodeSection
	}
	fs, ok := d.fieldMapping(f, s)
	if !ok {
		return nil
	}
	n := &Node{Name: fmt.Sprintf("node-%d", i), Pos: posOf(f.value)}
	if nf, ok := fs["name"]; ok {
		if name, ok := d.name(nf); ok && name != "" {
			n.Name = name
		}
	}
	if af, ok := fs["addr"]; ok {
		n.Addr, n.IP, _ = d.addr(af, dialAddr)
	} else {
		d.errorf(f.value, join(f.path, "addr"), "is required (host:port)")
	}
	if inHop {
		n.Connector = Connector{Type: connectorTypes[0]}
		if cf, ok := fs["connector"]; ok {
			n.Connector = d.connector(cf)
		}
		n.Dialer = Dialer{Type: dialerTypes[0]}
		if df, ok := fs["dialer"]; ok {
			n.Dialer = d.dialer(df)
		}
	}
	if mf, ok := fs["metadata"]; ok {
		md, known := d.metadata(mf, nodeMetadataKeys)
		n.Metadata = md
		if nsf, ok := known["netns"]; ok {
			n.NetNS, _ = d.netns(nsf)
			n.NetNSPos = posOf(nsf.value)
		}
		if pf, ok := known["proxyProtocol"]; ok {
			n.ProxyProtocol, _ = d.proxyVersion(pf)
			if !inHop && n.ProxyProtocol > 0 {
				// GOST reaches forward targets through the service's
				// router: a target's own dialer option is never used.
				d.warnf(pf.key, pf.path, "a forward node's proxyProtocol sends nothing (GOST's neither): set handler.metadata.proxyProtocol to send a PROXY header to the nodes; ignored")
				n.ProxyProtocol = 0
			}
		}
	}
	return n
}

// connector decodes a hop node's connector; the type defaults to http.
func (d *decoder) connector(f field) Connector {
	c := Connector{Type: connectorTypes[0]}
	fs, ok := d.fieldMapping(f, &connectorSection)
	if !ok {
		return c
	}
	c.Type = d.sectionType(fs, connectorTypes, c.Type)
	if af, ok := fs["auth"]; ok {
		c.Auth = d.auth(af)
	}
	if mf, ok := fs["metadata"]; ok {
		c.Metadata, _ = d.metadata(mf, nil)
	}
	return c
}

// dialer decodes a hop node's dialer; the type defaults to tcp.
func (d *decoder) dialer(f field) Dialer {
	dl := Dialer{Type: dialerTypes[0]}
	fs, ok := d.fieldMapping(f, &dialerSection)
	if !ok {
		return dl
	}
	dl.Type = d.sectionType(fs, dialerTypes, dl.Type)
	if mf, ok := fs["metadata"]; ok {
		dl.Metadata, _ = d.metadata(mf, nil)
	}
	return dl
}

// auth decodes a username/password pair; null means no authentication.
func (d *decoder) auth(f field) *Auth {
	if isNull(f.value) {
		return nil
	}
	fs, ok := d.fieldMapping(f, &authSection)
	if !ok {
		return nil
	}
	a := &Auth{}
	if uf, ok := fs["username"]; ok {
		a.Username, _ = d.str(uf)
	}
	if pf, ok := fs["password"]; ok {
		a.Password, _ = d.str(pf)
	}
	if a.Username == "" {
		d.errorf(f.pos(), join(f.path, "username"), "is required when auth is set")
	}
	return a
}

// selector decodes a node selector. Like GOST, it treats a maxFails or
// failTimeout of 0 as "use the default"; unlike GOST, an unknown strategy is
// an error instead of silently meaning round-robin.
func (d *decoder) selector(f field) Selector {
	s := defaultSelector()
	fs, ok := d.fieldMapping(f, &selectorSection)
	if !ok {
		return s
	}
	if sf, ok := fs["strategy"]; ok {
		if v, ok := d.str(sf); ok && v != "" {
			v = strings.ToLower(v) // GOST's strategy names are matched in any case
			if alias, isAlias := selectorStrategyAliases[v]; isAlias {
				v = alias
			}
			if slices.Contains(selectorStrategies, v) {
				s.Strategy = selector.Strategy(v)
			} else {
				d.errorf(sf.pos(), sf.path, "%s", oneOf(v, selectorStrategies))
			}
		}
	}
	if mf, ok := fs["maxFails"]; ok {
		if v, ok := d.integer(mf); ok {
			switch {
			case v < 0:
				d.errorf(mf.pos(), mf.path, "must not be negative (0 means the default, %d)", defaultMaxFails)
			case v > 0:
				s.MaxFails = v
			}
		}
	}
	if tf, ok := fs["failTimeout"]; ok {
		if v, ok := d.duration(tf); ok && v > 0 {
			s.FailTimeout = v
		}
	}
	return s
}

// sectionType decodes a section's optional `type`: one of allowed (else an
// error naming them); absent or empty, it stays def.
func (d *decoder) sectionType(fs fields, allowed []string, def string) string {
	tf, ok := fs["type"]
	if !ok {
		return def
	}
	t, ok := d.str(tf)
	switch {
	case !ok || t == "":
		return def
	case slices.Contains(allowed, t):
		return t
	}
	d.errorf(tf.pos(), tf.path, "%s", unsupportedType(t, allowed))
	return def
}
