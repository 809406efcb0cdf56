#!/usr/bin/env bash
# The test suite: install, start what the tests need (a real Slurm when it can be installed),
# lint and type-check, then pytest. Exit code is non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # The Slurm tests need slurmctld/slurmd/munge; under CI=true a missing Slurm fails them.
  bash tests/slurm/install.sh >/dev/null 2>&1 || echo "warning: could not install Slurm" >&2
  # The offline Globus Compute tests need RabbitMQ; under CI=true a missing broker fails them.
  bash tests/globus_offline/install.sh >/dev/null 2>&1 || echo "warning: could not install RabbitMQ" >&2
  # The metrics tests scrape with a real Prometheus; under CI=true a missing one fails them.
  bash tests/prometheus/install.sh >/dev/null 2>&1 || echo "warning: could not install Prometheus" >&2
fi
ruff check fabric tests benchmarks examples
mypy
set +e
# --all: every tier (slow tests too), with or without CI=true. -n 2: two test processes, which
# keep both cores busy while tests wait on servers and Slurm (tests/plugins/parallel.py says
# which tests share a process); pass -n 0 to run them one after another.
python -m pytest -q -p no:cacheprovider --all -n 2 "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
