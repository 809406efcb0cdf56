"""Bring your own model: ``fabric models add`` validates, hashes once and registers a folder;
the site's catalog serves it pinned by version or by weights hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from fabric import Fabric, weights
from fabric.catalog import Catalog
from fabric.cli.main import main
from fabric.errors import (
    AmbiguousModelVersion,
    DeploymentError,
    InvalidModelFolder,
    InvalidRequest,
    UnknownModel,
    UnsupportedArchitecture,
)
from fabric.models_registry import ModelRegistry, site_catalog
from fabric.sites import load_site
from tests.plugins.site import LocalSite, write_site


def sha256sum_listing(folder: Path) -> tuple[dict[str, str], str]:
    """What ``sha256sum *.safetensors`` prints, and the sha256 of that listing, by hand."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(folder.glob("*.safetensors"))}
    listing = "".join(f"{h}  {n}\n" for n, h in files.items())
    return files, hashlib.sha256(listing.encode()).hexdigest()


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama folder (tests change files in it), without the weights
    manifest that serving it earlier in the session may have left there."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "my-llama",
                                ignore=shutil.ignore_patterns(weights.MANIFEST)))


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file ``fabric.weights`` hashes, in order (the real function still runs)."""
    seen: list[Path] = []
    real = weights.file_sha256

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(weights, "file_sha256", counting)
    return seen


def test_add_hashes_once_like_sha256sum(model_copy: Path, tmp_path: Path,
                                        counted: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "state")
    model = registry.add(model_copy, "my-llama", "v1")
    files, listing_sha = sha256sum_listing(model_copy)
    assert model.files == files and model.sha256 == listing_sha
    assert model.family == "causal-lm" and model.architecture == "LlamaForCausalLM"
    assert model.size_bytes == sum((model_copy / n).stat().st_size for n in files)
    assert model.params > 0 and len(counted) == len(files)
    # Serving resolves by hash and prepares the weights from the record: nothing rehashed.
    entry = Catalog().with_entries(registry.entries()).get("my-llama", "sha256:" + listing_sha)
    prepared = weights.prepare(entry)
    assert prepared.sha256 == listing_sha and prepared.path == model_copy.resolve()
    assert len(counted) == len(files)
    assert not (model_copy / weights.MANIFEST).exists()


def test_registry_file_is_private_and_atomic(model_copy: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    ModelRegistry(state).add(model_copy, "my-llama", "v1")
    assert stat.S_IMODE((state / "models.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    data = json.loads((state / "models.json").read_text())
    assert [m["version"] for m in data["models"]] == ["v1"]
    assert not [p for p in state.iterdir() if p.name.startswith(".models.json.")]


def test_pin_by_version_hash_and_prefix(model_copy: Path, tiny_llama_odd_dir: Path,
                                        tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "state")
    one = registry.add(model_copy, "my-llama", "v1")
    two = registry.add(tiny_llama_odd_dir, "my-llama", "v2")
    catalog = Catalog().with_entries(registry.entries())
    assert catalog.get("my-llama").version == "v2"  # latest registered
    assert catalog.get("my-llama", "v1").source.sha256 == one.sha256
    assert catalog.get("my-llama", one.sha256[:12]).version == "v1"
    assert catalog.get("my-llama", f"sha256:{two.sha256.upper()[:20]}".lower()).version == "v2"
    with pytest.raises(UnknownModel) as err:
        catalog.get("my-llama", one.sha256[:11])  # too short to be a hash pin
    assert "v1 (sha256:" in err.value.message and "v2 (sha256:" in err.value.message
    with pytest.raises(UnknownModel):
        catalog.get("my-llama", "sha256:" + "f" * 64)


def test_same_weights_twice_is_ambiguous_by_hash(model_copy: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "state")
    a = registry.add(model_copy, "my-llama", "run-a")
    registry.add(model_copy, "my-llama", "run-b")
    with pytest.raises(AmbiguousModelVersion) as err:
        Catalog().with_entries(registry.entries()).get("my-llama", a.sha256[:16])
    assert err.value.details["matches"] == ["run-a", "run-b"]
    with pytest.raises(InvalidRequest, match="already has a version 'run-a'"):
        registry.add(model_copy, "my-llama", "run-a")


def test_refuses_folders_it_cannot_serve(model_copy: Path, tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "state")
    (model_copy / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(InvalidModelFolder, match=r"no config\.json"):
        registry.add(model_copy, "m", "1")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]  # not served (Mixtral is, since issue 19)
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture) as err:
        registry.add(model_copy, "m", "1")
    assert "GPTNeoXForCausalLM" in err.value.message
    assert "LlamaForCausalLM" in err.value.details["supported"]
    config["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    for f in model_copy.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(InvalidModelFolder, match=r"no \*.safetensors.*safe_serialization"):
        registry.add(model_copy, "m", "1")
    assert registry.models() == []


def test_changed_weights_are_refused_not_rehashed(model_copy: Path, tmp_path: Path,
                                                  counted: list[Path]) -> None:
    registry = ModelRegistry(tmp_path / "state")
    registry.add(model_copy, "my-llama", "v1")
    hashed = len(counted)
    weights_file = next(model_copy.glob("*.safetensors"))
    later = time.time() + 5
    os.utime(weights_file, (later, later))
    with pytest.raises(DeploymentError, match="changed since they were registered"):
        weights.prepare(registry.entries()[0])
    assert len(counted) == hashed


def _rewrite_tensors(path: Path, change: Any) -> None:
    """Rewrite a safetensors file with ``change(name, tensor)`` applied to each tensor."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: change(k, v) for k, v in tensors.items()}, path)


