// Package config loads and validates ebpfwd's configuration, which is a GOST v3
// YAML file (services, chains, hops, log, metrics).
//
// The package only checks syntax and meaning; it never opens sockets,
// namespaces or BPF objects. It decodes through yaml.Node so that every
// problem carries the file, line and column it came from, and it collects all
// problems of a file instead of stopping at the first one.
//
// GOST's keys keep GOST's meaning. Parts of GOST that ebpfwd does not
// implement are errors rather than being silently ignored, because ignoring
// them (a bypass list, a limiter, a TLS listener...) would change how traffic
// is handled. Keys GOST reads case-insensitively (it loads through viper) are
// matched case-insensitively here too.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/selector"
)

// Config is a validated ebpfwd configuration with all defaults applied.
type Config struct {
	Path     string // file it was loaded from
	Services []*Service
	Chains   []*Chain // hops referenced by name are already resolved into Chain.Hops
	Hops     []*Hop   // top-level hops as written
	// Limiters are the limiters, climiters and rlimiters sections, in
	// that order, as written.
	Limiters []*Limiter
	Log      Log
	Metrics  Metrics
}

// Pos is where an element starts in the configuration file (1-based).
type Pos struct{ Line, Column int }

// Service is one listening address and what is done with its traffic.
type Service struct {
	Name string
	// Addr is the listen address as written; Listen is the same address
	// when its host is an IP literal (the zero AddrPort otherwise).
	Addr      string
	Listen    netip.AddrPort
	Handler   Handler
	Listener  Listener
	Forwarder *Forwarder // nil when absent
	Metadata  map[string]any
	// NetNS is the effective listen namespace: metadata "netns", else the
	// deprecated service-level `netns` field; the zero NS is the daemon's
	// own.
	NetNS netns.NS
	// NetNSOut is metadata "netns.out": the namespace nodes are dialed from;
	// the zero NS is the daemon's own.
	NetNSOut netns.NS
	// Where the namespaces were given (zero when they were not), so that
	// a namespace that cannot be opened is reported at its key.
	NetNSPos, NetNSOutPos Pos
	// Datapath is ebpfwd's own metadata key "datapath":
	// "auto" (default), "tc", "sockmap" or "userspace".
	Datapath string
	// IdleTimeout is ebpfwd's own metadata key "idleTimeout": how long a TCP
	// stream may stay silent in both directions before it is closed (the
	// relay) or forgotten (a kernel flow); 0, the default, means never, on
	// every datapath.
	IdleTimeout time.Duration
	// HealthCheck is ebpfwd's own metadata key "healthCheck": how a
	// datapath that picks nodes in the kernel (tc) learns that a node is
	// down: HealthPassive (the default) from the service's own flows,
	// HealthProbe from active probes as well.
	HealthCheck string
	// MaxStreams is ebpfwd's own metadata key "maxStreams": the most TCP
	// streams (tcp, http handlers) or UDP sessions (udp) the service
	// holds at once; 0, the default, means its whole share of the
	// daemon's file descriptor budget, which also caps a larger value.
	MaxStreams int
	// Limits are the service's limiter, climiter and rlimiter (GOST's
	// keys), or the limits its metadata asks for (GOST's command-line
	// options limiter.in, climiter...).
	Limits Limits
	// ProxyProtocol is GOST's service metadata "proxyProtocol" (1 or 2; 0
	// off): every connection must open with a PROXY protocol header (of
	// either version), whose source address is then the client's.
	ProxyProtocol int
	Pos           Pos
}

// Handler says how a service treats accepted traffic.
type Handler struct {
	Type  string // tcp, udp or http
	Chain string // name of the chain traffic leaves through; "" = direct
	Auth  *Auth  // proxy authentication (http only)
	// ProxyProtocol is handler metadata "proxyProtocol" (tcp handler): the
	// PROXY protocol version (1 or 2; 0 none) sent to the node before the
	// client's bytes, as GOST's forward handler does.
	ProxyProtocol int
	Metadata      map[string]any
	// HTTP is ebpfwd's own handler metadata for handler type http.
	HTTP HTTPHandler
}

// HTTPHandler holds the ebpfwd metadata keys of an http handler.
type HTTPHandler struct {
	// AllowOpenProxy is "allowOpenProxy": run without auth on an address
	// other than loopback. Without it such a service is refused.
	AllowOpenProxy bool
	// MaxClients is "maxClients": connections served at once (tunnels
	// included); a client beyond it is answered 503. 0 means no cap.
	MaxClients int
	// HeaderTimeout is "headerTimeout": how long a client has from
	// connecting to send its request header; 0 means the default (10s).
	HeaderTimeout time.Duration
}

