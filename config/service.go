package config

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

func posOf(n *yaml.Node) Pos { return Pos{Line: n.Line, Column: n.Column} }

// services decodes the services list; an empty one is an error because
// ebpfwd would have nothing to do.
func (d *decoder) services(f field, chains map[string]*Chain) []*Service {
	if isNull(f.value) || (f.value.Kind == yaml.SequenceNode && len(f.value.Content) == 0) {
		d.errorf(f.pos(), f.path, "no services: the list is empty")
		return nil
	}
	return decodeUnique(d, f, "service", func(item field, i int) (*Service, string) {
		svc := d.service(item, i, chains)
		if svc == nil {
			return nil, ""
		}
		return svc, svc.Name
	})
}

// decodeUnique decodes every item of a list with decode, which returns nil
// for an item it could not decode (having reported why), and reports a name
// used twice at the later item: "duplicate KIND name".
func decodeUnique[T any](d *decoder, f field, kind string, decode func(item field, i int) (*T, string)) []*T {
	var out []*T
	first := map[string]int{} // name -> line of its first item
	for i, item := range d.sequence(f) {
		v, name := decode(item, i)
		if v == nil {
			continue
		}
		if line, dup := first[name]; dup {
			d.errorf(item.value, join(item.path, "name"), "duplicate %s name %q (first at line %d)", kind, name, line)
		} else {
			first[name] = item.value.Line
		}
		out = append(out, v)
	}
	return out
}

func (d *decoder) service(f field, i int, chains map[string]*Chain) *Service {
	fs, ok := d.fieldMapping(f, &serviceSection)
	if !ok {
		return nil
	}
	svc := &Service{Name: fmt.Sprintf("service-%d", i), Datapath: defaultDatapath, Pos: posOf(f.value)}
	if nf, ok := fs["name"]; ok {
		if name, ok := d.name(nf); ok && name != "" {
			svc.Name = name
		}
	}
	if af, ok := fs["addr"]; ok {
		svc.Addr, svc.Listen, _ = d.addr(af, listenAddr)
	} else {
		d.errorf(f.value, join(f.path, "addr"), "is required (the host:port to listen on, e.g. \":8080\")")
	}
	legacyNS, hasLegacyNS := fs["netns"]
	if hasLegacyNS {
		d.warnf(legacyNS.key, legacyNS.path, "the service-level netns field is deprecated; write it as metadata.netns")
		svc.NetNS, _ = d.netns(legacyNS)
		svc.NetNSPos = posOf(legacyNS.value)
	}

	hf, hasHandler := fs["handler"]
	var hfs fields
	if hasHandler && !isNull(hf.value) {
		svc.Handler, hfs = d.handler(hf)
	} else {
		d.errorf(f.pos(), join(f.path, "handler"), "is required (handler.type: %s)", joinList(handlerTypes))
	}

	var lfs fields
	var ttl *field
	if lf, ok := fs["listener"]; ok {
		svc.Listener, lfs, ttl = d.listener(lf)
	}

	ff, hasForwarder := fs["forwarder"]
	var ffs fields
	if hasForwarder && !isNull(ff.value) {
		svc.Forwarder, ffs = d.forwarder(ff)
	}

	if mf, ok := fs["metadata"]; ok {
		md, known := d.metadata(mf, serviceMetadataKeys)
		svc.Metadata = md
		d.serviceMetadata(svc, known, legacyNS, hasLegacyNS)
	}

	d.checkServiceCombination(f, svc, serviceParts{
		handler: hfs, listener: lfs, forwarder: ffs, ttl: ttl,
		forwarderField: ff, hasForwarder: hasForwarder && !isNull(ff.value),
	}, chains)
	return svc
}

// serviceMetadata applies the service metadata keys ebpfwd reads.
func (d *decoder) serviceMetadata(svc *Service, known fields, legacyNS field, hasLegacyNS bool) {
	if nf, ok := known["netns"]; ok {
		if ns, ok := d.netns(nf); ok {
			if hasLegacyNS && !svc.NetNS.IsOwn() && svc.NetNS != ns {
				d.errorf(nf.pos(), nf.path, "conflicts with the service-level netns %q at line %d; set the namespace once", svc.NetNS.String(), legacyNS.value.Line)
			}
			svc.NetNS, svc.NetNSPos = ns, posOf(nf.value)
		}
	}
	if of, ok := known["netns.out"]; ok {
		svc.NetNSOut, _ = d.netns(of)
		svc.NetNSOutPos = posOf(of.value)
	}
	if df, ok := known["datapath"]; ok {
		if dp, ok := d.str(df); ok {
			switch dp = strings.ToLower(dp); {
			case slices.Contains(datapathKinds, dp):
				svc.Datapath = dp
			case dp == "sockmap":
				d.errorf(df.pos(), df.path, "datapath sockmap is not built yet (available: %s)", joinList(datapathKinds))
			default:
				d.errorf(df.pos(), df.path, "%s", oneOf(dp, datapathKinds))
			}
		}
	}
	if tf, ok := known["idleTimeout"]; ok {
		svc.IdleTimeout, _ = d.duration(tf)
	}
}

