package config

import (
	"bytes"
	"fmt"
	"net/url"
	"slices"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"
)

// CommandLine is GOST's command line: every -L is a service, every -F one
// hop of the chain all services leave through, -D debug logging. It turns
// into the YAML GOST's `-O yaml` prints, and that YAML is what runs: the
// command line and the file are one configuration, checked by one parser.
type CommandLine struct {
	Services []string // -L URLs
	Hops     []string // -F URLs, in order
	Debug    bool     // -D
}

// The YAML document a command line stands for; field order is GOST's.
type (
	cliDoc struct {
		Services []cliService `yaml:"services"`
		Chains   []cliChain   `yaml:"chains,omitempty"`
		Log      *cliLog      `yaml:"log,omitempty"`
	}
	cliService struct {
		Name      string            `yaml:"name"`
		Addr      string            `yaml:"addr"`
		Handler   cliHandler        `yaml:"handler"`
		Listener  cliListener       `yaml:"listener"`
		Forwarder *cliForwarder     `yaml:"forwarder,omitempty"`
		Metadata  map[string]string `yaml:"metadata,omitempty"`
	}
	cliHandler struct {
		Type  string   `yaml:"type"`
		Chain string   `yaml:"chain,omitempty"`
		Auth  *cliAuth `yaml:"auth,omitempty"`
	}
	cliListener struct {
		Type     string            `yaml:"type"`
		Metadata map[string]string `yaml:"metadata,omitempty"`
	}
	cliForwarder struct {
		Nodes []cliNode `yaml:"nodes"`
	}
	cliNode struct {
		Name      string            `yaml:"name"`
		Addr      string            `yaml:"addr"`
		Connector *cliConnector     `yaml:"connector,omitempty"`
		Dialer    *cliType          `yaml:"dialer,omitempty"`
		Metadata  map[string]string `yaml:"metadata,omitempty"`
	}
	cliConnector struct {
		Type string   `yaml:"type"`
		Auth *cliAuth `yaml:"auth,omitempty"`
	}
	cliType struct {
		Type string `yaml:"type"`
	}
	cliAuth struct {
		Username string `yaml:"username"`
		Password string `yaml:"password,omitempty"`
	}
	cliChain struct {
		Name string   `yaml:"name"`
		Hops []cliHop `yaml:"hops"`
	}
	cliHop struct {
		Name     string            `yaml:"name"`
		Metadata map[string]string `yaml:"metadata,omitempty"`
		Nodes    []cliNode         `yaml:"nodes"`
	}
	cliLog struct {
		Level string `yaml:"level"`
	}
)

// listenerParams are the -L parameters that belong to the listener, as
// GOST reads them there; every other parameter is service metadata (netns,
// netns.out, and ebpfwd's own keys among them).
var listenerParams = []string{"ttl", "keepAlive", "readBufferSize"}

// hopParams are the -F parameters that belong to the hop: the namespace
// the hop's node is dialed from.
var hopParams = []string{"netns", "proxyProtocol"}

// YAML returns the configuration the command line stands for, as GOST's
// `-O yaml` would print it. A URL ebpfwd cannot run is an error naming the
// flag, the URL and the part at fault.
func (c CommandLine) YAML() ([]byte, error) {
	if len(c.Services) == 0 {
		return nil, fmt.Errorf("-L: no service: give at least one -L URL (e.g. -L tcp://:8000/10.0.0.2:80)")
	}
	var doc cliDoc
	var chainName string
	if len(c.Hops) > 0 {
		chainName = "chain-0"
		chain := cliChain{Name: chainName}
		for i, raw := range c.Hops {
			hop, err := cliParseHop(i, raw)
			if err != nil {
				return nil, err
			}
			chain.Hops = append(chain.Hops, hop)
		}
		doc.Chains = []cliChain{chain}
	}
	for i, raw := range c.Services {
		svc, err := cliParseService(i, raw)
		if err != nil {
			return nil, err
		}
		svc.Handler.Chain = chainName
		doc.Services = append(doc.Services, svc)
	}
	if c.Debug {
		doc.Log = &cliLog{Level: "debug"}
	}
	var out bytes.Buffer
	enc := yaml.NewEncoder(&out)
	enc.SetIndent(2) // as GOST's documentation writes its YAML
	if err := enc.Encode(doc); err != nil {
		return nil, fmt.Errorf("command line: %w", err)
	}
	if err := enc.Close(); err != nil {
		return nil, fmt.Errorf("command line: %w", err)
	}
	// A ${ in a URL is text, not a variable (the shell expanded the
	// command line already): escaped, it parses back to what was given.
	// Every run of $ before { gains one, which expansion takes away
	// (env.go), so "$${" in a URL stays "$${" too.
	return bytes.ReplaceAll(out.Bytes(), []byte("${"), []byte("$${")), nil
}

