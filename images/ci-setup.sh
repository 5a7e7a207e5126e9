#!/usr/bin/env bash
# Prepare a fresh machine for the docker runner and its tests (idempotent, cached):
#   1. install docker.io and debootstrap when missing,
#   2. start dockerd in the background when no daemon answers,
#   3. build the offline base image (images/offline-base.sh) when it is missing.
# Method and eval images are built by `llmcbench images build` (the docker tests do it),
# tagged by the hash of their inputs, so a machine that still has them reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "installing docker.io and debootstrap"
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q docker.io debootstrap >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /tmp/llmcbench-dockerd.log)"
  $SUDO sh -c 'nohup dockerd >/tmp/llmcbench-dockerd.log 2>&1 &'
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/llmcbench-dockerd.log >&2; echo "dockerd did not start" >&2; exit 1; }
fi
echo "docker daemon $(docker version --format '{{.Server.Version}}') is up"

$SUDO images/offline-base.sh
