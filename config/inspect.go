package config

import (
	"fmt"
	"os"
)

// Inspect reads path like Load, but when the configuration is invalid it
// also returns whatever could be decoded, so that a checker can report more
// problems at once (a missing namespace beside a bad address). A config
// returned together with an error is partial and must never be run: fields
// of invalid entries may be empty.
func Inspect(path string) (*Config, []Diagnostic, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read config %s: %w", path, err)
	}
	return parse(path, data, os.LookupEnv)
}