def test_refuses_broken_weight_files_naming_them(model_copy: Path, tmp_path: Path) -> None:
    """A copy cut short, integer weights, a dangling link, a bad name: refused at
    registration, typed, naming the file (or field), not later by a server's shape error."""
    registry = ModelRegistry(tmp_path / "state")
    weights_file = next(model_copy.glob("*.safetensors"))
    whole = weights_file.read_bytes()
    weights_file.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(InvalidModelFolder, match="is truncated") as err:
        registry.add(model_copy, "m", "1")
    assert err.value.details["path"] == str(weights_file)
    weights_file.write_bytes(whole)
    _rewrite_tensors(weights_file, lambda k, v: v.to(torch_int32()) if k.endswith(
        "q_proj.weight") else v)
    with pytest.raises(InvalidModelFolder, match=r"q_proj\.weight is I32"):
        registry.add(model_copy, "m", "1")
    weights_file.write_bytes(whole)
    gone = model_copy / "extra.safetensors"
    gone.symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(InvalidModelFolder, match="does not exist"):
        registry.add(model_copy, "m", "1")
    gone.unlink()
    with pytest.raises(InvalidRequest, match="model name 'Bad Name'"):
        registry.add(model_copy, "Bad Name", "1")
    assert registry.models() == []
    assert registry.add(model_copy, "m", "1").name == "m"  # the folder restored is fine


def torch_int32() -> Any:
    import torch

    return torch.int32


