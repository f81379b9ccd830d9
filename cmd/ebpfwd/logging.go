package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/ebpfwd/ebpfwd/config"
)

// newLogger builds the slog logger that GOST's `log` section describes.
func newLogger(lc config.Log, stderr io.Writer) (*slog.Logger, func(), error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(orDefault(lc.Level, "info"))); err != nil {
		return nil, nil, fmt.Errorf("level %q: %w", lc.Level, err)
	}
	out, closer := stderr, func() {}
	switch lc.Output {
	case "", "stderr":
	case "stdout":
		out = os.Stdout
	case "none":
		out = io.Discard
	default:
		f, err := os.OpenFile(lc.Output, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("output: %w", err)
		}
		out, closer = f, func() { f.Close() }
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(out, opts)
	if lc.Format == "json" {
		h = slog.NewJSONHandler(out, opts)
	}
	return slog.New(h), closer, nil
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// firstLine is the first line of err, for a log record: the whole error
// goes to stderr.
func firstLine(err error) string {
	s, _, _ := strings.Cut(err.Error(), "\n")
	return s
}
