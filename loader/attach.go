package loader

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ebpfwd/ebpfwd/bpf"
	"github.com/ebpfwd/ebpfwd/netns"
)

// legacyFilterPriority is the cls_bpf filter priority of a legacy
// attachment: a fixed value so that Close deletes exactly our filter.
const legacyFilterPriority = 0xebf

// attachment is the program attached at one interface's ingress.
type attachment struct {
	ns      netns.NS
	ifname  string
	ifindex int
	link    link.Link             // tcx; nil for legacy
	filter  *netlink.BpfFilter    // legacy; nil for tcx
	qdisc   *netlink.GenericQdisc // the clsact qdisc, if we added it
	pinPath string
}

// Attachment describes where the program is attached.
type Attachment struct {
	Interface string
	Ifindex   int
	// Legacy is true for a clsact + cls_bpf attachment (no tcx).
	Legacy bool
	// PeerRedirect is true for a veth whose peer is in another namespace:
	// packets leaving through it take bpf_redirect_peer.
	PeerRedirect bool
}

// Attach attaches the program at the ingress of interface ifname inside
// namespace ns; attaching twice to the same interface is a no-op. Every
// interface where a service's clients or its nodes' replies arrive needs an
// attachment. All attachments of a Loader must be in one namespace.
func (l *Loader) Attach(ns netns.NS, ifname string) (Attachment, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return Attachment{}, errors.New("attach: loader is closed")
	}
	if l.ns != nil && l.ns.Path() != ns.Path() {
		return Attachment{}, fmt.Errorf("attach %s in netns %s: this instance serves netns %s only", ifname, ns, l.ns)
	}
	if a, ok := l.attached[ifname]; ok {
		return a.describe(l), nil
	}

	a := &attachment{ns: ns, ifname: ifname}
	var peer bool
	err := ns.Do(func() error {
		lnk, err := netlink.LinkByName(ifname)
		if err != nil {
			return fmt.Errorf("find interface: %w", err)
		}
		attrs := lnk.Attrs()
		if attrs.EncapType != "ether" {
			// The program parses an Ethernet header at offset 0.
			return fmt.Errorf("interface type %s: only Ethernet devices are supported", attrs.EncapType)
		}
		a.ifindex = attrs.Index
		peer = PeerElsewhere(lnk)
		return l.attachHere(a)
	})
	if err != nil {
		return Attachment{}, fmt.Errorf("attach NAT program to %s in netns %s: %w", ifname, ns, err)
	}
	flags := uint32(0)
	if peer {
		flags = uint32(bpf.NATIfaceFlagsIFACE_PEER_REDIRECT)
	}
	if err := l.objs.EbpfwdIfaces.Put(uint32(a.ifindex), flags); err != nil {
		_ = a.detach()
		return Attachment{}, fmt.Errorf("record interface %s (ifindex %d): %w", ifname, a.ifindex, err)
	}
	if l.ns == nil {
		l.ns = &ns
	}
	l.attached[ifname] = a
	return a.describe(l), nil
}

// PeerElsewhere reports whether lnk is a veth whose peer is in another
// namespace: packets the program sends out through it may take
// bpf_redirect_peer, straight into the peer's namespace.
func PeerElsewhere(lnk netlink.Link) bool {
	_, isVeth := lnk.(*netlink.Veth)
	return isVeth && lnk.Attrs().NetNsID >= 0
}

// SetPeerRedirect updates what Attach recorded about an attached veth: its
// peer moved to another namespace (or back) after the program was
// attached, as when a container's end is moved after the host end came
// up. It reports whether anything changed; an interface that is not
// attached is no error and no change.
func (l *Loader) SetPeerRedirect(ifname string, on bool) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	a, ok := l.attached[ifname]
	if !ok || l.closed {
		return false, nil
	}
	var flags uint32
	if err := l.objs.EbpfwdIfaces.Lookup(uint32(a.ifindex), &flags); err != nil {
		return false, fmt.Errorf("read flags of interface %s (ifindex %d): %w", ifname, a.ifindex, err)
	}
	want := flags &^ uint32(bpf.NATIfaceFlagsIFACE_PEER_REDIRECT)
	if on {
		want |= uint32(bpf.NATIfaceFlagsIFACE_PEER_REDIRECT)
	}
	if want == flags {
		return false, nil
	}
	if err := l.objs.EbpfwdIfaces.Put(uint32(a.ifindex), want); err != nil {
		return false, fmt.Errorf("update flags of interface %s (ifindex %d): %w", ifname, a.ifindex, err)
	}
	return true, nil
}

