// Package layering holds the test that keeps ebpfwd's imports pointing
// down: the namespace helper at the foundation, config and the datapath
// contract above it, kernel-side packages never reaching into userspace/.
package layering
