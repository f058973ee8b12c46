#!/usr/bin/env bash
# Debian packages that tests use as real components. Idempotent; does nothing when
# every package is already installed.
set -euo pipefail
packages=(slurmctld slurmd slurm-client munge procps chromium)  # Slurm cluster for tests/integration/test_slurm.py; pkill (train.sbatch); chromium renders the evaluate.py report page
[ ${#packages[@]} -eq 0 ] && exit 0
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && exit 0
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
