"""Shared pytest set-up. Fixtures live in ``tests/plugins/`` (one module per area).

Tests run in two tiers. ``pytest`` alone runs the fast tier: unit tests and tiny models, a few
minutes on two cores. Tests marked ``slow`` (a site process, a model server, Parsl, SmolLM2, a
Slurm cluster, over ~3 s; also any test using a fixture in ``SLOW_FIXTURES``)
are deselected there, and the summary says how many and how to run them. Everything runs under
``pytest --all``, ``CI=true`` (what ``scripts/test.sh`` and ``.ci/run`` do), any ``-m``
expression (``-m slow`` runs everything, like ``--all``) or when test files or node ids are named.
Deselected tests are not counted as passed or skipped: they did not run, and the line says so.
"""

from __future__ import annotations

import os

import pytest

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
    "tests.plugins.globus_offline",
    "tests.plugins.parallel",
]

SLOW_FIXTURES = frozenset({"local_site", "site_transport", "model_server", "smollm2_dir", "slurm",
                           "slurm_cluster", "globus_offline", "globus_closed", "globus_asserted"})
"""Fixtures that start a site, a model server, SmolLM2, Slurm or the offline Globus Compute
pair (broker, fake service, endpoint daemons): a test using one is slow."""
_DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help="run every tier (slow tests too); CI=true does the same")


def pytest_configure(config: pytest.Config) -> None:
    # `pytest -m slow` means "the slow tests too" (issue 13): everything, not the slow tier alone.
    if (config.getoption("markexpr") or "").strip() == "slow":
        config.option.markexpr = ""
        config.option.all_tiers = True


def _every_tier(config: pytest.Config) -> bool:
    """True when slow tests run too (see the module docstring)."""
    if config.getoption("all_tiers") or (env.CI.get() or "").lower() == "true":
        return True
    if config.getoption("markexpr"):
        return True  # the caller chose by marker: that expression alone decides
    # Files or node ids named on the command line run as named; directories get the fast tier.
    return any(not os.path.isdir(arg.split("::")[0]) for arg in config.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) \
                or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.slow)
    if _every_tier(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        kept = [item for item in items if not item.get_closest_marker("slow")]
        config.hook.pytest_deselected(items=slow)
        items[:] = kept
    config.stash[_DESELECTED] = len(slow)


def pytest_report_collectionfinish(config: pytest.Config) -> str | None:
    count = config.stash.get(_DESELECTED, 0)
    if not count:
        return None
    return (f"fast tier: {count} slow tests deselected (not run); run everything with "
            "`pytest --all`, `pytest -m slow` or CI=true")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    line = pytest_report_collectionfinish(config)
    if line:
        terminalreporter.write_line(line, yellow=True)
