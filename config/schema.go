package config

import (
	"fmt"
	"strings"
)

// section lists the keys GOST defines for one kind of YAML mapping, split into
// those ebpfwd implements and those it rejects. The lists follow GOST v3's
// x/config structs; anything in neither list is not GOST at all.
type section struct {
	keys        []string // implemented, in GOST's spelling
	unsupported []string // GOST features ebpfwd does not implement
}

// lookup finds key (case-insensitively, as GOST's viper loader does) and
// returns its canonical spelling and whether ebpfwd implements it.
func (s *section) lookup(key string) (canonical string, supported, known bool) {
	for _, k := range s.keys {
		if strings.EqualFold(k, key) {
			return k, true, true
		}
	}
	for _, k := range s.unsupported {
		if strings.EqualFold(k, key) {
			return k, false, true
		}
	}
	return key, false, false
}

// suggest returns ` (did you mean "x"?)` for the closest implemented key, or
// "" when nothing is close enough to be a likely typo.
func (s *section) suggest(key string) string {
	return suggestion(key, s.keys)
}

var (
	topLevelSection = section{
		keys: []string{"services", "chains", "hops", "log", "metrics", "limiters", "climiters", "rlimiters"},
		unsupported: []string{"authers", "admissions", "bypasses", "resolvers", "hosts", "ingresses",
			"routers", "sds", "recorders", "observers", "loggers",
			"tls", "profiling", "api"},
	}
	serviceSection = section{
		// netns is the deprecated service-level spelling of metadata.netns.
		keys: []string{"name", "addr", "netns", "handler", "listener", "forwarder", "metadata",
			"limiter", "climiter", "rlimiter"},
		unsupported: []string{"interface", "sockopts", "admission", "admissions", "bypass", "bypasses",
			"resolver", "hosts", "logger", "loggers", "observer",
			"recorders", "status"},
	}
	handlerSection = section{
		keys:        []string{"type", "chain", "auth", "metadata"},
		unsupported: []string{"retries", "chainGroup", "auther", "authers", "tls", "limiter", "observer"},
	}
	listenerSection = section{
		keys:        []string{"type", "metadata"},
		unsupported: []string{"chain", "chainGroup", "auther", "authers", "auth", "tls"},
	}
	forwarderSection = section{
		// name is deprecated in GOST and has no effect; it is accepted with a
		// warning. targets is GOST's older spelling of nodes: a list of
		// addresses.
		keys: []string{"nodes", "selector", "name", "targets"},
	}
	forwardNodeSection = section{
		keys:        []string{"name", "addr", "metadata"},
		unsupported: []string{"host", "network", "protocol", "path", "bypass", "bypasses", "http", "tls", "auth"},
	}
	selectorSection = section{
		keys:        []string{"strategy", "maxFails", "failTimeout"},
		unsupported: []string{"maxLatency"},
	}
	chainSection = section{
		keys: []string{"name", "hops", "metadata"},
	}
	hopSection = section{
		keys: []string{"name", "selector", "nodes", "metadata"},
		unsupported: []string{"interface", "sockopts", "bypass", "bypasses", "resolver", "hosts",
			"reload", "file", "redis", "http", "plugin"},
	}
	hopNodeSection = section{
		keys: []string{"name", "addr", "connector", "dialer", "metadata"},
		unsupported: []string{"host", "network", "protocol", "path", "interface", "sockopts", "bypass",
			"bypasses", "resolver", "hosts", "http", "tls", "auth"},
	}
	connectorSection = section{
		keys:        []string{"type", "auth", "metadata"},
		unsupported: []string{"tls"},
	}
	dialerSection = section{
		keys:        []string{"type", "metadata"},
		unsupported: []string{"auth", "tls"},
	}
	authSection = section{
		keys: []string{"username", "password"},
	}
	logSection = section{
		keys:        []string{"level", "format", "output"},
		unsupported: []string{"rotation"},
	}
	metricsSection = section{
		keys:        []string{"addr", "path", "auth"},
		unsupported: []string{"auther"},
	}
)

