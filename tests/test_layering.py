"""Imports run one way: the client never reaches the engine; the engine never reaches Globus."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "fabric"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_client_never_imports_engine() -> None:
    assert offenders("client", ("fabric.engine",)) == {}


@pytest.mark.parametrize("package", ["engine"])
def test_engine_never_imports_globus(package: str) -> None:
    assert offenders(package, ("globus_sdk", "globus_compute", "fabric.globus")) == {}


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from fabric.engine import server\n    import globus_sdk\n")
    assert imported_modules(probe) >= {"fabric.engine", "globus_sdk"}


def test_campaign_never_imports_endpoint() -> None:
    """The campaign ships ``run_shard`` by reference (``fabric.functionref``); it has no
    import of the site's code."""
    assert offenders("campaign", ("fabric.endpoint",)) == {}


def test_endpoint_modules_do_not_reach_each_other_through_importlib() -> None:
    """The policy reads the endpoint-function registry, not another module's globals."""
    policy = ROOT / "endpoint" / "policy.py"
    assert "importlib" not in imported_modules(policy)
    assert "importlib" not in policy.read_text()
