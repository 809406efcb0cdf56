"""The weights hash is settled by the model server where the weights are loaded, once per
model version; the request worker that launches the server never reads a weight file.

"Never reads" is checked with a real audit hook (``sys.addaudithook``: every ``open`` of a
``.safetensors`` file in this process, the request worker, is recorded); "once per version"
with the weights manifest's mtime and the ``how`` each server reports in its info file. Every
expected hash is computed here with hashlib (``sha256sum *.safetensors | sha256sum``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import tickets, weights
from fabric.catalog import Catalog, CatalogEntry, WeightSource
from fabric.endpoint.deployments import DeploymentManager
from fabric.errors import DeploymentError, WeightsChanged
from fabric.models_registry import ModelRegistry
from fabric.protocol import InferenceRequest
from fabric.sites import load_site
from tests.plugins.site import TINY_MODEL, site_manager, write_site

_OPENED: list[str] = []
_WATCH: list[str] = []  # folders whose .safetensors opens are recorded (empty: none)


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _WATCH or not args:
        return
    path = args[0]
    if isinstance(path, bytes):
        path = path.decode(errors="replace")
    if isinstance(path, (str, os.PathLike)):
        text = os.path.abspath(os.fspath(path))
        if text.endswith(".safetensors") and any(text.startswith(w) for w in _WATCH):
            _OPENED.append(text)


sys.addaudithook(_audit)  # audit hooks cannot be removed: gated by _WATCH


@pytest.fixture
def watch_opens() -> Iterator[list[str]]:
    """Record this process's opens of ``.safetensors`` files under the folders appended."""
    _OPENED.clear()
    try:
        yield _WATCH
    finally:
        _WATCH.clear()


def listing_sha256(folder: Path) -> str:
    """``sha256sum *.safetensors | sha256sum`` in ``folder``, by hand."""
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                      for p in sorted(folder.glob("*.safetensors")))
    return hashlib.sha256(listing.encode()).hexdigest()


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama without a weights manifest: its hash is not known."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "weights",
                                ignore=shutil.ignore_patterns(weights.MANIFEST)))


def _entry(folder: Path, **source: Any) -> CatalogEntry:
    return CatalogEntry(name="w", version="1", family="causal-lm",
                        source=WeightSource(kind="path", path=str(folder), **source))


# -- on the node: HashJob -----------------------------------------------------------------------

