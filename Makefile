# ebpfwd — build, test and demo. `make test` and `make demo` need root
# (they create network namespaces).

GO      ?= go
BIN     := bin/ebpfwd
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# How much each fuzz target runs in `make test`: enough to catch a shallow
# panic on every change, short enough for CI. Counts of executions, not
# durations: with a duration, Go 1.26's fuzz coordinator can report its own
# deadline as a failure ("context deadline exceeded", no crasher written)
# when a loaded machine starves its workers (golang/go#75804, fixed in Go
# 1.27). Each count is 5-10 s of its target on a busy 2-CPU machine;
# FUZZTIME=30s (say) sets one duration for all of them instead.
FUZZ_CONFIG     ?= 20000x
FUZZ_CONNECT    ?= 100000x
FUZZ_PROXYPROTO ?= 200000x
FUZZ_HTTPPROXY  ?= 200x

.PHONY: build test unit e2e topologies fuzz demo generate check-generate lint clean need-root bench soak image

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/ebpfwd

need-root:
	@[ "$$(id -u)" = 0 ] || { echo "this target needs root: it creates network namespaces (run it as root)"; exit 1; }

# The README's test command: lint, unit and end-to-end tests, then a short
# run of every fuzz target.
test: need-root lint build unit e2e fuzz

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v -e /test$$ -e /test/topologies$$ -e /test/soak$$)

# End-to-end tests: ./test/ (features) and ./test/topologies/ (the seeds'
# network layouts, docs/TOPOLOGIES.md).
e2e:
	$(GO) test -count=1 -timeout 15m ./test/ ./test/topologies/

# Just the seeds' topologies on every datapath (docs/TOPOLOGIES.md); they
# need iptables inside their namespaces.
topologies: need-root
	@command -v iptables >/dev/null || { echo "make topologies needs iptables: apt-get install iptables"; exit 1; }
	$(GO) test -count=1 -timeout 5m -v ./test/topologies/

fuzz:
	$(GO) test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(or $(FUZZTIME),$(FUZZ_CONFIG)) ./config
	$(GO) test -run='^$$' -fuzz='^FuzzReadResponse$$' -fuzztime=$(or $(FUZZTIME),$(FUZZ_CONNECT)) ./userspace/httpconnect
	$(GO) test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(or $(FUZZTIME),$(FUZZ_PROXYPROTO)) ./userspace/proxyproto
	$(GO) test -run='^$$' -fuzz='^FuzzServeRequest$$' -fuzztime=$(or $(FUZZTIME),$(FUZZ_HTTPPROXY)) ./userspace/httpproxy

demo: need-root build
	$(GO) run ./test/demo -ebpfwd $(BIN) -config docs/examples/seed000.yaml

# Side-by-side benchmark of every datapath against the kernel's own paths
# (docs/BENCHMARKS.md). BENCH_QUICK=1: one short run; BENCH_WRITE=1: also
# rewrite docs/BENCHMARKS.md (full mode only). Installs iperf3, iptables
# and haproxy from Debian when they are missing; haproxy only makes the
# HAProxy columns, so failing to install it skips them instead of the run.
bench: need-root build
	@command -v iperf3 >/dev/null && command -v iptables >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 iptables; }
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; } || \
	  echo "make bench: haproxy could not be installed; the report leaves the HAProxy columns out"
	$(GO) run ./test/bench -ebpfwd $(BIN) $(if $(filter 1,$(BENCH_QUICK)),-quick) $(if $(filter 1,$(BENCH_WRITE)),-write docs/BENCHMARKS.md)

# Long mixed traffic on every datapath with reloads, upgrades and crashes in
# turn (docs/RELIABILITY.md keeps the latest result); not part of make test.
# SOAK sets the length, SOAK_EVERY the time between events.
SOAK ?= 30m
SOAK_EVERY ?= 3m
soak: need-root build
	$(GO) test -count=1 -v -timeout 2h -run '^TestSoak$$' ./test/soak -soak.duration=$(SOAK) -soak.every=$(SOAK_EVERY) -soak.report=$(CURDIR)/docs/RELIABILITY.md

# BPF objects and bindings are committed; this regenerates them. It needs
# clang-19 and llvm-19 (llvm-strip-19) from Debian bookworm; the compiler is
# pinned in bpf/gen.go, the headers are vendored in bpf/headers/, so the
# output is the same bit for bit on any machine and in any checkout
# directory (bpf/README.md).
generate:
	@command -v clang-19 >/dev/null && command -v llvm-strip-19 >/dev/null || \
	  { echo "make generate needs clang-19 and llvm-strip-19: apt-get install clang-19 llvm-19"; exit 1; }
	$(GO) generate ./...

# The committed BPF objects and bindings must be what the committed sources
# make: regenerate, and fail if that changed them (CI runs this).
check-generate: generate
	@git diff --exit-code --stat -- 'bpf/*_bpfel.go' 'bpf/*_bpfel.o' || \
	  { echo "the generated BPF files differ from bpf/*.c: run make generate and commit the result"; exit 1; }

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	 [ -z "$$out" ] || { echo "gofmt would change:"; echo "$$out"; exit 1; }
	$(GO) vet ./...

# The container image (Containerfile) for deploy/kubernetes, with the first
# builder found; IMAGE names it. The build pulls golang and debian images,
# so it needs a registry.
IMAGE ?= ebpfwd:$(VERSION)
image:
	@if command -v podman >/dev/null; then b="podman build"; \
	 elif command -v buildah >/dev/null; then b="buildah bud"; \
	 elif command -v docker >/dev/null; then b="docker build"; \
	 else echo "make image needs a container builder: podman, buildah or docker (none is installed)"; exit 1; fi; \
	 echo "$$b -f Containerfile --build-arg VERSION=$(VERSION) -t $(IMAGE) ."; \
	 $$b -f Containerfile --build-arg VERSION=$(VERSION) -t $(IMAGE) .

clean:
	rm -rf bin
