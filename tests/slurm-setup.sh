#!/usr/bin/env bash
# Slurm's daemons and client commands (Debian packages) for tests/test_slurm.py, which brings
# up its own single-node cluster from them (tests/slurm_cluster.py) and stops it afterwards.
# Nothing is started here and no system config is touched. Idempotent.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq slurm-wlm munge >/dev/null
slurmctld -V   # (sbatch --version needs a slurm.conf, which only the tests write)
