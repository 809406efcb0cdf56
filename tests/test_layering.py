"""Imports run one way. Every module of a package is read (top level, inside functions and
``TYPE_CHECKING`` blocks, and ``importlib.import_module("literal")`` calls), so a cycle cannot
hide in a function body.

    fabric.wire      what crosses processes; imports only fabric.errors (and third parties)
    fabric.engine    the model server; never Globus, the endpoint, the client, campaigns
    fabric.client    the SDK; never the engine, the endpoint, campaigns; Globus only through
                     ``fabric.client.transport.open_transport`` (for a remote site)
    fabric.globus    the Globus transport and login; never the endpoint, campaigns, engine, client
    fabric.endpoint  the site; never campaigns, never the client but ``fabric.client.decoding``
    fabric.campaign  above the client; never ``fabric.client.local``, never the endpoint
    fabric.sdk, fabric.siteproc, fabric.cli   composition roots: they may import anything
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "fabric"
GLOBUS = ("globus_sdk", "globus_compute_sdk", "globus_compute_endpoint", "globus_compute_common",
          "fabric.globus")

Import = tuple[str, str]
"""``(imported module, where)``: ``where`` is the enclosing function's qualified name, or
``<module>`` for a top-level import."""


def imports_of(path: Path, package: str | None = None) -> set[Import]:
    """Every module ``path`` imports, with the function it is imported in.

    ``from a.b import c`` counts as importing ``a.b`` and ``a.b.c`` (``c`` may be a module);
    relative imports are resolved against the file's ``package`` (default: found from its path).
    """
    if package is None:
        package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    out: set[Import] = set()

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = child.name if where == "<module>" else f"{where}.{child.name}"
            if isinstance(child, ast.Import):
                out.update((alias.name, where) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.rsplit(".", child.level - 1)[0] if child.level > 1 \
                        else package
                    base = f"{parent}.{base}" if base else parent
                out.add((base, where))
                out.update((f"{base}.{alias.name}", where) for alias in child.names)
            elif isinstance(child, ast.Call) and _is_dynamic_import(child.func) and \
                    child.args and isinstance(child.args[0], ast.Constant) and \
                    isinstance(child.args[0].value, str):
                out.add((child.args[0].value, where))
            visit(child, inner)

    visit(ast.parse(path.read_text()), "<module>")
    return out


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def offenders(package: str, forbidden: tuple[str, ...],
              allowed: frozenset[tuple[str, str, str]] = frozenset()) -> dict[str, list[str]]:
    """``{file: [module (where)]}`` for imports of ``forbidden`` modules (or their submodules)
    from ``package``, less the ``allowed`` ``(file, module, where)`` triples (``where`` "*":
    anywhere in that file)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        bad = sorted(f"{module} ({where})" for module, where in imports_of(path)
                     if _within(module, forbidden) and (rel, module, where) not in allowed
                     and (rel, module, "*") not in allowed)
        if bad:
            found[rel] = bad
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


# -- the rules ------------------------------------------------------------------------------

def test_wire_imports_only_errors() -> None:
    """The leaf: any process may import it without loading a layer."""
    others = tuple(f"fabric.{p.name}" if p.is_dir() else f"fabric.{p.stem}"
                   for p in ROOT.iterdir()
                   if p.name not in ("wire", "errors.py", "__init__.py", "__pycache__"))
    assert offenders("wire", others) == {}
    # `from fabric import x` (x a module) would hide from the prefix check above.
    for path in (ROOT / "wire").rglob("*.py"):
        assert not {m for m, _ in imports_of(path) if m == "fabric"}, path


def test_engine_imports_no_globus_endpoint_client_or_campaign() -> None:
    forbidden = (*GLOBUS, "fabric.endpoint", "fabric.client", "fabric.campaign")
    assert offenders("engine", forbidden) == {}


CLIENT_GLOBUS_DOOR = frozenset({
    ("client/transport.py", "fabric.globus.transport", "open_transport"),
    ("client/transport.py", "fabric.globus.transport.GlobusTransport", "open_transport"),
})
"""The one way from the client to Globus: ``open_transport`` for a site with an endpoint id,
imported there so that users of embedded sites never load the Globus SDKs. (The local
transport packs Globus Compute's task messages through ``fabric.wire.gcwire``, which loads
``globus_compute_sdk``'s serializer on first use: that is the wire format, not Globus.)"""


