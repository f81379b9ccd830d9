#!/usr/bin/env bash
# Vendors the kernel uapi and libbpf headers that the BPF programs in bpf/
# include, so that `make generate` never reads the build machine's
# /usr/include (bpf/README.md says why).
#
# The headers come from two pinned Debian packages, fetched with apt-get
# download (the machine's apt sources must carry the pinned versions):
# linux-libc-dev (linux/, asm/, asm-generic/) and libbpf-dev (bpf/). Only
# the headers the programs actually include, directly or not, are copied:
# the compiler lists them (clang -M) while it reads the extracted packages.
#
# Usage: bpf/headers/update.sh [-k]; then `make generate` and commit both.
# -k keeps the headers already vendored that the programs no longer include.
# LINUX_LIBC_DEV and LIBBPF_DEV override the pinned versions.
set -euo pipefail

LINUX_LIBC_DEV=${LINUX_LIBC_DEV:-6.1.192-3}
LIBBPF_DEV=${LIBBPF_DEV:-1:1.1.2-0+deb12u1}
CLANG=${CLANG:-clang-19}
# The multiarch directory of the one target the programs are built for
# (bpf2go -target amd64); its asm/ is vendored as plain asm/.
MULTIARCH=x86_64-linux-gnu

keep=false
[ "${1:-}" = -k ] && keep=true

here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp" # apt-get download fetches as the _apt user where it can

(cd "$tmp" && apt-get download -q "linux-libc-dev=$LINUX_LIBC_DEV" "libbpf-dev=$LIBBPF_DEV")
for deb in "$tmp"/*.deb; do
	dpkg-deb -x "$deb" "$tmp/root"
done
inc=$tmp/root/usr/include

# Every header of every program, as the compiler resolves it against the
# extracted packages only (-nostdinc: nothing from this machine).
deps=$(for src in "$here"/../*.c; do
	"$CLANG" -target bpfel -D__TARGET_ARCH_x86 -nostdinc \
		-isystem "$inc/$MULTIARCH" -isystem "$inc" -M -MT x "$src"
done | tr ' \\' '\n\n' | grep "^$inc/" | sort -u)
[ -n "$deps" ] || { echo "update.sh: no headers found" >&2; exit 1; }

if ! $keep; then
	rm -rf "$here/linux" "$here/asm" "$here/asm-generic" "$here/bpf"
fi
for f in $deps; do
	rel=${f#"$inc/"}
	rel=${rel#"$MULTIARCH/"}
	mkdir -p "$here/$(dirname "$rel")"
	cp "$f" "$here/$rel"
done

{
	echo "# Written by update.sh: the Debian packages (package=version sha256) the headers come from."
	for deb in "$tmp"/*.deb; do
		echo "$(dpkg-deb -W --showformat='${Package}=${Version}' "$deb") $(sha256sum <"$deb" | cut -d' ' -f1)"
	done | sort
} >"$here/SOURCES"
echo "vendored $(echo "$deps" | wc -l) headers from:"
tail -n +2 "$here/SOURCES"