// serviceParts carries the decoded key sets of a service's sections, so
// cross-section checks can point at the exact key at fault.
type serviceParts struct {
	handler, listener, forwarder fields
	ttl                          *field // listener metadata ttl, when given
	forwarderField               field
	hasForwarder                 bool
}

// checkServiceCombination enforces which handler, listener, forwarder and
// chain settings make sense together.
func (d *decoder) checkServiceCombination(f field, svc *Service, parts serviceParts, chains map[string]*Chain) {
	handlerType := svc.Handler.Type
	if handlerType == "" {
		return // already reported; every check below depends on it
	}

	wantListener := "tcp"
	if handlerType == "udp" {
		wantListener = "udp"
	}
	if svc.Listener.Type == "" {
		svc.Listener.Type = wantListener
	} else if svc.Listener.Type != wantListener {
		tf := parts.listener["type"]
		d.errorf(tf.pos(), tf.path, "listener type %q cannot carry handler type %q (use listener type %q)", svc.Listener.Type, handlerType, wantListener)
	}
	if svc.Listener.Type == "udp" && svc.Listener.TTL == 0 {
		svc.Listener.TTL = defaultUDPTTL
	}
	if ttl := parts.ttl; ttl != nil && svc.Listener.Type == "tcp" {
		d.warnf(ttl.key, ttl.path, "ttl applies only to udp listeners; ignored")
		svc.Listener.TTL = 0
	}

	switch handlerType {
	case "tcp", "udp":
		if svc.Forwarder == nil || len(svc.Forwarder.Nodes) == 0 {
			at, path := f.pos(), join(f.path, "forwarder.nodes")
			if nf, ok := parts.forwarder["nodes"]; ok {
				at = nf.pos()
			} else if parts.hasForwarder {
				at = parts.forwarderField.pos()
			}
			d.errorf(at, path, "handler type %q needs at least one forwarder node to send traffic to", handlerType)
		}
	case "http":
		if svc.Handler.Auth == nil && !svc.Handler.HTTP.AllowOpenProxy && !(svc.Listen.IsValid() && svc.Listen.Addr().IsLoopback()) {
			at, path := f.pos(), join(f.path, "handler.auth")
			if af, ok := parts.handler["metadata.allowOpenProxy"]; ok {
				at, path = af.pos(), af.path
			} else if tf, ok := parts.handler["type"]; ok {
				at = tf.pos()
			}
			d.errorf(at, path, "an http handler without auth that listens on %s is an open proxy into everything netns.out reaches, loopback included: set handler.auth, listen on a loopback address, or set handler.metadata.allowOpenProxy: true", svc.Addr)
		}
		if parts.hasForwarder {
			d.warnf(parts.forwarderField.key, parts.forwarderField.path, "an http handler connects to the address each client asks for; forwarder is ignored")
		}
	}

	if af, ok := parts.handler["auth"]; ok && handlerType != "http" {
		d.warnf(af.key, af.path, "auth only applies to the http handler; ignored for handler type %q", handlerType)
	}

	if chain := svc.Handler.Chain; chain != "" {
		cf := parts.handler["chain"]
		if _, ok := chains[chain]; !ok {
			d.errorf(cf.pos(), cf.path, "unknown chain %q%s", chain, suggestion(chain, slices.Sorted(maps.Keys(chains))))
		}
		if handlerType == "udp" {
			d.errorf(cf.pos(), cf.path, "a udp service cannot use a chain: hops are reached with HTTP CONNECT, which carries only TCP")
		}
	}
}