def test_a_server_computes_an_unknown_hash_once_and_trusts_it_while_the_stamp_holds(
        model_copy: Path) -> None:
    expected = listing_sha256(model_copy)
    first = weights.HashJob(model_copy, None, weights.HashClaim()).result(60)
    assert (first.sha256, first.how) == (expected, "computed")
    manifest = model_copy / weights.MANIFEST
    written = manifest.stat().st_mtime_ns
    # The hash it reported, handed to the next server with its stamp: not read again.
    claim = weights.HashClaim(stamp=first.stamp)
    again = weights.HashJob(model_copy, first.sha256, claim).result(60)
    assert (again.sha256, again.how) == (expected, "known")
    # No claim at all: the folder's manifest is found; the manifest is not rewritten.
    found = weights.HashJob(model_copy, None, weights.HashClaim()).result(60)
    assert (found.sha256, found.how) == (expected, "manifest")
    assert manifest.stat().st_mtime_ns == written
    # New bytes under the same (unregistered) version: the stamp no longer holds, rehashed.
    target = next(model_copy.glob("*.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    changed = weights.HashJob(model_copy, first.sha256, claim).result(60)
    assert changed.how == "computed" and changed.sha256 == listing_sha256(model_copy) != expected


def test_a_registered_hash_is_verified_once_and_changed_files_are_refused(
        model_copy: Path) -> None:
    files = weights.weight_files(model_copy)
    registered = listing_sha256(model_copy)
    stamp = weights.stamp_of(files)
    verify = weights.HashClaim(stamp=stamp, registered=True, verify=True)
    done = weights.HashJob(model_copy, registered, verify).result(60)
    assert (done.sha256, done.how) == (registered, "verified")
    known = weights.HashJob(model_copy, registered,
                            weights.HashClaim(stamp=stamp, registered=True)).result(60)
    assert known.how == "known"
    # Same size and mtime, other bytes (a copy that kept the times): only the full read sees it.
    target = files[0]
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stamp_of(files) == stamp
    with pytest.raises(WeightsChanged, match="not the registered"):
        weights.HashJob(model_copy, registered, verify).result(60)
    # A changed stamp is refused at once (no hashing), before any rank loads.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(WeightsChanged, match="changed since they were registered"):
        weights.HashJob(model_copy, registered, weights.HashClaim(stamp=stamp, registered=True))


# -- in the request worker: locate --------------------------------------------------------------

def test_locate_reads_no_weights_and_converts_nothing(model_copy: Path, tmp_path: Path,
                                                      watch_opens: list[str]) -> None:
    watch_opens.append(str(model_copy))
    located = weights.locate(_entry(model_copy))
    assert located.path == model_copy and located.sha256 is None
    # The site's record of an earlier server, with its stamp, is handed on.
    record = {"sha256": "a" * 64, "stamp": ["model.safetensors:1:2"]}
    known = weights.locate(_entry(model_copy), site_record=record)
    assert known.sha256 == "a" * 64 and known.claim.stamp == record["stamp"]
    assert not known.claim.registered
    # A registered model: verify on the node until the site has a record of that hash.
    stamp = weights.stamp_of(weights.weight_files(model_copy))
    reg = _entry(model_copy, sha256="b" * 64, stamp=stamp)
    assert weights.locate(reg).claim == weights.HashClaim(stamp=stamp, registered=True,
                                                          verify=True)
    verified = weights.locate(reg, site_record={"sha256": "b" * 64, "stamp": stamp})
    assert verified.claim.verify is False and verified.sha256 == "b" * 64
    assert _OPENED == []
    # SmolLM2's GGUF is converted by the server on its node: locating it converts nothing.
    cache = tmp_path / "cache"
    gguf = weights.locate(Catalog().get("smollm2-135m"), cache)
    assert gguf.sha256 is None and gguf.path.parent.parent == cache
    assert not gguf.path.exists()


# -- the deployment path: a real server launched by the deployment manager ---------------------

@pytest.fixture
def manager(tmp_path: Path, model_copy: Path) -> Iterator[DeploymentManager]:
    with site_manager(tmp_path / "site", model_copy) as mgr:
        yield mgr


def _generate(mgr: DeploymentManager, dep: Any, name: str) -> dict[str, Any]:
    from fabric.serverclient import ServerClient

    ticket = tickets.issue(mgr.ticket_key(), model=name, ttl_s=600)
    req = InferenceRequest(model=name, prompt="The cell", sampling={"max_tokens": 3})
    with ServerClient(dep.address, dep.public_key, timeout_s=60) as client:
        client.submit(req, ticket)
        return client.result(req.request_id, 120)


def _info(dep: Any) -> dict[str, Any]:
    return dict(json.loads(Path(dep.info_path).read_text()))


@pytest.mark.slow  # launches two model servers (~10 s each)
def test_the_server_hashes_where_it_loads_once_per_version(
        manager: DeploymentManager, model_copy: Path, watch_opens: list[str]) -> None:
    from fabric.endpoint.functions import _identity

    expected = listing_sha256(model_copy)
    entry = Catalog().with_entries(manager.site.extra_models).get(TINY_MODEL)
    manifest = model_copy / weights.MANIFEST
    watch_opens.append(str(model_copy))
    dep = manager.deploy(entry)
    launch = json.loads(Path(dep.info_path).with_name("launch.json").read_text())
    assert dep.sha256 == "" and launch["sha256"] is None  # the worker did not know it...
    ready = manager.wait_ready(dep.id, 240)
    assert _OPENED == []  # ...and did not read the weights to find out
    info = _info(ready)
    assert info["pid"] != os.getpid() and info["weights"]["how"] == "computed"
    assert ready.sha256 == info["sha256"] == expected
    result = _generate(manager, ready, TINY_MODEL)
    assert result["model"]["sha256"] == expected
    assert result["provenance"]["sha256"] == expected
    assert manager.db.weights_of(TINY_MODEL, "test")["sha256"] == expected  # type: ignore[index]
    assert _identity(entry, manager)["sha256"] == expected  # list_models / fabric models
    written = manifest.stat().st_mtime_ns

    # The next server of this version gets the site's record and hashes nothing.
    manager.undeploy(ready.id, drain_wait_s=2.0)
    again = manager.ensure(entry, wait_s=240)
    assert again.id != ready.id
    launch = json.loads(Path(again.info_path).with_name("launch.json").read_text())
    assert launch["sha256"] == expected and _info(again)["weights"]["how"] == "known"
    assert manifest.stat().st_mtime_ns == written
    assert again.sha256 == _generate(manager, again, TINY_MODEL)["model"]["sha256"] == expected
    assert _OPENED == []


@pytest.mark.slow  # launches three model servers (~10 s each)
def test_a_registered_model_is_verified_on_its_first_node_then_refused_once_changed(
        manager: DeploymentManager, model_copy: Path, watch_opens: list[str]) -> None:
    registered = ModelRegistry(manager.state_dir).add(model_copy, "byo", "v1")
    assert registered.sha256 == listing_sha256(model_copy)
    entry = registered.entry()
    watch_opens.append(str(model_copy))
    first = manager.ensure(entry, wait_s=240)
    assert _info(first)["weights"]["how"] == "verified"
    assert first.sha256 == _generate(manager, first, "byo")["model"]["sha256"] \
        == registered.sha256
    manager.undeploy(first.id, drain_wait_s=2.0)
    second = manager.ensure(entry, wait_s=240)
    assert _info(second)["weights"]["how"] == "known" and second.sha256 == registered.sha256
    manager.undeploy(second.id, drain_wait_s=2.0)
    assert _OPENED == []
    # A changed file (its mtime moves): the server refuses it instead of serving a new hash.
    target = weights.weight_files(model_copy)[0]
    later = time.time() + 5
    os.utime(target, (later, later))
    with pytest.raises(DeploymentError, match="WeightsChanged"):
        manager.ensure(entry, wait_s=240)


@pytest.mark.slow  # converts SmolLM2's GGUF (~15 s) and serves it
def test_a_gguf_model_is_converted_and_hashed_on_the_servers_node(
        tmp_path: Path, watch_opens: list[str]) -> None:
    cache = tmp_path / "weights-cache"
    folder = write_site(tmp_path / "site", weights_dir=str(cache))
    mgr = DeploymentManager(load_site(folder), folder / "state")
    entry = Catalog().get("smollm2-135m")
    watch_opens.append(str(cache))
    try:
        dep = mgr.deploy(entry)
        launch = json.loads(Path(dep.info_path).with_name("launch.json").read_text())
        assert launch["sha256"] is None and launch["weights_path"].startswith(str(cache))
        ready = mgr.wait_ready(dep.id, 400)
        assert _OPENED == []
        converted = Path(launch["weights_path"])
        expected = listing_sha256(converted)
        assert ready.sha256 == expected
        assert _generate(mgr, ready, entry.name)["model"]["sha256"] == expected
    finally:
        for live in mgr.db.query(states=("queued", "loading", "ready", "draining")):
            mgr.undeploy(live.id, drain_wait_s=2.0)