func cliURL(flag, raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %w", flag, raw, err)
	}
	if u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("%s %q: want scheme://[user:pass@][host]:port..., e.g. tcp://:8000/10.0.0.2:80", flag, raw)
	}
	return u, nil
}

// cliParams splits a URL's query into two metadata maps: the keys in
// picked, and the rest. A key given twice takes its first value, as GOST.
func cliParams(q url.Values, picked []string) (in, rest map[string]string) {
	keys := make([]string, 0, len(q))
	for k := range q {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		m := &rest
		if slices.Contains(picked, k) {
			m = &in
		}
		if *m == nil {
			*m = map[string]string{}
		}
		(*m)[k] = q.Get(k)
	}
	return in, rest
}

func cliAuthOf(u *url.URL) *cliAuth {
	if u.User == nil {
		return nil
	}
	pass, _ := u.User.Password()
	return &cliAuth{Username: u.User.Username(), Password: pass}
}

// cliParseService turns one -L URL into a service: scheme handler[+listener]
// (tcp and udp forward to the targets in the path, http is a proxy), host
// and port the listen address, user and password the handler's auth.
func cliParseService(i int, raw string) (cliService, error) {
	u, err := cliURL("-L", raw)
	if err != nil {
		return cliService{}, err
	}
	handler, listener, _ := strings.Cut(u.Scheme, "+")
	if !slices.Contains(handlerTypes, handler) {
		return cliService{}, fmt.Errorf("-L %q: scheme %q: ebpfwd runs the handlers %s", raw, handler, joinList(handlerTypes))
	}
	if listener == "" {
		listener = "tcp"
		if handler == "udp" {
			listener = "udp"
		}
	}
	if !slices.Contains(listenerTypes, listener) {
		return cliService{}, fmt.Errorf("-L %q: scheme %q: listener %q is not one of %s", raw, u.Scheme, listener, joinList(listenerTypes))
	}
	svc := cliService{
		Name:     fmt.Sprintf("service-%d", i),
		Addr:     u.Host,
		Handler:  cliHandler{Type: handler, Auth: cliAuthOf(u)},
		Listener: cliListener{Type: listener},
	}
	svc.Listener.Metadata, svc.Metadata = cliParams(u.Query(), listenerParams)
	targets := strings.Trim(u.Path, "/")
	switch {
	case targets != "" && handler == "http":
		return cliService{}, fmt.Errorf("-L %q: path %q: an http proxy connects where each client asks; it takes no targets", raw, u.Path)
	case targets == "" && handler != "http":
		return cliService{}, fmt.Errorf("-L %q: no target: a %s service forwards to the addresses after the port, e.g. %s://%s/10.0.0.2:80", raw, handler, u.Scheme, u.Host)
	case targets != "":
		svc.Forwarder = &cliForwarder{}
		for j, t := range strings.Split(targets, ",") {
			svc.Forwarder.Nodes = append(svc.Forwarder.Nodes, cliNode{Name: fmt.Sprintf("target-%d", j), Addr: t})
		}
	}
	return svc, nil
}

// cliParseHop turns one -F URL into a hop of the chain: an HTTP CONNECT
// proxy at host:port, user and password its auth, netns where it is
// dialed from.
func cliParseHop(i int, raw string) (cliHop, error) {
	u, err := cliURL("-F", raw)
	if err != nil {
		return cliHop{}, err
	}
	connector, dialer, _ := strings.Cut(u.Scheme, "+")
	if dialer == "" {
		dialer = "tcp"
	}
	if !slices.Contains(connectorTypes, connector) || !slices.Contains(dialerTypes, dialer) {
		return cliHop{}, fmt.Errorf("-F %q: scheme %q: ebpfwd's hops are HTTP CONNECT proxies (http or http+tcp)", raw, u.Scheme)
	}
	if strings.Trim(u.Path, "/") != "" {
		return cliHop{}, fmt.Errorf("-F %q: path %q: a hop takes no path", raw, u.Path)
	}
	hop := cliHop{Name: fmt.Sprintf("hop-%d", i)}
	node := cliNode{Name: "node-0", Addr: u.Host,
		Connector: &cliConnector{Type: connector, Auth: cliAuthOf(u)}, Dialer: &cliType{Type: dialer}}
	hop.Metadata, node.Metadata = cliParams(u.Query(), hopParams)
	hop.Nodes = []cliNode{node}
	return hop, nil
}