// handler decodes a service's handler section.
func (d *decoder) handler(f field) (Handler, fields) {
	var h Handler
	fs, ok := d.fieldMapping(f, &handlerSection)
	if !ok {
		return h, nil
	}
	if tf, ok := fs["type"]; ok {
		if t, ok := d.str(tf); ok {
			switch {
			case t == "":
				d.errorf(tf.pos(), tf.path, "must not be empty (supported: %s)", joinList(handlerTypes))
			case slices.Contains(handlerTypes, t):
				h.Type = t
			default:
				d.errorf(tf.pos(), tf.path, "%s", unsupportedType(t, handlerTypes))
			}
		}
	} else {
		d.errorf(f.pos(), join(f.path, "type"), "is required (supported: %s)", joinList(handlerTypes))
	}
	if cf, ok := fs["chain"]; ok {
		h.Chain, _ = d.str(cf)
	}
	if af, ok := fs["auth"]; ok {
		h.Auth = d.auth(af)
	}
	if mf, ok := fs["metadata"]; ok {
		var known []string
		if h.Type == "http" {
			known = httpHandlerMetadataKeys
		}
		var kfs fields
		h.Metadata, kfs = d.metadata(mf, known)
		h.HTTP = d.httpHandlerMetadata(kfs)
		for k, v := range kfs {
			fs["metadata."+k] = v // for the checks of the service
		}
	}
	return h, fs
}

// httpHandlerMetadata decodes ebpfwd's own metadata keys of an http
// handler.
func (d *decoder) httpHandlerMetadata(known fields) HTTPHandler {
	var h HTTPHandler
	if f, ok := known["allowOpenProxy"]; ok {
		if f.value.Kind == yaml.ScalarNode && f.value.ShortTag() == "!!bool" {
			_ = f.value.Decode(&h.AllowOpenProxy)
		} else {
			d.errorf(f.pos(), f.path, "must be true or false, not %s", quoteValue(f.value))
		}
	}
	if f, ok := known["maxClients"]; ok {
		if n, ok := d.integer(f); ok && n < 0 {
			d.errorf(f.pos(), f.path, "must not be negative (0 means no cap)")
		} else {
			h.MaxClients = n
		}
	}
	if f, ok := known["headerTimeout"]; ok {
		h.HeaderTimeout, _ = d.duration(f)
	}
	return h
}

// listener decodes a service's listener section. An empty type is filled
// in from the handler later, as GOST does when the listener is omitted.
// ttl is the metadata ttl field when given, for checks that need the final
// listener type.
func (d *decoder) listener(f field) (l Listener, fs fields, ttl *field) {
	fs, ok := d.fieldMapping(f, &listenerSection)
	if !ok {
		return l, nil, nil
	}
	l.Type = d.sectionType(fs, listenerTypes, l.Type)
	if mf, ok := fs["metadata"]; ok {
		md, known := d.metadata(mf, listenerMetadataKeys)
		l.Metadata = md
		if tf, ok := known["ttl"]; ok {
			ttl = &tf
			l.TTL, _ = d.duration(tf)
		}
	}
	return l, fs, ttl
}

// forwarder decodes a service's forwarder section.
func (d *decoder) forwarder(f field) (*Forwarder, fields) {
	fw := &Forwarder{Selector: defaultSelector()}
	fs, ok := d.fieldMapping(f, &forwarderSection)
	if !ok {
		return fw, nil
	}
	if nf, ok := fs["name"]; ok {
		d.warnf(nf.key, nf.path, "forwarder.name is deprecated in GOST and has no effect; ignored")
	}
	if sf, ok := fs["selector"]; ok {
		fw.Selector = d.selector(sf)
	}
	if nf, ok := fs["nodes"]; ok {
		fw.Nodes = d.nodes(nf, false)
	}
	if tf, ok := fs["targets"]; ok {
		if _, both := fs["nodes"]; both {
			d.errorf(tf.pos(), tf.path, "give the forwarder nodes or its targets (GOST's older spelling), not both")
		} else {
			fw.Nodes = d.targets(tf)
			// The checks of the service look for nodes at the key
			// that gave them.
			fs["nodes"] = tf
		}
	}
	return fw, fs
}

// targets decodes GOST's older `forwarder.targets`: a list of addresses,
// each a node named target-N, as GOST names them.
func (d *decoder) targets(f field) []*Node {
	var nodes []*Node
	for i, item := range d.sequence(f) {
		if addr, ip, ok := d.addr(item, dialAddr); ok {
			nodes = append(nodes, &Node{Name: fmt.Sprintf("target-%d", i), Addr: addr, IP: ip, Pos: posOf(item.value)})
		}
	}
	return nodes
}

// joinList formats a set of values for messages: "tcp, udp, http".
func joinList(list []string) string { return strings.Join(list, ", ") }