// Listener says how a service accepts traffic.
type Listener struct {
	Type string // tcp or udp
	// TTL is listener metadata "ttl": how long a UDP session may stay idle
	// before it expires (GOST's meaning). It defaults to 5s for udp listeners
	// and is 0 for tcp listeners, where it has no meaning.
	TTL time.Duration
	// KeepAlive is listener metadata "keepAlive" (udp): a session lives on
	// after it answered the client, until TTL without traffic. False, GOST's
	// default, ends a session with its first reply.
	KeepAlive bool
	// ReadBufferSize is listener metadata "readBufferSize" (udp): the
	// largest client datagram passed on, longer ones cut to it (GOST's
	// meaning); 0 means whole datagrams.
	ReadBufferSize int
	Metadata       map[string]any
}

// Forwarder lists the targets a tcp or udp service forwards to.
type Forwarder struct {
	Nodes    []*Node
	Selector Selector
}

// Selector chooses among nodes (or hops) and takes failing ones out of the
// rotation for a while.
type Selector struct {
	Strategy    selector.Strategy // round, rand, fifo or hash; default round
	MaxFails    int               // failures before a node is skipped; default 1
	FailTimeout time.Duration     // how long a failed node is skipped; default 10s
}

// Chain is a named sequence of proxy hops traffic passes through.
type Chain struct {
	Name string
	Hops []*Hop
	Pos  Pos
}

// Hop is one step of a chain: a group of equivalent proxy nodes.
type Hop struct {
	Name     string
	Selector Selector
	NetNS    netns.NS // metadata "netns": namespace the hop's nodes are dialed from
	NetNSPos Pos      // where it was given
	// ProxyProtocol is hop metadata "proxyProtocol": the PROXY protocol
	// version sent to this hop's nodes when it is the first hop (GOST's
	// dialer option); a node's own setting wins.
	ProxyProtocol int
	Nodes         []*Node
	Metadata      map[string]any
	Pos           Pos
}

// Node is a forward target (in Forwarder) or a proxy (in a Hop).
//
// Connector and Dialer are set only for nodes of a hop: GOST's forward
// targets have neither, so they are left zero there.
type Node struct {
	Name string
	// Addr is host:port as written (the host may be a name); IP is the
	// same address when its host is an IP literal (zero otherwise).
	Addr      string
	IP        netip.AddrPort
	Connector Connector // type defaults to "http" (GOST's default) in hops
	Dialer    Dialer    // type defaults to "tcp" in hops
	NetNS     netns.NS  // node metadata "netns" (overrides the hop's)
	NetNSPos  Pos       // where it was given
	// ProxyProtocol is the PROXY protocol version sent to a hop node when
	// its hop is the first (0 none): node metadata "proxyProtocol", else
	// the hop's, as GOST's hop passes its own to nodes without one.
	ProxyProtocol int
	Metadata      map[string]any
	Pos           Pos
}

// Connector is the protocol spoken to a proxy node.
type Connector struct {
	Type     string
	Auth     *Auth
	Metadata map[string]any
}

// Dialer is how the connection to a proxy node is made.
type Dialer struct {
	Type     string
	Metadata map[string]any
}

// Auth is a username and password pair.
type Auth struct {
	Username, Password string
}

// Log configures the daemon's own logging.
type Log struct {
	Level  string // debug, info, warn or error; default info
	Format string // text or json; default text
	Output string // stderr (default), stdout, none, or a file path
}

// Metrics configures the Prometheus endpoint. Addr "" means disabled.
type Metrics struct {
	Addr string
	Path string // default /metrics
	Auth *Auth
}

// Values of a service's healthCheck metadata (ebpfwd's own key).
const (
	// HealthPassive judges nodes only by the service's own flows: a
	// kernel datapath counts each node's refused, unreachable and
	// unanswered new flows; nothing is sent to a node that no client sent.
	HealthPassive = "passive"
	// HealthProbe adds active probes: a connect (TCP) or an empty
	// datagram (UDP) to every node every 2s, for nodes that fail in ways
	// flows do not show.
	HealthProbe = "probe"
)

// Defaults that GOST applies when a key is absent.
const (
	defaultStrategy    = selector.Round
	defaultMaxFails    = 1
	defaultFailTimeout = 10 * time.Second
	defaultUDPTTL      = 5 * time.Second
	defaultDatapath    = "auto"
	defaultMetricsPath = "/metrics"
)

// Load reads the file at path and parses it; see Parse.
func Load(path string) (*Config, []Diagnostic, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config %s: %w", path, err)
	}
	return Parse(path, data)
}

// ParseEnv is Parse with the environment variables that ${NAME} expands
// to (see env.go) taken from env instead of the process's environment.
func ParseEnv(path string, data []byte, env Env) (*Config, []Diagnostic, error) {
	cfg, warns, err := parse(path, data, env)
	if err != nil {
		return nil, warns, err
	}
	return cfg, warns, nil
}

