"""Two test processes at once (``scripts/test.sh`` runs ``pytest -n 2``, pytest-xdist).

Run one after another, the tests leave one of the two cores idle about half the time: many
wait on a model server, a Slurm time limit or a site starting. Two xdist workers fill it, under
these rules (a scheduler of our own: xdist's ``loadgroup`` marks do nothing under pytest 9,
whose node ids it can no longer rewrite):

- a module runs whole on one worker (its module-scoped model servers start once), and
- the modules that share one machine-wide resource run on one worker, one after another
  (``GROUPS``): the namespace Slurm cluster (fixed namespace names, addresses, slurmctld
  ports) and the offline Globus Compute pair (one broker and fake service per session).

Groups go out heaviest first (counted by slow tests), so the long ones do not start last and
leave a worker idle at the end. Without ``-n`` nothing changes but the check below.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

GROUPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "netns-slurm": (
        frozenset({"slurm", "slurm_cluster"}),
        frozenset({"tests/test_hosts_cluster.py", "tests/test_slurm_deployments.py",
                   "tests/test_slurm_jobs.py"})),
    "globus-offline": (
        frozenset({"globus_offline", "globus_closed", "globus_asserted"}),
        frozenset({"tests/test_campaign_globus.py", "tests/test_endpoint_registry.py",
                   "tests/test_flows_globus.py", "tests/test_globus_identity.py",
                   "tests/test_globus_real.py", "tests/test_globus_transport.py",
                   "tests/test_modes_sdk.py", "tests/test_user_functions.py"})),
}
"""Group -> (the session fixtures that make a test a member, the member modules). The
scheduler runs in the controller, which sees node ids only, so the modules are listed; every
collection checks the list against the fixtures the tests use (``check_groups``)."""

SLOW_WEIGHT = 50
"""A slow test weighs this many fast ones when groups are ordered (slow: seconds to a minute
each; fast: well under a second)."""


def scope_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its group's name, or its module."""
    module = nodeid.split("::")[0]
    return next((name for name, (_, modules) in GROUPS.items() if module in modules), module)


def check_groups(items: list[pytest.Item]) -> None:
    """Refuse a collection in which a module uses a group's fixture but is not listed in the
    group: under ``-n 2`` it could run beside the group and fight over the resource."""
    for item in items:
        module = item.nodeid.split("::")[0]
        used = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("slurm"):
            used.add("slurm")
        for name, (fixtures, modules) in GROUPS.items():
            if used & fixtures and module not in modules:
                raise pytest.UsageError(
                    f"{module} uses {sorted(used & fixtures)}: add it to group {name!r} "
                    "in tests/plugins/parallel.py (GROUPS)")


def order_for_workers(items: list[pytest.Item]) -> None:
    """Order the units of work heaviest first, each kept whole and in its own order; a stable
    sort, so every worker computes the same order (xdist requires identical collections)."""
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        units.setdefault(scope_of(item.nodeid), []).append(item)

    def weight(unit: list[pytest.Item]) -> int:
        return sum(SLOW_WEIGHT if i.get_closest_marker("slow") else 1 for i in unit)

    items[:] = [item for unit in sorted(units.values(), key=lambda u: -weight(u))
                for item in unit]


@pytest.hookimpl(trylast=True)  # after conftest.py's hook has marked the slow tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check the groups; in an xdist worker, order the units of work heaviest first."""
    check_groups(items)
    if hasattr(config, "workerinput"):
        order_for_workers(items)


class GroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with ``scope_of`` as the scope: whole modules, and the
    modules of a group together."""

    def _split_scope(self, nodeid: str) -> str:
        return scope_of(nodeid)


@pytest.hookimpl(tryfirst=True)  # before xdist's own choice of scheduler
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Our scheduler for every load-balancing ``--dist`` mode (``each`` stays xdist's)."""
    if config.getvalue("dist") == "each":
        return None
    return GroupScheduling(config, log)