// Detach removes the program from interface ifname (attached by Attach),
// for an interface that is about to go away while the Loader stays, such
// as a splice link whose last service closed. Detaching an interface that
// is not attached is a no-op.
func (l *Loader) Detach(ifname string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	a, ok := l.attached[ifname]
	if !ok || l.closed {
		return nil
	}
	delete(l.attached, ifname)
	// Flows through the interface are gone with it; the program must not
	// take a later interface that reuses the index for a peer veth.
	if err := l.objs.EbpfwdIfaces.Delete(uint32(a.ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		_ = a.detach()
		return fmt.Errorf("forget interface %s (ifindex %d): %w", ifname, a.ifindex, err)
	}
	if err := a.detach(); err != nil {
		return fmt.Errorf("detach NAT program from %s: %w", ifname, err)
	}
	return nil
}

func (a *attachment) describe(l *Loader) Attachment {
	var flags uint32
	_ = l.objs.EbpfwdIfaces.Lookup(uint32(a.ifindex), &flags)
	return Attachment{
		Interface:    a.ifname,
		Ifindex:      a.ifindex,
		Legacy:       a.filter != nil,
		PeerRedirect: flags&uint32(bpf.NATIfaceFlagsIFACE_PEER_REDIRECT) != 0,
	}
}

// attachHere attaches in the calling thread's namespace (inside ns.Do).
func (l *Loader) attachHere(a *attachment) error {
	if l.cfg.Attach != AttachLegacy {
		adopted, err := l.adoptLink(a)
		if err != nil {
			return err
		}
		if adopted {
			return nil
		}
		lnk, err := link.AttachTCX(link.TCXOptions{
			Interface: a.ifindex,
			Program:   l.objs.EbpfwdNat,
			Attach:    ebpf.AttachTCXIngress,
		})
		if err == nil {
			// The pin keeps the attachment alive if the process dies, and
			// is how a later run finds and removes it.
			a.pinPath = filepath.Join(l.pinDir, linkPinName(a.ifname, a.ifindex))
			if err := lnk.Pin(a.pinPath); err != nil {
				lnk.Close()
				return fmt.Errorf("pin tcx link at %s: %w", a.pinPath, err)
			}
			a.link = lnk
			return nil
		}
		if l.cfg.Attach == AttachTCX || !errors.Is(err, ebpf.ErrNotSupported) {
			return fmt.Errorf("attach tcx ingress: %w", err)
		}
	}
	return a.attachLegacy(l.objs.EbpfwdNat)
}

// attachLegacy adds a clsact qdisc (if missing) and a direct-action cls_bpf
// filter at ingress. Netlink filters cannot be pinned: they live with the
// interface until deleted. A filter a previous run left (restart or crash)
// is replaced in place, which swaps the program atomically.
func (a *attachment) attachLegacy(prog *ebpf.Program) error {
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: a.ifindex,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	switch err := netlink.QdiscAdd(qdisc); {
	case err == nil:
		a.qdisc = qdisc
	case !errors.Is(err, unix.EEXIST):
		return fmt.Errorf("add clsact qdisc: %w", err)
	}
	filter := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: a.ifindex,
			Parent:    netlink.HANDLE_MIN_INGRESS,
			Handle:    1,
			Protocol:  unix.ETH_P_ALL,
			Priority:  legacyFilterPriority,
		},
		Fd:           prog.FD(),
		Name:         "ebpfwd_nat",
		DirectAction: true,
	}
	if err := netlink.FilterReplace(filter); err != nil {
		return fmt.Errorf("add cls_bpf ingress filter: %w", err)
	}
	a.filter = filter
	return nil
}

// detach removes the attachment. An interface that is already gone (its
// namespace deleted) took the attachment with it.
func (a *attachment) detach() error {
	if a.link != nil {
		if err := a.link.Unpin(); err != nil && !errors.Is(err, os.ErrNotExist) {
			a.link.Close()
			return fmt.Errorf("unpin tcx link of %s: %w", a.ifname, err)
		}
		if err := a.link.Close(); err != nil {
			return fmt.Errorf("detach tcx link of %s: %w", a.ifname, err)
		}
		return nil
	}
	err := a.ns.Do(func() error {
		if _, err := net.InterfaceByIndex(a.ifindex); err != nil {
			return nil // interface gone, filter with it
		}
		if err := netlink.FilterDel(a.filter); err != nil {
			return err
		}
		if a.qdisc != nil {
			// We created it for our filter: leave the interface as we found it.
			return netlink.QdiscDel(a.qdisc)
		}
		return nil
	})
	if err != nil && !errors.Is(err, netns.ErrGone) {
		return fmt.Errorf("delete cls_bpf filter of %s in netns %s: %w", a.ifname, a.ns, err)
	}
	return nil
}
