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
func (d *decoder) services(f field, chains map[string]*Chain, limiters [3]map[string]*Limiter) []*Service {
	if isNull(f.value) || (f.value.Kind == yaml.SequenceNode && len(f.value.Content) == 0) {
		d.errorf(f.pos(), f.path, "no services: the list is empty")
		return nil
	}
	return decodeUnique(d, f, "service", func(item field, i int) (*Service, string) {
		svc := d.service(item, i, chains, limiters)
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

func (d *decoder) service(f field, i int, chains map[string]*Chain, limiters [3]map[string]*Limiter) *Service {
	fs, ok := d.fieldMapping(f, &serviceSection)
	if !ok {
		return nil
	}
	svc := &Service{Name: fmt.Sprintf("service-%d", i), Datapath: defaultDatapath, HealthCheck: HealthPassive, Pos: posOf(f.value)}
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
	var hfs, hmd fields
	if hasHandler && !isNull(hf.value) {
		svc.Handler, hfs, hmd = d.handler(hf)
	} else {
		d.errorf(f.pos(), join(f.path, "handler"), "is required (handler.type: %s)", joinList(handlerTypes))
	}

	var lfs, lmd fields
	if lf, ok := fs["listener"]; ok {
		svc.Listener, lfs, lmd = d.listener(lf)
	}

	ff, hasForwarder := fs["forwarder"]
	var ffs fields
	if hasForwarder && !isNull(ff.value) {
		svc.Forwarder, ffs = d.forwarder(ff)
	}

	for _, kind := range []LimiterKind{TrafficLimiter, ConnLimiter, RateLimiter} {
		if lf, ok := fs[kind.Key()]; ok {
			svc.Limits.set(kind, d.serviceLimiter(lf, kind, limiters[kind]))
		}
	}

	var trafficAt *field // where a bandwidth limit was asked for
	if lf, ok := fs["limiter"]; ok {
		trafficAt = &lf
	}
	var smd fields
	if mf, ok := fs["metadata"]; ok {
		var md map[string]any
		md, smd = d.metadata(mf, serviceMetadataKeys)
		svc.Metadata = md
		d.serviceMetadata(svc, smd, legacyNS, hasLegacyNS)
		for _, key := range limiterMetadataKeys[:4] {
			if kf, ok := smd[key]; ok && trafficAt == nil {
				trafficAt = &kf
			}
		}
		d.metadataLimits(svc, smd)
		for _, key := range []string{"limiter.refreshInterval", "limiter.scope"} {
			if kf, ok := smd[key]; ok {
				d.warnf(kf.key, kf.path, "has no effect: it configures limiter plugins and reloaded limit sources, which ebpfwd does not support; inline limits apply as written")
			}
		}
	}

	if svc.Listener.Type == "udp" || (svc.Listener.Type == "" && svc.Handler.Type == "udp") {
		if svc.Limits.Traffic != nil && trafficAt != nil {
			// A datagram cannot wait for tokens the way a stream's bytes
			// can: GOST's UDP limiter blocks the session's reads, which
			// holds every datagram behind it.
			d.errorf(trafficAt.pos(), trafficAt.path, "bandwidth limits apply to TCP services only (this is a udp service); climiter and rlimiter bound its sessions")
		}
	}
	d.checkServiceCombination(f, svc, serviceParts{
		handler: hfs, listener: lfs, forwarder: ffs,
		metadata: smd, handlerMetadata: hmd, listenerMetadata: lmd,
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
	if hf, ok := known["healthCheck"]; ok {
		if hc, ok := d.str(hf); ok {
			if hc = strings.ToLower(hc); slices.Contains(healthChecks, hc) {
				svc.HealthCheck = hc
			} else {
				d.errorf(hf.pos(), hf.path, "%s", oneOf(hc, healthChecks))
			}
		}
	}
	if mf, ok := known["maxStreams"]; ok {
		if n, ok := d.integer(mf); ok {
			if n < 1 {
				// 0 would read as "no connection at all", which no one
				// configures on purpose; leaving the key out is how to
				// take the whole budget share.
				d.errorf(mf.pos(), mf.path, "must be at least 1, not %d (leave it out to use the service's whole fd budget share)", n)
			} else {
				svc.MaxStreams = n
			}
		}
	}
	if pf, ok := known["proxyProtocol"]; ok {
		svc.ProxyProtocol, _ = d.proxyVersion(pf)
	}
}

// serviceParts carries the decoded key sets of a service's sections, so
// cross-section checks can point at the exact key at fault.
type serviceParts struct {
	handler, listener, forwarder fields
	// The metadata keys ebpfwd reads, as given, of the service, its
	// handler and its listener.
	metadata, handlerMetadata, listenerMetadata fields
	forwarderField                              field
	hasForwarder                                bool
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
	d.checkStreamAndDatagramKeys(svc, parts)

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

// checkStreamAndDatagramKeys refuses or warns about the keys that belong
// to one kind of listener or handler given to the other, as GOST would
// ignore them (warning) or as ebpfwd cannot do them (error).
func (d *decoder) checkStreamAndDatagramKeys(svc *Service, parts serviceParts) {
	if svc.Listener.Type == "tcp" {
		for _, k := range []string{"ttl", "keepalive.ttl", "keepAlive", "readBufferSize", "udp.bufferSize"} {
			if kf, ok := parts.listenerMetadata[k]; ok {
				d.warnf(kf.key, kf.path, "%s applies only to udp listeners; ignored", k)
			}
		}
		svc.Listener.TTL, svc.Listener.KeepAlive, svc.Listener.ReadBufferSize = 0, false, 0
	}
	if pf, ok := parts.metadata["proxyProtocol"]; ok && svc.Listener.Type == "udp" {
		d.warnf(pf.key, pf.path, "a udp listener reads no PROXY protocol header (GOST's neither); ignored")
		svc.ProxyProtocol = 0
	}
	if pf, ok := parts.handlerMetadata["proxyProtocol"]; ok && svc.Handler.ProxyProtocol > 0 {
		switch svc.Handler.Type {
		case "udp":
			d.errorf(pf.pos(), pf.path, "a udp handler cannot send a PROXY protocol header: it is a TCP stream's preamble, and ebpfwd would have to send it as a datagram of its own, which UDP receivers do not expect")
		case "http":
			d.warnf(pf.key, pf.path, "the http handler sends no PROXY protocol header (GOST's neither): set proxyProtocol on the chain's hop to send one to a proxy; ignored")
			svc.Handler.ProxyProtocol = 0
		}
	}
	for _, k := range []string{"readBufferSize", "udp.bufferSize"} {
		if kf, ok := parts.handlerMetadata[k]; ok {
			d.warnf(kf.key, kf.path, "GOST's forward handler sizes with %s only the datagram it sniffs (sniffing) or forwards statelessly (stateless), which ebpfwd does not do; ignored (the listener's readBufferSize limits datagrams)", k)
		}
	}
}

// handler decodes a service's handler section; md are the metadata keys
// ebpfwd reads, as given.
func (d *decoder) handler(f field) (h Handler, fs, md fields) {
	fs, ok := d.fieldMapping(f, &handlerSection)
	if !ok {
		return h, nil, nil
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
		known := handlerMetadataKeys
		if h.Type == "http" {
			known = append(slices.Clone(known), httpHandlerMetadataKeys...)
		}
		h.Metadata, md = d.metadata(mf, known)
		if pf, ok := md["proxyProtocol"]; ok {
			h.ProxyProtocol, _ = d.proxyVersion(pf)
		}
		h.HTTP = d.httpHandlerMetadata(md)
		for _, k := range httpHandlerMetadataKeys {
			if v, ok := md[k]; ok {
				fs["metadata."+k] = v // for the checks of the service
			}
		}
	}
	return h, fs, md
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
// md are the metadata keys ebpfwd reads, as given, for checks that need
// the final listener type.
func (d *decoder) listener(f field) (l Listener, fs, md fields) {
	fs, ok := d.fieldMapping(f, &listenerSection)
	if !ok {
		return l, nil, nil
	}
	l.Type = d.sectionType(fs, listenerTypes, l.Type)
	if mf, ok := fs["metadata"]; ok {
		l.Metadata, md = d.metadata(mf, listenerMetadataKeys)
		if tf, ok := d.firstOf(md, "ttl", "keepalive.ttl"); ok {
			l.TTL, _ = d.duration(tf)
		}
		if kf, ok := md["keepAlive"]; ok {
			l.KeepAlive, _ = d.boolean(kf)
		}
		if bf, ok := d.firstOf(md, "readBufferSize", "udp.bufferSize"); ok {
			l.ReadBufferSize, _ = d.bufferSize(bf)
		}
	}
	return l, fs, md
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