// Parse decodes and validates a GOST v3 YAML configuration. path is only
// used to label diagnostics and Config.Path.
//
// ${NAME} in a value expands to the process's environment variable NAME
// (env.go; ParseEnv takes the variables from elsewhere).
//
// Warnings (things that are ignored but probably meant something) are
// returned in every case. When the configuration is invalid, the config is
// nil and the error is an *Errors listing every problem found.
func Parse(path string, data []byte) (*Config, []Diagnostic, error) {
	return ParseEnv(path, data, os.LookupEnv)
}

// parse decodes and validates data. When the configuration is invalid it
// returns what could be decoded along with the *Errors (see Inspect).
func parse(path string, data []byte, env Env) (*Config, []Diagnostic, error) {
	d := &decoder{file: path, env: env}
	root := d.document(data)
	d.expandEnv(root, data)
	cfg := d.config(root)
	cfg.Path = path
	sortDiagnostics(d.warns)
	if len(d.errs) > 0 {
		sortDiagnostics(d.errs)
		return cfg, d.warns, &Errors{List: d.errs}
	}
	return cfg, d.warns, nil
}

// yamlLineError matches the "yaml: line N: message" form yaml.v3 uses for
// syntax errors.
var yamlLineError = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// document parses data into its root node. It returns nil for an empty
// document (or after reporting a syntax error).
func (d *decoder) document(data []byte) *yaml.Node {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if !errors.Is(err, io.EOF) {
			d.syntaxError(data, err)
		}
		return nil
	}
	// GOST reads one document; a second one would be silently dropped.
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case err == nil:
		d.errorf(&next, "", "the file holds more than one YAML document; ebpfwd reads exactly one")
	case !errors.Is(err, io.EOF):
		d.syntaxError(data, err)
	}
	if doc.Kind == yaml.DocumentNode && len(doc.Content) == 1 {
		return doc.Content[0]
	}
	return nil
}

// syntaxError turns a yaml.v3 parse error into a diagnostic at the token
// it is about (see locateSyntaxError): yaml.v3 gives only a line, not
// always that, and often the line where the enclosing construct began.
func (d *decoder) syntaxError(data []byte, err error) {
	line, msg := 0, err.Error()
	if m := yamlLineError.FindStringSubmatch(msg); m != nil {
		if n, convErr := strconv.Atoi(m[1]); convErr == nil && n > 0 {
			line = n
		}
		msg = m[2]
	} else {
		msg = strings.TrimPrefix(msg, "yaml: ")
	}
	line, col := locateSyntaxError(data, msg, line)
	d.errs = append(d.errs, Diagnostic{File: d.file, Line: line, Column: col, Field: "", Message: "YAML syntax error: " + msg})
}

// config builds the whole configuration from the root node (nil = empty).
// Sections are decoded in dependency order (hops, chains, services) no
// matter where they appear in the file.
func (d *decoder) config(root *yaml.Node) *Config {
	cfg := &Config{
		Log:     Log{Level: "info", Format: "text", Output: "stderr"},
		Metrics: Metrics{Path: defaultMetricsPath},
	}
	if root == nil {
		if len(d.errs) == 0 {
			d.errs = append(d.errs, Diagnostic{File: d.file, Line: 1, Column: 1, Field: "services", Message: "no services: the file is empty"})
		}
		return cfg
	}
	top, ok := d.mapping(root, "", &topLevelSection)
	if !ok {
		return cfg
	}
	if f, ok := top["log"]; ok {
		cfg.Log = d.log(f)
	}
	if f, ok := top["metrics"]; ok {
		cfg.Metrics = d.metrics(f)
	}
	var hopsByName map[string]*Hop
	if f, ok := top["hops"]; ok {
		cfg.Hops, hopsByName = d.topHops(f)
	}
	var chainsByName map[string]*Chain
	if f, ok := top["chains"]; ok {
		cfg.Chains, chainsByName = d.chains(f, hopsByName)
	}
	f, ok := top["services"]
	if !ok {
		d.errorf(root, "services", "no services: the file has no services section")
		return cfg
	}
	var limiters [3]map[string]*Limiter
	for _, kind := range []LimiterKind{TrafficLimiter, ConnLimiter, RateLimiter} {
		limiters[kind] = map[string]*Limiter{}
		if lf, ok := top[kind.Section()]; ok {
			limiters[kind] = d.limiters(lf, kind)
			for _, l := range slices.SortedFunc(maps.Values(limiters[kind]), func(a, b *Limiter) int { return a.Pos.Line - b.Pos.Line }) {
				cfg.Limiters = append(cfg.Limiters, l)
			}
		}
	}
	cfg.Services = d.services(f, chainsByName, limiters)
	return cfg
}

func sortDiagnostics(list []Diagnostic) {
	sort.SliceStable(list, func(i, j int) bool {
		if list[i].Line != list[j].Line {
			return list[i].Line < list[j].Line
		}
		return list[i].Column < list[j].Column
	})
}
