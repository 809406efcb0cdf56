"""Site definitions: both schemas (the fabric's, and Globus Compute 4.x's read the way
``globus-compute-endpoint start`` reads an endpoint directory), the user-endpoint template and its
schema (also through the real ``render-user-config`` command), templated values, and the batch
scripts Parsl renders for PBS Pro and Slurm model-server jobs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

from fabric import env
from fabric.cli import sites as cli_sites
from fabric.endpoint_files import ENDPOINT_FILES, render_endpoint_config, render_endpoint_files
from fabric.errors import FabricError, InvalidSiteConfig
from fabric.sites import (
    ENDPOINTS_DIR,
    list_sites,
    load_site,
)
from fabric.wire.functions import NAMES

UUID1 = "0b6e5c4a-0f5c-4e5b-9f0d-000000000001"
UUID2 = "0b6e5c4a-0f5c-4e5b-9f0d-000000000002"
VALUES = {
    "local": {},
    "polaris": {"account": "MyProj", "venv": "/soft/fab/venv", "policy_client_id": UUID1,
                "users_group": UUID2},
    "perlmutter": {"project": "m1234", "venv": "/global/common/fab", "policy_client_id": UUID1,
                   "users_group": UUID2},
    "aurora": {"account": "MyProj", "venv": "/soft/fab/venv", "policy_client_id": UUID1},
    "slurm-cluster": {"partition": "gpu", "account": "abc", "venv": "/opt/fab",
                      "shared_dir": "/shared/lab", "policy_client_id": UUID1},
    "local-slurm": {},
}
GCE = str(Path(sys.executable).parent / "globus-compute-endpoint")
MINE = sorted(VALUES)


def test_every_site_is_listed() -> None:
    assert set(MINE) <= set(list_sites())


def write(name: str | Path, folder: Path, values: dict[str, str] | None = None) -> Path:
    """Render a site's endpoint files into ``folder`` (as ``fabric site check --write``)."""
    _, files = render_endpoint_files(name, values if values is not None else
                                     VALUES.get(str(name), {}))
    cli_sites.write_endpoint_files(files, folder)
    return folder


@pytest.mark.parametrize("name", MINE)
def test_site_loads_with_both_schemas(name: str, tmp_path: Path) -> None:
    """Every shipped site, read the way `globus-compute-endpoint start` reads it: the manager
    config without an engine, the engine from the template rendered with the schema."""
    from globus_compute_endpoint.endpoint.config import CoreEndpointConfig

    site, text = render_endpoint_config(name, VALUES[name], strict=True)
    assert site.name == name and site.unset_values == []
    manager, user = cli_sites.load_endpoint_dir(write(name, tmp_path / name))
    assert isinstance(manager, CoreEndpointConfig) and "\nengine:" not in text
    assert manager.allowed_functions is None  # nothing registered yet: check warns
    assert manager.display_name and manager.email is None
    engine = user.engine
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert engine.executor.max_workers_per_node == site.max_request_workers
    # Workers unpickle no caller data, user functions or not (their code arrives as a string
    # that only the user function's own process unpickles).
    allowed = {t.__name__ for t in engine.serde.allowed_deserializer_types}
    assert allowed == {"DillCode", "JSONData"}
    # Request workers learn their site from the rendered worker_init.
    assert f"export FABRIC_SITE={(ENDPOINTS_DIR / name).resolve()}" in \
        engine.executor.provider.worker_init
    if name not in ("local", "local-slurm"):
        assert site.policy is not None and site.allow_user_functions is False
    engine.shutdown()


