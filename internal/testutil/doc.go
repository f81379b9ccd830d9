// Package testutil holds the helpers ebpfwd's tests share: the root check,
// unique names, a test's own network namespace, loopback servers and a
// scripted HTTP CONNECT proxy. It is imported by tests only.
//
// What it may import: the standard library and internal/topo, nothing
// else. Tests inside most ebpfwd packages (package netns, package loader,
// package httpconnect, ...) import testutil, and Go forbids an in-package
// test to import a package that imports the package under test. That is
// why NewNSHandle takes netns.Parse as an argument instead of calling it,
// and why the CONNECT proxy here is a script, not ebpfwd's httpproxy.
// internal/topo's own tests are an external test package (topo_test) so
// that they can use testutil too.
package testutil

import "time"

// Timeout bounds every wait a helper here does on its own, such as
// waiting for a server's connections to finish when the test ends.
const Timeout = 10 * time.Second
