package tc

import (
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// spliceRef is a splice link from the loader's namespace and the services
// using it.
type spliceRef struct {
	link *splice.Link
	refs int
}

// acquireSplice returns the splice link from nl's namespace to out,
// creating it and attaching the program to its listen end on first use:
// the nodes' replies arrive there.
func (d *Datapath) acquireSplice(nl *nsLoader, out netns.NS) (*spliceRef, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	outID, err := out.ID()
	if err != nil {
		return nil, err
	}
	if r, ok := nl.splices[outID]; ok {
		r.refs++
		return r, nil
	}
	if d.links == nil {
		links, err := splice.NewLinks(d.Instance, d.SplicePool, d.logger())
		if err != nil {
			return nil, err
		}
		d.links = links
	}
	link, err := d.links.Create(nl.ns, out)
	if err != nil {
		return nil, err
	}
	if _, err := nl.l.Attach(nl.ns, link.Name); err != nil {
		if derr := d.links.Delete(link); derr != nil {
			d.logger().Error("remove splice link after failed attach", "link", link.Name, "err", derr)
		}
		return nil, err
	}
	r := &spliceRef{link: link, refs: 1}
	if nl.splices == nil {
		nl.splices = map[netns.ID]*spliceRef{}
	}
	nl.splices[outID] = r
	return r, nil
}

// releaseSplice drops a service's use of a splice link (nil: none) and,
// with its last service, detaches the program from it and removes it.
func (d *Datapath) releaseSplice(nl *nsLoader, r *spliceRef) {
	if r == nil {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	r.refs--
	if r.refs > 0 {
		return
	}
	if d.keep {
		// The link stays for the next run, and the program on it too.
		for k, v := range nl.splices {
			if v == r {
				delete(nl.splices, k)
			}
		}
		return
	}
	d.removeSplice(nl, r)
}

// removeSplice detaches and deletes a splice link; d.mu is held.
func (d *Datapath) removeSplice(nl *nsLoader, r *spliceRef) {
	for k, v := range nl.splices {
		if v == r {
			delete(nl.splices, k)
		}
	}
	// Detach first: the pinned tcx link would otherwise outlive the
	// interface in bpffs until the loader closes.
	if err := nl.l.Detach(r.link.Name); err != nil {
		d.logger().Error("detach tc datapath from splice link", "link", r.link.Name, "err", err)
	}
	if err := d.links.Delete(r.link); err != nil {
		d.logger().Error("remove splice link", "link", r.link.Name, "err", err)
	}
}