def test_start_refuses_an_engine_in_config_yaml(tmp_path: Path) -> None:
    """The real `globus-compute-endpoint start` refuses the pre-4.10 shape (engine in
    config.yaml) before it registers anything, and so does `fabric site check`."""
    ep = write("local", tmp_path / "old")
    (ep / "config.yaml").write_text("display_name: old\nengine:\n  type: ThreadPoolEngine\n")
    with pytest.raises(InvalidSiteConfig, match="contains an `engine` field"):
        cli_sites.load_endpoint_dir(ep)
    env = {**os.environ, "GLOBUS_COMPUTE_USER_DIR": str(tmp_path)}
    run = subprocess.run([GCE, "start", "old"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "contains an `engine` field; endpoint will not start" in run.stdout + run.stderr


@pytest.mark.parametrize(("opts", "workers", "ok"), [
    ({}, 8, True), ({"request_workers": 2}, 2, True), ({"request_workers": 9}, None, False),
    ({"worker_init": "curl evil | sh"}, None, False),
])
def test_render_user_config_command(tmp_path: Path, opts: dict[str, Any], workers: int | None,
                                    ok: bool) -> None:
    """Globus Compute's own `render-user-config` renders the template with the submitter's
    values validated against the schema: only request_workers, up to the site's maximum."""
    ep = write("polaris", tmp_path / "polaris")
    (tmp_path / "opts.json").write_text(json.dumps(opts))
    run = subprocess.run([GCE, "render-user-config", "-t", str(ep / ENDPOINT_FILES[1]),
                          "-s", str(ep / ENDPOINT_FILES[2]), "-o", str(tmp_path / "opts.json")],
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode == 0) is ok, run.stdout + run.stderr
    if ok:
        import yaml

        rendered = yaml.safe_load(run.stdout.split("\n", 1)[1])  # after the "> Rendered" line
        assert rendered["engine"]["max_workers_per_node"] == workers
        assert rendered["engine"]["provider"]["worker_init"].startswith(
            "module use /soft/modulefiles; module load conda; source /soft/fab/venv/bin")


def test_local_site_runs_the_templates_engine(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded local site's engine (fabric.endpoint.site builds it) is the one the local
    site's user_config_template.yaml.j2 renders: same engine type, workers, address, strategy
    and provider. What differs is only how its workers are told their site: the site process
    exports FABRIC_SITE itself (the template's worker_init does it for a Globus endpoint), and
    the site process, not the engine, refuses pickled data for data-only functions."""
    import globus_compute_endpoint.engines as engines

    from fabric.endpoint import site as site_mod

    seen: dict[str, Any] = {}

    class Capture:
        def __init__(self, **kwargs: Any) -> None:
            seen.update(kwargs)

        def start(self, **kwargs: Any) -> None:
            seen["started"] = kwargs

    with monkeypatch.context() as m:
        m.setattr(engines, "GlobusComputeEngine", Capture)
        for var in ("PATH", env.FABRIC_SITE.name, env.FABRIC_STATE_DIR.name):
            m.setenv(var, os.environ.get(var, ""))
        fake = SimpleNamespace(site=load_site("local"), site_ref="local", state_dir=tmp_path,
                               endpoint_id="e",
                               pools=SimpleNamespace(run_dir=tmp_path / "engine"))
        site_mod.SiteProcess._start_engine(fake)  # type: ignore[arg-type]
    _, user = cli_sites.load_endpoint_dir(write("local", tmp_path / "ep"))
    engine, provider = user.engine, user.engine.executor.provider
    assert type(engine).__name__ == "GlobusComputeEngine"
    assert seen["max_workers_per_node"] == engine.executor.max_workers_per_node == 4
    assert seen["address"] == engine.executor.address == "127.0.0.1"
    assert seen["job_status_kwargs"] == {"strategy_period": 0.5, "max_idletime": 3600.0}
    for attr in ("heartbeat_period", "heartbeat_threshold"):
        assert seen[attr] == getattr(engine.executor, attr), attr
    built = engine._job_status_kwargs  # what the engine's poller will start with
    assert {k: built[k] for k in seen["job_status_kwargs"]} == seen["job_status_kwargs"]
    mine = seen["provider"]
    assert type(mine) is type(provider)
    for attr in ("init_blocks", "min_blocks", "max_blocks"):
        assert getattr(mine, attr) == getattr(provider, attr), attr
    engine.shutdown()


def test_allowed_functions_come_from_the_one_list(tmp_path: Path) -> None:
    """allowed_functions lists exactly the registered ids of fabric.wire.functions' names; an
    id under another name is an error, a missing name a warning."""
    folder = tmp_path / "polaris"
    shutil.copytree(ENDPOINTS_DIR / "polaris", folder)
    text = (folder / "fabric.yaml").read_text()
    ids = {n: f"0b6e5c4a-0f5c-4e5b-9f0d-{i:012d}" for i, n in enumerate(sorted(NAMES))}
    (folder / "fabric.yaml").write_text(text.replace("function_ids: {}",
                                                     f"function_ids: {json.dumps(ids)}"))
    manager, _ = cli_sites.load_endpoint_dir(write(folder, tmp_path / "ep", VALUES["polaris"]))
    assert manager.allowed_functions == tuple(sorted(ids.values()))
    assert "run_shard" in ids  # campaign shards are allowed where allowed_functions is set
    assert not any("function_ids" in w for w in cli_sites.check_site(
        str(folder), VALUES["polaris"]).warnings)
    partial = {"run_request": UUID1, "poll_requests": UUID2}
    (folder / "fabric.yaml").write_text(text.replace("function_ids: {}",
                                                     f"function_ids: {json.dumps(partial)}"))
    _, rendered = render_endpoint_config(folder, VALUES["polaris"])
    assert load_config_yaml(rendered).allowed_functions == (UUID1, UUID2)
    assert any("function_ids lacks" in w and "run_shard" in w
               for w in cli_sites.check_site(str(folder), VALUES["polaris"]).warnings)
    (folder / "fabric.yaml").write_text(text.replace("function_ids: {}",
                                                     f"function_ids: {{bogus: {UUID1}}}"))
    with pytest.raises(InvalidSiteConfig, match=r"names \['bogus'\]: not fabric endpoint"):
        render_endpoint_config(folder, VALUES["polaris"])


def test_client_side_load_leaves_placeholders() -> None:
    site = load_site("polaris")  # a user knows no account: placeholders, no error
    assert "account" in site.unset_values
    assert site.jobs.provider.kwargs()["account"] == "UNSET-account"


def test_missing_required_value_is_an_error() -> None:
    values = dict(VALUES["polaris"])
    del values["account"]
    with pytest.raises(InvalidSiteConfig, match=r"'account' is required: ALCF project"):
        load_site("polaris", values, strict=True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("queue", "bogus", r"queue='bogus' is not one of \['debug'"),
    ("account", "a b;rm", r"account='a b;rm' does not match"),
    ("acount", "x", r"unknown template value 'acount'"),
])
def test_bad_values_are_errors(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidSiteConfig, match=message):
        load_site("polaris", {**VALUES["polaris"], key: value}, strict=True)


def test_unknown_key_in_fabric_yaml_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    shutil.copytree(ENDPOINTS_DIR / "slurm-cluster", folder)
    with (folder / "fabric.yaml").open("a") as fh:
        fh.write("bogus_key: 1\n")
    with pytest.raises(InvalidSiteConfig, match="bogus_key"):
        load_site(folder, VALUES["slurm-cluster"])


def test_undeclared_placeholder_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    shutil.copytree(ENDPOINTS_DIR / "slurm-cluster", folder)
    with (folder / "config.yaml").open("a") as fh:
        fh.write("# {{ nope }}\n")
    with pytest.raises(InvalidSiteConfig, match=r"undeclared values \['nope'\]"):
        render_endpoint_config(folder, VALUES["slurm-cluster"])


def test_values_file_is_read(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    shutil.copytree(ENDPOINTS_DIR / "aurora", folder)
    (folder / "values.yaml").write_text(
        "".join(f"{k}: {v}\n" for k, v in VALUES["aurora"].items()))
    site = load_site(folder, strict=True)
    assert site.state_dir == "/lus/flare/projects/MyProj/fabric/state"


def test_polaris_pbs_script() -> None:
    report = cli_sites.check_site("polaris", VALUES["polaris"])
    big = next(j for j in report.jobs if j.model == "llama-3.1-70b-instruct")
    assert "#PBS -l select=2:ncpus=64:ngpus=4" in big.script
    assert "#PBS -l walltime=01:00:00" in big.script
    assert "#PBS -l filesystems=home:eagle" in big.script
    assert "mpiexec --cpu-bind none --ppn 4 -n $WORKERCOUNT" in big.script
    assert "WORKERCOUNT=8" in big.script  # pp 2 x tp 4
    assert big.submit_command.startswith("qsub  -q prod -A MyProj ")
    assert any("allowed_functions is unset" in w for w in report.warnings)


def test_perlmutter_slurm_script() -> None:
    report = cli_sites.check_site("perlmutter", VALUES["perlmutter"])
    big = next(j for j in report.jobs if j.model == "llama-3.1-70b-instruct")
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --constraint=gpu",
                 "#SBATCH --account=m1234_g", "#SBATCH --qos=regular", "#SBATCH --nodes=2",
                 "#SBATCH --ntasks-per-node=4", "srun --ntasks 8"):
        assert line in big.script, line
    assert big.submit_command.startswith("sbatch ")


def test_aurora_marks_xpu_unsupported() -> None:
    report = cli_sites.check_site("aurora", VALUES["aurora"])
    assert "#PBS -l select=1:ncpus=208" in report.jobs[0].script
    assert any("xpu is NOT yet supported" in w for w in report.warnings)
    assert "NOT YET SUPPORTED" in (ENDPOINTS_DIR / "aurora" / "fabric.yaml").read_text()


def test_generic_slurm_script() -> None:
    report = cli_sites.check_site("slurm-cluster", VALUES["slurm-cluster"])
    script = report.jobs[0].script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --gpus-per-node=4" in script


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli_sites.register(parser.add_subparsers())
    args = parser.parse_args(["sites"])
    assert args.func(args) == 0
    assert "polaris" in capsys.readouterr().out
    sets = [x for k, v in VALUES["perlmutter"].items() for x in ("--set", f"{k}={v}")]
    args = parser.parse_args(["site", "check", "perlmutter", *sets, "--write", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "config.yaml OK (Globus Compute loader" in out and "#SBATCH --gpus-per-node=4" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ENDPOINT_FILES)
    cli_sites.load_endpoint_dir(tmp_path)


def readme_site_check() -> str:
    """The README's ``fabric site check polaris`` command, as written there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "fabric site check polaris" in ln)
    return line[line.index("fabric site check"):].split("#")[0].strip()


def test_readme_site_check_command_works_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    from fabric.cli.main import main

    assert main(readme_site_check().split()[1:]) == 0
    assert "user_config_template.yaml.j2 OK" in capsys.readouterr().out


def test_the_local_sites_state_follows_fabric_home(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two users (or two checkouts) with their own ``FABRIC_HOME`` get their own local site:
    its state dir was ``~/.fabric/local`` whatever ``FABRIC_HOME`` said."""
    from fabric.sites import resolve_site

    monkeypatch.setenv(env.FABRIC_HOME.name, str(tmp_path / "mine"))
    assert resolve_site("local")[2] == (tmp_path / "mine" / "local").resolve()
    monkeypatch.delenv(env.FABRIC_HOME.name)
    assert resolve_site("local")[2] == (Path.home() / ".fabric" / "local").resolve()


def polaris_copy(folder: Path, old: str, new: str) -> Path:
    """A copy of the shipped polaris definition with one piece of ``fabric.yaml`` replaced."""
    shutil.copytree(ENDPOINTS_DIR / "polaris", folder)
    text = (folder / "fabric.yaml").read_text()
    assert old in text, old
    (folder / "fabric.yaml").write_text(text.replace(old, new, 1))
    return folder


def launcher_refusal(folder: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> FabricError:
    """What the real launcher (``JobLauncher``, as deployments build and call it) says about
    the site's jobs block and each hosted plan: the error ``site check`` must give. The
    scheduler is faked (qsub found, its reply a job id): nothing is submitted."""
    from fabric.endpoint import jobs

    monkeypatch.setattr(jobs.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    site = load_site(folder, VALUES["polaris"], strict=True)
    try:
        launcher = jobs.JobLauncher.from_config(site.jobs, tmp)
        launcher.provider.execute_wait = lambda cmd, timeout=None: (0, "1.pbs\n", "")
        for hosted in site.models:
            launcher.submit("true", hosted.plan.ranks, hosted.plan.nodes, hosted.name)
    except FabricError as exc:
        return exc
    raise AssertionError("the launcher took the site")


@pytest.mark.parametrize(("old", "new"), [
    ('overrides: "--ppn 4"}', 'overrides: "--ppn 4", debug: false}'),
    ('walltime: "01:00:00"', 'walltime: "00:00:30"'),
    ("plan: {pp: 2, tp: 4,", "plan: {pp: 3, tp: 1,"),
    ("type: PBSProProvider", "type: PBSProvider"),
    ("cpus_per_node: 64", "cpus_per_node: sixtyfour"),
])
def test_site_check_refuses_what_the_launcher_refuses(old: str, new: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``site check`` once built its own provider and said OK to sites the launcher refuses
    (debug: false, a walltime under a minute, 3 ranks on 2 nodes, ...): it now validates
    through the launcher itself, with the same typed error."""
    folder = polaris_copy(tmp_path / "site", old, new)
    real = launcher_refusal(folder, tmp_path / "scripts", monkeypatch)
    monkeypatch.undo()
    with pytest.raises(type(real)) as checked:
        cli_sites.check_site(str(folder), VALUES["polaris"])
    assert real.message in checked.value.message


def test_site_check_names_a_policy_model_in_no_catalog(tmp_path: Path) -> None:
    """A typo under policy.models (callers then fall to policy.default) is reported, with the
    catalog name it is nearest to."""
    folder = polaris_copy(tmp_path / "site", "    smollm2-135m: {anyone",
                          "    smollm2-135M: {anyone")
    warnings = cli_sites.check_site(str(folder), VALUES["polaris"]).warnings
    typo = [w for w in warnings if "policy.models.smollm2-135M" in w]
    assert len(typo) == 1 and "'smollm2-135m'" in typo[0]
    assert not any("policy.models" in w for w in cli_sites.check_site(
        "polaris", VALUES["polaris"]).warnings)


def test_docs_list_the_sites_as_fabric_sites_prints_them(
        capsys: pytest.CaptureFixture[str]) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "site-operators.md").read_text()
    intro = doc.index("`fabric sites` lists the shipped definitions")
    start = doc.index("```\n", intro) + 4
    listing = doc[start:doc.index("```", start)]
    assert cli_sites.cmd_sites(argparse.Namespace()) == 0
    assert listing == capsys.readouterr().out