def test_model_computes_and_knows_nothing_of_runner_slots_or_graphs() -> None:
    """The StageRunner owns caches and the fast path; the model only computes over what it is
    handed, and the fast path does not reach back into the runner."""
    model = {m for m, _ in imports_of(ROOT / "engine" / "model.py")}
    assert not {m for m in model if _within(m, ("fabric.engine.runner", "fabric.engine.graphs",
                                                "fabric.engine.kv", "fabric.engine.pipeline"))}
    graphs = {m for m, _ in imports_of(ROOT / "engine" / "graphs.py")}
    assert not {m for m in graphs if _within(m, ("fabric.engine.runner",))}


def test_client_imports_no_engine_endpoint_or_campaign() -> None:
    """Endpoint functions are named by ``fabric.wire.functions`` references; ``Fabric.campaign``
    lives in the SDK's composition root ``fabric.sdk`` (the campaign sits above the client)."""
    assert offenders("client", ("fabric.engine", "fabric.endpoint", "fabric.campaign")) == {}


def test_client_reaches_globus_only_through_open_transport() -> None:
    assert offenders("client", GLOBUS, CLIENT_GLOBUS_DOOR) == {}


def test_globus_imports_no_endpoint_campaign_engine_or_client() -> None:
    forbidden = ("fabric.endpoint", "fabric.campaign", "fabric.engine", "fabric.client")
    assert offenders("globus", forbidden) == {}


ENDPOINT_CLIENT_RESULTS = frozenset({
    ("endpoint/handle.py", module, "*")
    for module in ("fabric.client.decoding", "fabric.client.decoding.decode_tensors",
                   "fabric.client.decoding.embeddings_from_results")
})
"""A user function's ``ModelHandle`` hands back the SDK's own result types (torch tensors,
embedding arrays), decoded by the SDK's code."""


def test_endpoint_imports_no_campaign_and_no_client_but_results() -> None:
    """The site process's composition root (``fabric.siteproc``) wires campaigns in."""
    assert offenders("endpoint", ("fabric.campaign",)) == {}
    assert offenders("endpoint", ("fabric.client",), ENDPOINT_CLIENT_RESULTS) == {}


def test_gateway_imports_no_engine_and_no_globus() -> None:
    """The OpenAI gateway is an SDK user (``AsyncFabric``): it reaches sites through transports
    (and reuses the site policy's token introspection), never the model server's code."""
    assert offenders("gateway", ("fabric.engine", *GLOBUS)) == {}


def test_campaign_never_imports_the_local_transport() -> None:
    """The campaign opens sites through ``open_transport``, never ``LocalTransport`` itself."""
    assert offenders("campaign", ("fabric.client.local",)) == {}


def test_campaign_never_imports_the_endpoint() -> None:
    """The campaign ships ``run_shard`` by reference (``fabric.wire.functions``); it has no
    import of the site's code."""
    assert offenders("campaign", ("fabric.endpoint",)) == {}


# -- the checker itself ---------------------------------------------------------------------

def test_the_checker_sees_lazy_relative_and_dynamic_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import importlib\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from fabric.campaign import api\n"
        "def f():\n    from fabric.engine import server\n    import globus_sdk\n"
        "class C:\n    def g(self):\n        from ..endpoint import functions\n"
        "        importlib.import_module('fabric.campaign.store')\n")
    assert {("fabric.campaign.api", "<module>"), ("fabric.engine.server", "f"),
            ("globus_sdk", "f"), ("fabric.endpoint.functions", "C.g"),
            ("fabric.campaign.store", "C.g")} <= imports_of(probe, "fabric.client")


def test_endpoint_modules_do_not_reach_each_other_through_importlib() -> None:
    """The policy reads the endpoint-function registry, not another module's globals."""
    policy = ROOT / "endpoint" / "policy.py"
    assert not {m for m, _ in imports_of(policy) if m == "importlib"}
    assert "importlib" not in policy.read_text()
