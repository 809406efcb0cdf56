"""Shared pytest set-up. Fixtures live in ``tests/plugins/`` (one module per area)."""

from fabric import env

# Keep in-process torch and DeepSpeed on the CPU and quiet, whatever the shell says (a model
# server picks its accelerator from its plan: fabric.engine.launch.select_accelerator).
env.DS_ACCELERATOR.setdefault("cpu")
env.TOKENIZERS_PARALLELISM.setdefault("false")

pytest_plugins = [
    "tests.plugins.models",
    "tests.plugins.slurm",
    "tests.plugins.site",
    "tests.plugins.servers",
]