def test_cli_add_list_json_and_remove(model_copy: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    site_dir = write_site(tmp_path / "site", node={"gpus": 4, "gpu_memory_gib": 40})
    assert main(["models", "add", str(model_copy), "--name", "my-llama", "--version", "v1",
                 "--site", str(site_dir), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sha256"] == sha256sum_listing(model_copy)[1]
    assert (record["site_plan"]["pp"], record["site_plan"]["nodes"]) == (1, 1)
    site = load_site(str(site_dir))
    entry = site_catalog(site).get("my-llama", record["sha256"][:12])
    known = weights.known_identity(entry)
    assert known is not None and known.size_bytes == record["size_bytes"]
    assert main(["models", "add", str(tmp_path), "--name", "x", "--version", "1",
                 "--site", str(site_dir)]) == 2
    assert "no config.json" in capsys.readouterr().err
    # A shipped model's name (any version): its callers would get these weights.
    assert main(["models", "add", str(model_copy), "--name", "smollm2-135m", "--version",
                 "mine", "--site", str(site_dir)]) == 2
    assert "already served by the site" in capsys.readouterr().err
    assert site_catalog(site).get("smollm2-135m").version != "mine"
    # Another version of one's own registered model is fine.
    assert main(["models", "add", str(model_copy), "--name", "my-llama", "--version", "v2",
                 "--site", str(site_dir)]) == 0
    capsys.readouterr()
    # A server of v1 still runs: removing the version says so (it would hold its nodes).
    from fabric.endpoint.state import Deployment, StateDB

    db = StateDB(site.resolved_state_dir())
    running = Deployment(id=Deployment.new_id(), model="my-llama", version="v1", state="ready")
    db.insert(running)
    db.insert(Deployment(id=Deployment.new_id(), model="my-llama", version="v1", state="dead"))
    assert main(["models", "remove", "my-llama", "--site", str(site_dir)]) == 0
    out, err = capsys.readouterr()
    assert "removed my-llama v1" in out
    assert f"fabric undeploy {running.id}" in err and err.count("fabric undeploy") == 1
    with pytest.raises(UnknownModel):
        site_catalog(site).get("my-llama")


@pytest.mark.slow
def test_site_serves_a_registered_model_pinned_by_version_and_hash(
        local_site: LocalSite, model_copy: Path) -> None:
    registry = ModelRegistry(local_site.state_dir)
    model = registry.add(model_copy, "byo-tiny", "v1")
    try:
        with Fabric(transport=local_site.transport(), on_status=None) as fab:
            listed = {(m["name"], m["version"]): m for m in fab.models()}["byo-tiny", "v1"]
            assert listed["sha256"] == model.sha256 and listed["hosted"]
            assert listed["size_bytes"] == model.size_bytes
            by_version = fab.generate("The cell", model="byo-tiny", version="v1", max_tokens=6)
            by_hash = fab.generate("The cell", model="byo-tiny", max_tokens=6,
                                   version=model.sha256[:12])
            assert by_version.model.sha256 == by_hash.model.sha256 == model.sha256
            assert by_hash.model.version == "v1" and by_version.token_ids == by_hash.token_ids
            for dep in fab.deployments():
                if dep["model"] == "byo-tiny":
                    fab.undeploy(dep["id"])
    finally:
        registry.remove("byo-tiny")


def test_deploy_of_a_server_that_dies_at_load_says_why(
        local_site: LocalSite, model_copy: Path) -> None:
    """``fab.deploy`` (and ``fabric deploy``) waits for its server: one that dies while it
    loads (here: its weights changed after they were registered) must end the wait with the
    server's reason, not read "absent" until a timeout (or for ever without one)."""
    registry = ModelRegistry(local_site.state_dir)
    registry.add(model_copy, "byo-dies", "v1")
    later = time.time() + 5
    os.utime(next(model_copy.glob("*.safetensors")), (later, later))
    try:
        with Fabric(transport=local_site.transport(), on_status=None) as fab:
            t0 = time.monotonic()
            with pytest.raises(DeploymentError, match="changed since they were registered"):
                fab.deploy("byo-dies", version="v1", timeout=240)
            assert time.monotonic() - t0 < 200
    finally:
        registry.remove("byo-dies")


def test_served_unregistered_models_pin_by_hash_from_their_manifest(
        model_copy: Path, tmp_path: Path) -> None:
    site = load_site(str(write_site(tmp_path / "site", model_dir=model_copy)))
    entry = site_catalog(site).get("tiny-llama")
    with pytest.raises(UnknownModel):  # never served: its hash is not known yet (not computed)
        site_catalog(site).get("tiny-llama", "sha256:" + sha256sum_listing(model_copy)[1])
    prepared = weights.prepare(entry)  # as its first server does: writes the manifest
    assert prepared.sha256 == sha256sum_listing(model_copy)[1]
    assert site_catalog(site).get("tiny-llama", prepared.sha256[:12]).version == "test"
