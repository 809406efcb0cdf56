#!/usr/bin/env bash
# Install Slurm (Debian slurmctld + slurmd + slurm-client + munge) and what the namespace cluster
# of the tests needs (ip from iproute2; nsenter and unshare from util-linux). Idempotent: does
# nothing when the binaries are already there. Needs root (or sudo) and apt.
set -euo pipefail

need=(slurmctld slurmd sbatch squeue scancel srun sinfo scontrol munged mungekey ip nsenter unshare)
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
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge \
    iproute2 util-linux
echo "installed: $(slurmd -V)"
