#!/usr/bin/env bash
# Install a single-node Slurm (Debian slurmctld + slurmd + slurm-client + munge). Idempotent: does
# nothing when the binaries are already there. Needs root (or sudo) and apt.
set -euo pipefail

need=(slurmctld slurmd sbatch squeue scancel srun sinfo munged mungekey)
missing=0
for b in "${need[@]}"; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$b" >/dev/null 2>&1 \
        || missing=1
done
if [[ $missing == 0 ]]; then
    echo "slurm already installed: $(slurmd -V 2>/dev/null || echo ?)"
    exit 0
fi

SUDO=""
[[ $(id -u) == 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Package scripts try to start the services; there is no systemd here, which is fine.
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
echo "installed: $(slurmd -V)"
