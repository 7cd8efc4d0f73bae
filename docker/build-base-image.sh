#!/usr/bin/env bash
# Build the local base image `pllava-base:bookworm` (Debian bookworm + Python 3.11, venv, pip,
# CA certificates, libgomp1) with debootstrap, for machines that cannot pull
# `python:3.11-slim` from a registry. Needs root, debootstrap and a running Docker engine.
#
#   docker/build-base-image.sh [TAG]          # default tag: pllava-base:bookworm
#   DEBIAN_MIRROR=http://deb.debian.org/debian docker/build-base-image.sh
#
# The mirror defaults to the Debian mirror apt on this machine already uses (read from
# /etc/apt/sources.list and /etc/apt/sources.list.d/), so it works wherever apt works.
set -euo pipefail

TAG=${1:-pllava-base:bookworm}
SUITE=bookworm
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1

# The first Debian (not -security) mirror in apt's sources, one-line or deb822 format.
apt_mirror() {
    local files=() f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] && files+=("$f")
    done
    [[ ${#files[@]} -gt 0 ]] || return 0
    awk '
        /^[[:space:]]*#/ { next }
        $1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:\/\//) { print $i; break } }
        $1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }
    ' "${files[@]}" | grep -E '/debian/?$' | head -n 1
}

MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }

ROOTFS=$(mktemp -d /tmp/pllava-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"

# Keep the image small: no package cache, no downloaded lists.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*

tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG"
docker run --rm "$TAG" python3 --version
echo "built $TAG"
