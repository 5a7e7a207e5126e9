#!/usr/bin/env bash
# Build the offline base image for machines that cannot pull from a registry (CI here):
# a Debian bookworm minbase rootfs with python3, venv, pip, ca-certificates and libnuma1 (vLLM's
# CPU build loads it) made by debootstrap, then `docker import`ed. Idempotent: nothing happens
# when the image exists. The tag's suffix changes with the package list (bookworm-2: + libnuma1).
#
#   images/offline-base.sh [TAG]          (default llmcbench/offline-base:bookworm-2)
#
# Python is bookworm's 3.11, the host's minor version on this project's machines, so the
# wheels `llmcbench images build` downloads on the host install inside the images.
set -euo pipefail
TAG="${1:-${LLMCBENCH_OFFLINE_BASE:-llmcbench/offline-base:bookworm-2}}"
SUITE="${DEBOOTSTRAP_SUITE:-bookworm}"
MIRROR="${DEBOOTSTRAP_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "offline base $TAG already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed: apt-get install -y debootstrap" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "debootstrap needs root: run this script with sudo" >&2; exit 2; }

ROOTFS="$(mktemp -d /tmp/llmcbench-rootfs.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT
t0=$(date +%s)
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libnuma1 \
  "$SUITE" "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; rm -f "$ROOTFS.log"; exit 1; }
rm -f "$ROOTFS.log"
# Trim what a container never uses: apt lists and caches, docs, man pages, locales.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/locale/*
tar -C "$ROOTFS" -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV LANG=C.UTF-8' \
  -c 'CMD ["/bin/bash"]' \
  -m "debootstrap --variant=minbase $SUITE (python3, python3-venv, python3-pip, ca-certificates, libnuma1)" \
  - "$TAG" >/dev/null
echo "offline base $TAG built in $(( $(date +%s) - t0 )) s: $(docker run --rm --network none "$TAG" python3 --version)"
