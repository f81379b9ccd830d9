package daemon

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/ebpfwd/ebpfwd/datapath"
	"github.com/ebpfwd/ebpfwd/netns"
)

// An upgrade hands the daemon over to a new process (a new binary, or the
// same one) without refusing or resetting a connection:
//
//  1. The old process starts the new one with a copy of every listening
//     socket (Upgrader.Start, ListenerKey names them). The new process
//     loads its configuration and plans its services, then waits (its
//     Options.Adopt) before it touches any kernel state.
//  2. The old process stops accepting (the sockets stay open in the new
//     process, so clients queue in their backlog rather than being
//     refused), stops its health probes, lets go of the kernel datapaths'
//     state as for a restart in place (programs attached, maps pinned,
//     flows going), and closes its control socket.
//  3. It tells the new process to go on (Upgrader.Release): the new one
//     adopts the kernel state, takes the inherited sockets and serves.
//  4. The old process finishes its userspace connections (up to the drain
//     timeout) and exits.
//
// If the new process fails before step 2, nothing changed: the old one
// keeps serving and says why. If it fails after, the old process finishes
// its connections and exits with an error, for the service manager to
// restart it.

// Upgrader starts and releases the new process of an upgrade (the CLI
// implements it: exec, fd passing, the service manager's notifications).
type Upgrader interface {
	// Start starts the new process with these listening sockets (keyed
	// by ListenerKey) and returns once it waits to take over, or fails.
	Start(listeners map[string]*os.File) error
	// Release tells the waiting process to take over, and returns once
	// it serves, or fails.
	Release() error
	// Abort ends a new process that has not taken over.
	Abort()
}

// ErrUpgraded is what Run returns after it handed the daemon over to a new
// process and finished its own connections.
var ErrUpgraded = errors.New("daemon handed over to a new process")

// ListenerKey names a listening socket for an upgrade: a service of the
// new process takes the socket of the same network and address in the
// same namespace (by identity, however it is spelled).
func ListenerKey(network string, ns netns.ID, addr string) string {
	return network + ":" + ns.String() + ":" + addr
}

// listenKey is the key of service s's socket.
func (s *service) listenKey() (string, error) {
	id, err := s.listenNS.ID()
	if err != nil {
		return "", fmt.Errorf("service %s: identify netns %s: %w", s.cfg.Name, s.listenNS, err)
	}
	return ListenerKey(s.cfg.Listener.Type, id, s.cfg.Addr), nil
}

// inherited returns (and forgets) the socket a previous process handed
// over for s, or nil.
func (s *service) inherited() *os.File {
	if len(s.d.opts.Inherited) == 0 {
		return nil
	}
	key, err := s.listenKey()
	if err != nil {
		return nil
	}
	s.d.inheritMu.Lock()
	defer s.d.inheritMu.Unlock()
	f := s.d.opts.Inherited[key]
	delete(s.d.opts.Inherited, key)
	return f
}

// listenerFiles returns a copy of every service's listening socket, by
// key. The caller closes them.
func (d *Daemon) listenerFiles() (map[string]*os.File, error) {
	files := map[string]*os.File{}
	closeAll := func() {
		for _, f := range files {
			f.Close()
		}
	}
	for _, s := range d.current() {
		key, err := s.listenKey()
		if err != nil {
			closeAll()
			return nil, err
		}
		var fc interface{ File() (*os.File, error) }
		switch {
		case s.ln.acc != nil:
			fc, _ = s.ln.acc.l.(interface{ File() (*os.File, error) })
		case s.ln.pc != nil:
			fc, _ = s.ln.pc.(interface{ File() (*os.File, error) })
		}
		if fc == nil {
			closeAll()
			return nil, fmt.Errorf("service %s: its socket cannot be handed over", s.cfg.Name)
		}
		f, err := fc.File()
		if err != nil {
			closeAll()
			return nil, fmt.Errorf("service %s: copy its socket: %w", s.cfg.Name, err)
		}
		files[key] = f
	}
	return files, nil
}

// fromInherited makes the service's socket from one a previous process
// handed over. The file is closed: the socket lives on in what is made.
func (s *service) fromInherited(f *os.File) error {
	defer f.Close()
	switch s.cfg.Listener.Type {
	case "udp":
		pc, err := net.FilePacketConn(f)
		if err != nil {
			return fmt.Errorf("service %s: inherited udp socket: %w", s.cfg.Name, err)
		}
		s.ln = listener{pc: pc}
	default:
		l, err := net.FileListener(f)
		if err != nil {
			return fmt.Errorf("service %s: inherited tcp socket: %w", s.cfg.Name, err)
		}
		s.ln = listener{acc: newAcceptor(l, s)}
	}
	s.log.Info("listening on the socket the previous process handed over", "addr", s.cfg.Addr)
	return nil
}

// handOver runs steps 1 to 3 of an upgrade (see Upgrader). started false:
// the new process never took over and the daemon keeps serving; err then
// says why. started true with an error: the new process failed after the
// daemon let go; the daemon can only finish its connections.
func (d *Daemon) handOver(u Upgrader, closeControl func()) (started bool, err error) {
	files, err := d.listenerFiles()
	if err != nil {
		return false, err
	}
	err = u.Start(files)
	for _, f := range files {
		f.Close() // the new process holds its own copies
	}
	if err != nil {
		u.Abort()
		return false, err
	}
	for _, s := range d.current() {
		s.stopTaking()
		s.stopProbing()
	}
	for _, dp := range d.datapaths.Datapaths() {
		if k, ok := dp.(stateKeeper); ok {
			k.KeepForRestart()
		}
	}
	for _, s := range d.current() {
		s.releaseKernel()
	}
	closeControl()
	if err := u.Release(); err != nil {
		return true, err
	}
	return true, nil
}

// stopTaking makes the service take no new connection or datagram and
// leaves the rest to the new process, which shares its listening socket:
// a TCP service closes its listener (the new process's copy keeps the
// socket and its backlog); a UDP service stops reading but keeps its
// socket, through which its open sessions answer their clients until they
// expire (closing it would drop every reply still on its way).
func (s *service) stopTaking() {
	if st, ok := s.att.(datapath.PacketReadStopper); ok && s.ln.pc != nil {
		st.StopReadingPackets()
		return
	}
	s.stopAccepting()
}

// releaseKernel closes the kernel side of the service's attachment (its
// state stays, KeepForRestart was called) so the new process can adopt
// it; the relay's side keeps carrying the streams in flight.
func (s *service) releaseKernel() {
	if kr, ok := s.att.(interface{ CloseKernel() error }); ok {
		if err := kr.CloseKernel(); err != nil {
			s.log.Error("release the kernel datapath for the new process", "err", err)
		}
	}
}

// stopProbing ends the service's node health probes.
func (s *service) stopProbing() {
	if s.stopHealth != nil {
		s.stopHealth()
		<-s.healthDone
		s.stopHealth = nil
	}
}

// closeUnclaimed closes the inherited sockets no service took (the new
// configuration dropped their service): their pending connections are
// refused, as a removed service's are.
func (d *Daemon) closeUnclaimed() {
	d.inheritMu.Lock()
	defer d.inheritMu.Unlock()
	for key, f := range d.opts.Inherited {
		d.log.Info("closing an inherited socket no service of this configuration listens on", "socket", key)
		f.Close()
		delete(d.opts.Inherited, key)
	}
}
