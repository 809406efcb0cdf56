"""What an operator writes reaches the site as written, or is refused naming it: values.yaml
read as strings, the site folder and function ids checked before they reach a file, and a
site with required values unset refused by everything that acts on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from fabric.cli.main import main
from fabric.endpoint_files import render_endpoint_files
from fabric.errors import InvalidRequest, InvalidSiteConfig
from fabric.sitepolicy import SiteLimits
from fabric.sites import ENDPOINTS_DIR, JobsConfig, load_site, resolve_site

UUID = "0b6e5c4a-0f5c-4e5b-9f0d-000000000001"
VALUES = {"account": "MyProj", "queue": "prod", "venv": "/soft/fab/venv",
          "policy_client_id": UUID, "users_group": UUID}


def polaris(folder: Path, values: str | None = None) -> Path:
    """A copy of the shipped polaris definition, with ``values`` as its values.yaml."""
    shutil.copytree(ENDPOINTS_DIR / "polaris", folder)
    if values is not None:
        (folder / "values.yaml").write_text(values)
    return folder


def values_yaml(**changes: str) -> str:
    return "".join(f"{k}: {v}\n" for k, v in {**VALUES, **changes}.items())


@pytest.mark.parametrize("account", ["0123", "1_000", "0x1F", "1e3", "yes"])
def test_values_are_the_strings_written(account: str, tmp_path: Path) -> None:
    """YAML would read 0123 as octal 83 and 1_000 as 1000: the account charged was another."""
    site = load_site(polaris(tmp_path / "s", values_yaml(account=account)), strict=True)
    assert site.jobs.provider.kwargs()["account"] == account


def test_an_empty_value_is_named_as_empty(tmp_path: Path) -> None:
    folder = polaris(tmp_path / "s", values_yaml(queue=""))
    with pytest.raises(InvalidSiteConfig, match=r"'queue' is empty: give a value one of"):
        load_site(folder, strict=True)


def test_a_nested_value_is_refused_naming_its_key(tmp_path: Path) -> None:
    folder = polaris(tmp_path / "s", values_yaml(venv="[a, b]"))
    with pytest.raises(InvalidSiteConfig, match=r"\['venv'\] must be single values"):
        load_site(folder, strict=True)


@pytest.mark.parametrize("name", ["sp ace", 'q"d', "dollar$x"])
def test_a_site_folder_no_endpoint_file_can_carry_is_refused(name: str, tmp_path: Path) -> None:
    """worker_init exported FABRIC_SITE=<folder> unquoted: a space broke the shell line, a
    quote the YAML (reported against a deleted temp dir)."""
    folder = polaris(tmp_path / name / "pol", values_yaml())
    with pytest.raises(InvalidSiteConfig, match=r"letters, digits and _\.:/@\+- only") as err:
        render_endpoint_files(folder)
    assert err.value.details["path"] == str(folder.resolve())


def test_function_ids_must_be_uuids_named_by_function(tmp_path: Path) -> None:
    folder = polaris(tmp_path / "s", values_yaml())
    text = (folder / "fabric.yaml").read_text()
    (folder / "fabric.yaml").write_text(
        text.replace("function_ids: {}", 'function_ids: {open_stream: "not a uuid"}'))
    with pytest.raises(InvalidSiteConfig, match=r"function_ids.open_stream = 'not a uuid' is "
                                                r"not a UUID"):
        load_site(folder, strict=True)


def test_acting_on_a_site_with_unset_values_is_refused(tmp_path: Path) -> None:
    """start/stop/status/metrics/usage all resolve the site through ``resolve_site``: polaris
    without its values put its state under /lus/eagle/projects/UNSET-account."""
    with pytest.raises(InvalidSiteConfig, match="required values unset") as err:
        resolve_site("polaris")
    assert "account" in err.value.details["unset"]
    site, _, state = resolve_site(str(polaris(tmp_path / "s", values_yaml())))
    assert "MyProj" in str(state) and not site.unset_values
    assert resolve_site("local")[0].name == "local"


@pytest.mark.parametrize("argv", [
    ["endpoint", "start"], ["endpoint", "stop"], ["endpoint", "status"], ["metrics"], ["usage"],
])
def test_cli_commands_refuse_unset_values(argv: list[str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each command refuses before it acts. Hermetic even if the refusal regressed: the
    site's state dir is under tmp_path, and starting a site or serving metrics fails."""
    import fabric.client.local
    import fabric.endpoint.site_metrics

    def acted(*args: object, **kwargs: object) -> None:
        raise AssertionError("acted on a site with unset values")

    monkeypatch.setattr(fabric.client.local, "start_site", acted)
    monkeypatch.setattr(fabric.endpoint.site_metrics, "serve_metrics", acted)
    folder = polaris(tmp_path / "s")
    text = (folder / "fabric.yaml").read_text()
    (folder / "fabric.yaml").write_text(text.replace(
        'state_dir: "/lus/eagle/projects/{{ account }}/fabric/state"',
        f'state_dir: "{tmp_path}/{{{{ account }}}}/state"'))
    assert main([*argv, "--site", str(folder)]) == 2
    assert "required values unset: ['account'" in capsys.readouterr().err
    assert not (tmp_path / "UNSET-account").exists()


def test_usage_of_a_missing_state_dir_is_an_error_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """"no usage recorded" for a dir that does not exist reads as zero usage."""
    missing = tmp_path / "nope"
    assert main(["usage", "--state-dir", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()
    missing.mkdir()
    assert main(["usage", "--state-dir", str(missing)]) == 0
    assert "no usage recorded" in capsys.readouterr().out
    assert issubclass(InvalidSiteConfig, InvalidRequest)


def test_metrics_of_a_missing_state_dir_is_an_error_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Empty metrics served from a dir that does not exist read as an idle site (and serving
    them created the dir); a typed error names the path instead."""
    import signal

    import fabric.endpoint.site_metrics

    served: list[Path] = []
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # keep pytest's handlers
    monkeypatch.setattr(fabric.endpoint.site_metrics, "serve_metrics",
                        lambda site, state_dir, *args: served.append(state_dir))
    missing = tmp_path / "nope"
    assert main(["metrics", "--state-dir", str(missing), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not missing.exists() and not served
    missing.mkdir()
    assert main(["metrics", "--state-dir", str(missing), "--port", "0"]) == 0
    assert served == [missing]


@pytest.mark.parametrize("walltime", ["01:99:99", "01:60:00", "00:00:60"])
def test_walltime_minutes_and_seconds_are_below_60(walltime: str) -> None:
    with pytest.raises(ValidationError, match="minutes and seconds 00-59"):
        JobsConfig(walltime=walltime)
    with pytest.raises(ValidationError, match="minutes and seconds 00-59"):
        SiteLimits(max_walltime=walltime)
    assert JobsConfig(walltime="01:59:59").walltime == "01:59:59"


def test_walltime_seconds_counts_hours_minutes_and_seconds() -> None:
    from fabric.sitepolicy import walltime_seconds

    assert walltime_seconds("00:00:02") == 2
    assert walltime_seconds("01:02:03") == 3723
    assert walltime_seconds("00:59:00") == 3540
    assert walltime_seconds("100:00:00") == 360000  # hours are not capped at 24