// Values ebpfwd implements. Any other type (GOST has many more: socks5,
// relay, tls, kcp...) is rejected with the supported list, plus a typo
// suggestion when one is close.
var (
	handlerTypes       = []string{"tcp", "udp", "http"}
	listenerTypes      = []string{"tcp", "udp"}
	connectorTypes     = []string{"http"}
	dialerTypes        = []string{"tcp"}
	selectorStrategies = []string{"round", "rand", "fifo", "hash"}
	// datapathKinds lists the datapaths this build has (sockmap joins
	// when it is built): an error lists only values that work.
	datapathKinds           = []string{"auto", "tc", "userspace"}
	healthChecks            = []string{HealthPassive, HealthProbe}
	logLevels               = []string{"debug", "info", "warn", "error"}
	logFormats              = []string{"text", "json"}
	selectorStrategyAliases = map[string]string{"rr": "round", "random": "rand", "ha": "fifo"}
)

// Metadata keys ebpfwd reads, per place. GOST lower-cases metadata keys, so
// they are matched case-insensitively; the spelling here is the documented one.
var (
	serviceMetadataKeys = append([]string{"netns", "netns.out", "datapath", "idleTimeout", "maxStreams", "healthCheck", "proxyProtocol",
		"limiter.refreshInterval", "limiter.scope"}, limiterMetadataKeys...)
	// handlerMetadataKeys: GOST's forward handler sends a PROXY header to
	// the node (proxyProtocol); its readBufferSize (udp.bufferSize) sizes
	// only the datagram it sniffs or forwards statelessly, neither of
	// which ebpfwd has: read to say so.
	handlerMetadataKeys = []string{"proxyProtocol", "readBufferSize", "udp.bufferSize"}
	// listenerMetadataKeys: GOST's udp listener; keepalive.ttl and
	// udp.bufferSize are its second spellings of ttl and readBufferSize.
	listenerMetadataKeys = []string{"ttl", "keepalive.ttl", "keepAlive", "readBufferSize", "udp.bufferSize"}
	hopMetadataKeys      = []string{"netns", "proxyProtocol"}
	nodeMetadataKeys     = []string{"netns", "proxyProtocol"}
	// httpHandlerMetadataKeys are ebpfwd's own keys for handler type http.
	httpHandlerMetadataKeys = []string{"allowOpenProxy", "maxClients", "headerTimeout"}
)

// unsupportedType formats the message for a type ebpfwd does not implement.
func unsupportedType(value string, supported []string) string {
	return fmt.Sprintf("%q is not supported by ebpfwd (supported: %s)%s",
		value, strings.Join(supported, ", "), suggestion(value, supported))
}

// oneOf formats the message for a value outside a fixed set.
func oneOf(value string, allowed []string) string {
	return fmt.Sprintf("invalid value %q (must be one of: %s)%s",
		value, strings.Join(allowed, ", "), suggestion(value, allowed))
}

// suggestion returns ` (did you mean "x"?)` when one candidate is within a
// small edit distance of word. Exact (case-insensitive) matches are not
// suggestions: they are the caller's business.
func suggestion(word string, candidates []string) string {
	w := strings.ToLower(word)
	best, bestDist := "", 0
	for _, c := range candidates {
		dist := editDistance(w, strings.ToLower(c))
		if dist == 0 {
			continue
		}
		// Allow one edit per three letters so that short words do not
		// match everything.
		limit := max(1, len(c)/3)
		if dist <= limit && (best == "" || dist < bestDist) {
			best, bestDist = c, dist
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the optimal string alignment distance between a and b, in
// bytes: insertions, deletions, substitutions and transpositions of adjacent
// letters ("tpc" for "tcp") each cost one. Keys are ASCII and short.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		// Far from any key; skip the quadratic work on hostile input.
		return len(a) + len(b)
	}
	// rows[i][j] is the distance between a[:i] and b[:j].
	rows := make([][]int, len(a)+1)
	for i := range rows {
		rows[i] = make([]int, len(b)+1)
		rows[i][0] = i
	}
	for j := range rows[0] {
		rows[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			rows[i][j] = min(rows[i-1][j]+1, rows[i][j-1]+1, rows[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				rows[i][j] = min(rows[i][j], rows[i-2][j-2]+1)
			}
		}
	}
	return rows[len(a)][len(b)]
}
