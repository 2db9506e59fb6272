#!/bin/sh
# A Debian base image for deploy/Dockerfile where no image registry can be reached (this project's
# machines, CI): Debian bookworm minbase with python3 (3.11, as python:3.11-slim) and its venv module,
# made from Debian's packages with debootstrap and loaded with `docker import`.
#
#   sh deploy/docker-base.sh [IMAGE]       # default IMAGE: bridgepool-base:bookworm
#
# The root filesystem's tarball is cached (BRIDGEPOOL_CACHE, default /var/cache/bridgepool) so a
# second engine, or a fresh data root in CI, imports it in seconds instead of ~35 s of debootstrap.
# Needs root (debootstrap), debootstrap and a Docker engine ($DOCKER_HOST).
set -eu
IMAGE="${1:-bridgepool-base:bookworm}"
CACHE="${BRIDGEPOOL_CACHE:-/var/cache/bridgepool}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TARBALL="$CACHE/base-bookworm.tar"
DOCKER="${DOCKER:-docker}"

if "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE: already in the engine"
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null || { echo "deploy/docker-base.sh: debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
  mkdir -p "$CACHE"
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  echo "base image $IMAGE: debootstrap bookworm into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # What a base image needs no copy of: package lists and caches (the Dockerfile's apt-get update
  # fetches fresh lists), documentation is kept (the man pages are the demo corpora).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  echo "deb $MIRROR bookworm main" >"$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
fi
echo "base image $IMAGE: docker import $TARBALL"
"$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$TARBALL" "$IMAGE" >/dev/null
