"""kill -9 of the site: nothing of it survives, and any process can start a new one.

Before the watchdog, every kill left the site's Parsl interchange and worker pool running (3
orphan sets were seen alive after 30 minutes). Before the zombie check, a site auto-started by
an SDK process that was still running stayed a zombie after the kill (its parent had not
reaped it), which ``kill(pid, 0)`` calls alive: other processes found "the site", could not
connect to it and did not start another.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fabric.client.local import LocalTransport, read_info, stop_site
from fabric.errors import FabricError
from tests.chaos.common import kill_all, of_site, report, stat, throwaway_site, worker_pid
from tests.plugins.site import REPO_ROOT, TINY_MODEL, wait_until, write_site

pytestmark = pytest.mark.slow

KILLS = 2


def test_kill_9_leaves_no_process_behind(tmp_path: Path) -> None:
    leaked = crashes = 0
    folder = tmp_path / "killed"
    with throwaway_site(folder, workers=2) as (state, info):
        for _ in range(KILLS):
            with LocalTransport(site=str(folder), state_dir=state) as client:
                worker = client.submit(worker_pid).result(timeout=180)
                info = read_info(state) or {}
            site_pid = int(info["pid"])
            before = of_site(site_pid, state)
            assert worker in before, "the worker pool is in the site's session"
            os.kill(site_pid, signal.SIGKILL)
            try:
                wait_until(lambda p=site_pid: not of_site(p, state), 15,
                           f"every process of the killed site (pid {site_pid}) to end")
            except BaseException:
                leaked += len(of_site(site_pid, state))
                kill_all(of_site(site_pid, state))
                raise
            finally:
                report("site-kill-9", inputs=KILLS, leaked=leaked, crashes=crashes)


@contextlib.contextmanager
def zombie_site(folder: Path, model_dir: Path | None = None) -> Iterator[tuple[Path, int]]:
    """A site started by another SDK process that lives on without reaping it, then killed:
    ``(state dir, the dead site's pid)``; every site started on the state dir ends after."""
    write_site(folder, workers=1, model_dir=model_dir)
    state = folder / "state"
    owner_code = textwrap.dedent(f"""
        import time
        from fabric.client.local import start_site
        start_site({str(folder)!r}, {str(state)!r}, timeout_s=180)
        print("started", flush=True)
        time.sleep(600)  # alive, never reaping its child
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", owner_code], env=env,
                             stdout=subprocess.PIPE, text=True)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO_ROOT)  # for the site this process starts
    sites: set[int] = set()
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == "started"
        first = read_info(state)
        assert first is not None
        sites.add(int(first["pid"]))
        os.kill(int(first["pid"]), signal.SIGKILL)
        wait_until(lambda: (stat(int(first["pid"])) or ("X",))[0] == "Z", 10,
                   "the killed site to be a zombie")
        yield state, int(first["pid"])
    finally:
        now = read_info(state)
        if now is not None:
            sites.add(int(now["pid"]))
            with contextlib.suppress(Exception):
                stop_site(str(folder), state, all=True, timeout_s=60)
        owner.kill()
        owner.wait(10)
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(of_site(p, state) for p in sites):
            time.sleep(0.2)
        for pid in sites:
            kill_all(of_site(pid, state))


def test_a_zombie_site_is_taken_over(tmp_path: Path) -> None:
    """Another process (this one) starts a new site on its next call."""
    lost = typed = 0
    try:
        with zombie_site(tmp_path / "zombie") as (state, dead), \
                LocalTransport(site=str(tmp_path / "zombie"), state_dir=state) as client:
            try:
                lost += not isinstance(client.submit(worker_pid).result(timeout=180), int)
            except FabricError:
                typed += 1
                raise
            assert client.info is not None and int(client.info["pid"]) != dead
    finally:
        report("zombie-takeover", inputs=1, typed_errors=typed, lost=lost)
    assert lost == 0


def test_campaign_resume_starts_a_dead_site(tmp_path: Path, tiny_llama_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """``fabric campaign resume`` of a site-run campaign starts the site when it is dead
    (it answered "queued for the site's scheduler" and left the zombie be)."""
    from fabric.campaign import store
    from fabric.cli.main import main

    folder = tmp_path / "resume"
    (tmp_path / "in.jsonl").write_text('{"custom_id": "a", "prompt": "hi"}\n')
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({
        "name": "r", "model": TINY_MODEL, "kind": "generate", "input": {"path": "in.jsonl"},
        "sampling": {"max_tokens": 3, "temperature": 0.0}, "output": "out",
        "sites": [{"name": str(folder)}]}))
    started = 0
    try:
        with zombie_site(folder, tiny_llama_dir) as (state, dead):
            campaign = store.create(tmp_path / "m.yaml", state / "campaigns", runner="site")
            assert main(["campaign", "resume", "r", "--site", str(folder),
                         "--state-dir", str(state)]) == 0
            assert "queued" in capsys.readouterr().out
            now = read_info(state)
            started = int(now is not None and int(now["pid"]) != dead)
            assert started, "the site was not started"
            wait_until(lambda: store.status(campaign)["status"] == "done", 300,
                       "the new site's scheduler to run the campaign")
            assert len(list(store.read_records(campaign))) == 1
    finally:
        report("campaign-resume-dead-site", inputs=1, lost=1 - started)
