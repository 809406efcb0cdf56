"""Site definitions: both schemas (the fabric's and Globus Compute's own loader), templated
values, and the batch scripts Parsl renders for PBS Pro and Slurm model-server jobs."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

from fabric.cli import sites as cli_sites
from fabric.errors import InvalidSiteConfig
from fabric.sites import ENDPOINTS_DIR, list_sites, load_site, render_endpoint_config

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
}
MINE = sorted(VALUES)


def test_every_site_is_listed() -> None:
    assert set(MINE) <= set(list_sites())


@pytest.mark.parametrize("name", MINE)
def test_site_loads_with_both_schemas(name: str) -> None:
    site, text = render_endpoint_config(name, VALUES[name], strict=True)
    assert site.name == name and site.unset_values == []
    config = load_config_yaml(text)  # Globus Compute's own loader: unknown keys are errors
    assert type(config.engine).__name__ == "GlobusComputeEngine"
    # Workers unpickle no caller data unless the site runs user functions (pickled arguments).
    allowed = {t.__name__ for t in config.engine.serde.allowed_deserializer_types}
    assert allowed == {"DillCode", "JSONData"} | (
        {"DillDataBase64"} if site.allow_user_functions else set())
    if name != "local":
        assert site.policy is not None and site.allow_user_functions is False
        assert config.allowed_functions is None  # nothing registered yet: check warns
        # Request workers learn their site from the rendered worker_init.
        assert f"export FABRIC_SITE={(ENDPOINTS_DIR / name).resolve()}" in text


def test_registered_functions_fill_allowed_functions(tmp_path: Path) -> None:
    folder = tmp_path / "polaris"
    shutil.copytree(ENDPOINTS_DIR / "polaris", folder)
    text = (folder / "fabric.yaml").read_text().replace(
        "function_ids: {}", f"function_ids: {{run_request: {UUID1}, poll_stream: {UUID2}}}")
    (folder / "fabric.yaml").write_text(text)
    _, rendered = render_endpoint_config(folder, VALUES["polaris"])
    assert load_config_yaml(rendered).allowed_functions == (UUID1, UUID2)


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
    load_config_yaml((tmp_path / "config.yaml").read_text())
