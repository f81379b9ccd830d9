package relay

import (
	"testing"
	"time"
)

// schedProbe measures how late goroutines of this process get to run while
// a timing-sensitive test attempt is in progress: it sleeps in short steps
// and records the worst overshoot.
type schedProbe struct {
	stop  chan struct{}
	worst chan time.Duration
}

func startSchedProbe() *schedProbe {
	p := &schedProbe{stop: make(chan struct{}), worst: make(chan time.Duration, 1)}
	go func() {
		const step = 5 * time.Millisecond
		var worst time.Duration
		for {
			select {
			case <-p.stop:
				p.worst <- worst
				return
			default:
			}
			begin := time.Now()
			time.Sleep(step)
			worst = max(worst, time.Since(begin)-step)
		}
	}()
	return p
}

// Stop ends the probe and returns the worst scheduling delay seen.
func (p *schedProbe) Stop() time.Duration {
	close(p.stop)
	return <-p.worst
}

// retryIfStalled runs a timing-sensitive attempt. A failed attempt is retried
// (up to five attempts) only when the scheduler visibly stalled for at
// least tolerance during it, i.e. the machine was too loaded to judge the
// timing; a failure on a responsive machine fails the test at once.
func retryIfStalled(t *testing.T, tolerance time.Duration, attempt func(t *testing.T) error) {
	t.Helper()
	const attempts = 5
	for i := 1; ; i++ {
		probe := startSchedProbe()
		err := attempt(t)
		stall := probe.Stop()
		if err == nil {
			return
		}
		if stall < tolerance || i == attempts {
			t.Fatalf("attempt %d (worst scheduler stall %v): %v", i, stall, err)
		}
		t.Logf("attempt %d inconclusive, scheduler stalled %v (tolerance %v): %v", i, stall, tolerance, err)
	}
}
