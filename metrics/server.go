package metrics

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ServerConfig is GOST's `metrics` section.
type ServerConfig struct {
	Addr     string // host:port; an empty host binds 127.0.0.1, not every address
	Path     string
	Username string // Basic auth when set
	Password string
	// Inherited, when set, is the listening socket the previous process of
	// an upgrade served metrics on: it is served instead of binding Addr.
	Inherited *os.File
}

// listenAddr applies the loopback default: metrics reveal the gateway's
// topology and traffic, so exposing them takes an explicit address.
func listenAddr(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", err
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port), nil
}

// Server serves a registry over HTTP.
type Server struct {
	srv        *http.Server
	ln         net.Listener
	log        *slog.Logger
	onShutdown []func()
}

// OnShutdown registers f to run when the server shuts down.
func (s *Server) OnShutdown(f func()) { s.onShutdown = append(s.onShutdown, f) }

// Listen opens the metrics listener (in the daemon's own namespace), so a
// bad address fails start-up rather than the first scrape.
func Listen(cfg ServerConfig, reg *prometheus.Registry, log *slog.Logger) (*Server, error) {
	addr, err := listenAddr(cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("metrics addr %q: %w", cfg.Addr, err)
	}
	var ln net.Listener
	if cfg.Inherited != nil {
		ln, err = net.FileListener(cfg.Inherited)
		cfg.Inherited.Close()
		if err != nil {
			return nil, fmt.Errorf("metrics: inherited socket: %w", err)
		}
	} else if ln, err = net.Listen("tcp", addr); err != nil {
		return nil, fmt.Errorf("metrics: listen %s: %w", addr, err)
	}
	var h http.Handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg, ErrorLog: slogAdapter{log}})
	if cfg.Username != "" || cfg.Password != "" {
		h = basicAuth(h, cfg.Username, cfg.Password)
	}
	mux := http.NewServeMux()
	mux.Handle(cfg.Path, h)
	return &Server{
		srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second},
		ln:  ln,
		log: log,
	}, nil
}

// Addr is the address the server listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// File returns a copy of the listening socket, for an upgrade to hand over.
func (s *Server) File() (*os.File, error) {
	fl, ok := s.ln.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, errors.New("metrics: the listener cannot be copied")
	}
	return fl.File()
}

// Serve serves until Shutdown.
func (s *Server) Serve() {
	if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		s.log.Error("metrics server stopped", "err", err)
	}
}

// Shutdown stops the server, letting a scrape in flight finish briefly.
func (s *Server) Shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.srv.Shutdown(ctx)
	for _, f := range s.onShutdown {
		f()
	}
}

func basicAuth(next http.Handler, user, pass string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, p, ok := r.BasicAuth()
		// Both compares always run, so timing says nothing about which failed.
		userOK := subtle.ConstantTimeCompare([]byte(u), []byte(user)) == 1
		passOK := subtle.ConstantTimeCompare([]byte(p), []byte(pass)) == 1
		if !ok || !userOK || !passOK {
			w.Header().Set("WWW-Authenticate", `Basic realm="ebpfwd metrics"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// slogAdapter lets promhttp report encoding errors through slog.
type slogAdapter struct{ log *slog.Logger }

func (a slogAdapter) Println(v ...any) { a.log.Error("metrics: " + fmt.Sprint(v...)) }
