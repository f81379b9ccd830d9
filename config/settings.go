package config

import (
	"slices"
	"strings"
)

// log decodes the log section. Output is "stderr", "stdout", "none" or a
// file path; GOST has no other special values.
func (d *decoder) log(f field) Log {
	l := Log{Level: "info", Format: "text", Output: "stderr"}
	fs, ok := d.fieldMapping(f, &logSection)
	if !ok {
		return l
	}
	choose := func(key string, allowed []string, dst *string) {
		kf, ok := fs[key]
		if !ok {
			return
		}
		v, ok := d.str(kf)
		if !ok || v == "" {
			return
		}
		if !slices.Contains(allowed, v) {
			d.errorf(kf.pos(), kf.path, "%s", oneOf(v, allowed))
			return
		}
		*dst = v
	}
	choose("level", logLevels, &l.Level)
	choose("format", logFormats, &l.Format)
	if of, ok := fs["output"]; ok {
		if v, ok := d.str(of); ok && v != "" {
			l.Output = v
		}
	}
	return l
}

// metrics decodes the metrics section. The section being present means the
// operator wants metrics, so addr is required then.
func (d *decoder) metrics(f field) Metrics {
	m := Metrics{Path: defaultMetricsPath}
	if isNull(f.value) {
		return m
	}
	fs, ok := d.fieldMapping(f, &metricsSection)
	if !ok {
		return m
	}
	if af, ok := fs["addr"]; ok {
		m.Addr, _, _ = d.addr(af, listenAddr)
	} else {
		d.errorf(f.pos(), join(f.path, "addr"), "is required to serve metrics (e.g. \":9000\")")
	}
	if pf, ok := fs["path"]; ok {
		if p, ok := d.str(pf); ok && p != "" {
			if strings.HasPrefix(p, "/") {
				m.Path = p
			} else {
				d.errorf(pf.pos(), pf.path, "must start with \"/\", got %q", p)
			}
		}
	}
	if af, ok := fs["auth"]; ok {
		m.Auth = d.auth(af)
	}
	return m
}
