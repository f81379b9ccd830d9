// Package e2e is the end-to-end test harness shared by ./test and
// ./test/topologies: Main builds the real ebpfwd binary once per test
// binary, Start runs it on a configuration (optionally inside a namespace)
// and stops it when the test ends, and the fixtures start verifying
// servers in namespaces and push checked traffic through the daemon.
//
// It lives outside test/ because Go test files cannot be imported: every
// package of end-to-end tests uses this one harness instead of a copy.
// Unlike internal/testutil it may import ebpfwd's netns package: no
// package under test imports e2e, so there is no cycle to avoid.
package e2e
