"""Shared pytest set-up. Fixtures live in ``tests/plugins/`` (one module per area)."""

import os

# Keep every test's torch and DeepSpeed on the CPU and quiet, whatever the shell says.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.plugins.models",
    "tests.plugins.slurm",
    "tests.plugins.site",
    "tests.plugins.servers",
    "tests.plugins.globus_offline",
]
