package netns

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"
)

// fileCache keeps the parsed form of small configuration files (hosts,
// resolv.conf) and re-parses a file only when its identity or timestamps
// change, so a daemon dialing by name does not re-read /etc/hosts for every
// connection yet still sees edits at once.
type fileCache[T any] struct {
	parse func([]byte) T

	mu      sync.Mutex
	entries map[string]cachedFile[T]
}

type cachedFile[T any] struct {
	stamp fileStamp
	value T
}

// fileStamp identifies one version of a file. ctime is included because an
// in-place rewrite within one mtime tick still changes ctime.
type fileStamp struct {
	dev, ino     uint64
	size         int64
	mtime, ctime time.Time
}

func stampOf(fi fs.FileInfo) fileStamp {
	s := fileStamp{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.dev, s.ino = st.Dev, st.Ino
		s.ctime = time.Unix(st.Ctim.Unix())
	}
	return s
}

func newFileCache[T any](parse func([]byte) T) *fileCache[T] {
	return &fileCache[T]{parse: parse, entries: make(map[string]cachedFile[T])}
}

// get returns the parsed content of path. exists is false, with a nil error,
// when the file does not exist.
func (c *fileCache[T]) get(path string) (value T, exists bool, err error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		c.mu.Lock()
		delete(c.entries, path)
		c.mu.Unlock()
		return value, false, nil
	}
	if err != nil {
		return value, false, err
	}
	stamp := stampOf(fi)
	c.mu.Lock()
	e, ok := c.entries[path]
	c.mu.Unlock()
	if ok && e.stamp == stamp {
		return e.value, true, nil
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return value, false, nil // removed between stat and read
	}
	if err != nil {
		return value, false, err
	}
	value = c.parse(data)
	c.mu.Lock()
	c.entries[path] = cachedFile[T]{stamp: stamp, value: value}
	c.mu.Unlock()
	return value, true, nil
}

// pickFile returns the per-namespace file when it exists and the system-wide
// one otherwise, as `ip netns exec` would bind-mount it over /etc. A missing
// system file yields the zero value, as an empty file would.
func pickFile[T any](c *fileCache[T], nsPath, systemPath string) (T, error) {
	if nsPath != "" {
		value, exists, err := c.get(nsPath)
		if err != nil {
			return value, fmt.Errorf("read %s: %w", nsPath, err)
		}
		if exists {
			return value, nil
		}
	}
	value, _, err := c.get(systemPath)
	if err != nil {
		return value, fmt.Errorf("read %s: %w", systemPath, err)
	}
	return value, nil
}

// hostsTable maps lower-case host names (without a trailing dot) to their
// addresses in file order.
type hostsTable map[string][]netip.Addr

// parseHosts parses hosts(5): "ADDRESS NAME [ALIAS...]" per line, '#' starts
// a comment, names are case-insensitive. Lines with an unparsable address are
// skipped, as the C library does.
func parseHosts(data []byte) hostsTable {
	table := make(hostsTable)
	for line := range strings.Lines(string(data)) {
		line, _, _ = strings.Cut(line, "#")
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		addr, err := netip.ParseAddr(fields[0])
		if err != nil {
			continue
		}
		for _, name := range fields[1:] {
			key := hostKey(name)
			table[key] = append(table[key], addr)
		}
	}
	return table
}

// hostKey is the form host names are compared in: case-insensitive, and
// "name." is the same host as "name".
func hostKey(name string) string {
	return strings.ToLower(strings.TrimSuffix(name, "."))
}

// lookup returns the addresses of host, nil when the table does not list it.
// The returned slice is a copy: the table is shared through the cache.
func (t hostsTable) lookup(host string) []netip.Addr {
	addrs := t[hostKey(host)]
	if len(addrs) == 0 {
		return nil
	}
	return append([]netip.Addr(nil), addrs...)
}

// resolvConf is the part of resolv.conf(5) this package needs: the
// nameservers, in file order.
type resolvConf struct {
	nameservers []netip.Addr
}

// parseResolvConf reads "nameserver ADDRESS" lines; '#' and ';' start
// comments. Other options (search, ndots, timeouts) are left to Go's
// resolver, which reads them from /etc/resolv.conf.
func parseResolvConf(data []byte) resolvConf {
	var conf resolvConf
	for line := range strings.Lines(string(data)) {
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		fields := strings.Fields(line)
		if len(fields) < 2 || fields[0] != "nameserver" {
			continue
		}
		if addr, err := netip.ParseAddr(fields[1]); err == nil {
			conf.nameservers = append(conf.nameservers, addr)
		}
	}
	return conf
}

// Caches shared by every NS.
var (
	hostsFiles  = newFileCache(parseHosts)
	resolvFiles = newFileCache(parseResolvConf)
)
