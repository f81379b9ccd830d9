package daemon

import (
	"net/http"
	"net/http/pprof"
)

// ProfilePath is where the control socket serves Go's profiles
// (net/http/pprof): `curl --unix-socket SOCKET http://ebpfwd/debug/pprof/profile?seconds=10`.
// They are on the control socket, not the metrics listener, because a
// profile shows the daemon's memory and takes CPU: only root (the socket is
// mode 0600) may ask.
const ProfilePath = "/debug/pprof/"

// serveProfiles adds the pprof handlers to the control socket's mux.
func serveProfiles(mux *http.ServeMux) {
	mux.HandleFunc("GET "+ProfilePath, pprof.Index) // also serves heap, goroutine, allocs, block, mutex, threadcreate
	mux.HandleFunc("GET "+ProfilePath+"cmdline", pprof.Cmdline)
	mux.HandleFunc("GET "+ProfilePath+"profile", pprof.Profile)
	mux.HandleFunc("GET "+ProfilePath+"symbol", pprof.Symbol)
	mux.HandleFunc("GET "+ProfilePath+"trace", pprof.Trace)
}
