// Package test holds ebpfwd's end-to-end tests: they build the real
// ebpfwd binary, run it over real network namespaces and veth links, and
// verify every byte that crosses it. They need root; without it every test
// skips. The harness (building the binary, starting daemons, echo servers)
// is internal/e2e, shared with test/topologies.
package test

import (
	"os"
	"testing"

	"github.com/ebpfwd/ebpfwd/internal/e2e"
)

func TestMain(m *testing.M) {
	os.Exit(e2e.Main(m))
}
