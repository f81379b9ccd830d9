// Restart in place: a daemon that re-executes itself calls KeepForRestart
// before it closes its services; the program stays attached, the maps stay
// pinned and the splice links stay, so established flows keep going while
// no process runs. The next run's Setup takes all of it over (see loader
// and splice), and FinishSetup then removes what that run does not need.

package tc

import (
	"errors"
	"fmt"

	"github.com/ebpfwd/ebpfwd/loader"
	"github.com/ebpfwd/ebpfwd/netns"
	"github.com/ebpfwd/ebpfwd/tc/splice"
)

// KeepForRestart makes closing keep the kernel's state: from now on,
// closing a service leaves it in the maps, closing a namespace's last
// service releases the program without detaching it or unpinning its maps,
// and splice links stay. A daemon calls it before it closes its services
// to re-execute itself; the next run adopts the state and keeps the flows.
func (d *Datapath) KeepForRestart() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.keep = true
}

func (d *Datapath) keeping() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.keep
}

// FinishSetup removes what a previous run of the instance left and this
// run does not need, once every service is set up: in each namespace with
// services, the services the configuration dropped (their flows expire)
// and the program's links on interfaces that are gone or unused; in every
// namespace the previous run served and this one does not, the program and
// its pins; splice links of the instance no service uses. It does nothing
// on a first start.
// Errors are returned after every cleanup was tried.
func (d *Datapath) FinishSetup() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var errs []error
	var nss []netns.NS
	serving := make([]netns.ID, 0, len(d.loaders))
	for _, nl := range d.loaders {
		nss = append(nss, nl.ns)
		serving = append(serving, nl.id)
		keep := make([]loader.ServiceID, 0, len(nl.services))
		for id := range nl.services {
			keep = append(keep, id)
		}
		if _, err := nl.l.PruneServices(keep); err != nil {
			errs = append(errs, err)
		}
		if _, err := nl.l.PruneLinks(); err != nil {
			errs = append(errs, err)
		}
	}
	// Namespaces a previous run served and this one does not: their
	// program is detached and their pins go, and so do the splice links
	// that started there.
	pruned, err := loader.PruneNamespaces(loader.Config{Instance: d.Instance, Logger: d.logger()}, serving)
	if err != nil {
		errs = append(errs, err)
	}
	for _, ns := range pruned {
		if err := restoreLeftPorts(d.sys(), d.Instance, ns); err != nil {
			errs = append(errs, err)
		}
	}
	nss = append(nss, pruned...)
	if len(nss) > 0 {
		if d.links == nil {
			links, err := splice.NewLinks(d.Instance, d.SplicePool, d.logger())
			if err != nil {
				return errors.Join(append(errs, err)...)
			}
			d.links = links
		}
		if err := d.links.RemoveUnused(nss...); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tc datapath: clean up after a previous run: %w", err)
	}
	return nil
}
