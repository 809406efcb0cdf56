"""``fabric.env`` names every environment variable the fabric reads, and code reads them there.

The scan parses every module of the package and finds each ``os.environ`` / ``os.getenv`` use
whose variable name is a string literal (or a module-level string constant): each name must be
declared in ``fabric.env``, and outside ``env.py`` (and ``PENDING``) no such use may remain, so a
new variable cannot hide in a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fabric import env

ROOT = Path(__file__).resolve().parent.parent / "fabric"

PENDING: set[str] = set()
"""Modules still reading a declared variable through ``os.environ`` by name: they were being
rewritten when ``fabric.env`` was introduced (the integrator switches them and empties this)."""


def _is_environ(node: ast.expr) -> bool:
    """``os.environ`` or a bare ``environ``."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
        (isinstance(node, ast.Name) and node.id == "environ")


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "string"`` assignments."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            out.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
    return out


def env_names(source: str) -> set[str]:
    """Variable names a module reads or writes through ``os.environ``/``os.getenv`` by name."""
    tree = ast.parse(source)
    consts = _constants(tree)

    def name_of(arg: ast.expr) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.Name):
            return consts.get(arg.id)
        return None  # computed at run time (e.g. a site policy's client_secret_env)

    found: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            found.add(name_of(node.slice))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = node.func
            if (_is_environ(f.value) and f.attr in ("get", "setdefault", "pop")) or (
                    isinstance(f.value, ast.Name) and f.value.id == "os"
                    and f.attr in ("getenv", "putenv", "unsetenv")):
                found.add(name_of(node.args[0]))
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            found.add(name_of(node.left))
    return {n for n in found if n is not None}


def _package_reads() -> dict[str, set[str]]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        names = env_names(path.read_text())
        if names:
            out[str(path.relative_to(ROOT))] = names
    return out


def test_every_variable_read_in_the_package_is_declared() -> None:
    undeclared = {mod: sorted(n for n in names if n not in env.ENV)
                  for mod, names in _package_reads().items()}
    assert {mod: names for mod, names in undeclared.items() if names} == {}


def test_modules_use_the_accessors_not_os_environ_by_name() -> None:
    direct = set(_package_reads()) - {"env.py"}
    assert direct <= PENDING, f"read these through fabric.env: {sorted(direct - PENDING)}"


def test_the_scanner_sees_every_form() -> None:
    source = (
        "import os\nfrom os import environ\nKEY = 'VIA_CONSTANT'\n"
        "a = os.environ.get('A_GET')\nb = os.environ['B_ITEM']\nos.environ['C_SET'] = '1'\n"
        "os.environ.setdefault('D_DEFAULT', '1')\nos.environ.pop('E_POP', None)\n"
        "f = os.getenv('F_GETENV')\ng = 'G_IN' in os.environ\nh = environ.get(KEY)\n"
        "dynamic = os.environ.get(name_from_config)\n")
    assert env_names(source) == {"A_GET", "B_ITEM", "C_SET", "D_DEFAULT", "E_POP", "F_GETENV",
                                 "G_IN", "VIA_CONSTANT"}


def test_every_declared_variable_says_what_it_is() -> None:
    table = env.table()
    for var in env.ENV.values():
        assert var.doc and var.set_by and var.read_by, var.name
        assert f"`{var.name}`" in table


def test_empty_counts_as_unset_and_ints_must_be_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIC_HOME", "")
    assert env.FABRIC_HOME.get() == "~/.fabric"
    assert not env.FABRIC_HOME.is_set()
    assert env.fabric_home() == Path("~/.fabric").expanduser()
    monkeypatch.setenv("LOCAL_SIZE", "4x")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "3")
    assert env.LOCAL_SIZE.get_int() is None
    assert env.ranks_on_node() == 3


def test_launcher_rank_takes_the_first_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in env.RANK_VARS:
        monkeypatch.delenv(var.name, raising=False)
    assert env.launcher_rank() is None
    monkeypatch.setenv("PMI_RANK", "5")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert env.launcher_rank() == 3
    monkeypatch.setenv("FABRIC_RANK", "1")
    assert env.launcher_rank() == 1
