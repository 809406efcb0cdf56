"""Each script in ``examples/`` runs as a user would run it, against the test site.

The scripts take ``--site`` (here the session's site folder, whose process is already up) and
``--model`` (here the tiny random Llama, so each run takes seconds); ``--json`` makes each end
with one JSON line, whose shape is checked. One test runs the perplexity example on the real
SmolLM2, where the numbers mean something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.site import REPO_ROOT, TINY_MODEL, LocalSite

slow = pytest.mark.slow  # an example talks to a site process and a model server

EXAMPLES = REPO_ROOT / "examples"


def run_example(site: LocalSite, name: str, *args: str, model: str = TINY_MODEL,
                timeout: float = 300) -> dict[str, Any]:
    """Run ``examples/<name>.py`` and return its final JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--site", str(site.site_dir),
         "--model", model, "--json", *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) > 1, "an example prints something readable before its JSON line"
    out = json.loads(lines[-1])
    assert out["example"] == name
    return dict(out)


def test_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f"examples/{script.name}" in readme, f"{script.name} missing from the README"


@slow
def test_quickstart(local_site: LocalSite) -> None:
    out = run_example(local_site, "quickstart", "--max-tokens", "8")
    assert 1 <= out["tokens"] <= 8
    assert out["same"] is True and out["streamed"] == out["text"]


@slow
def test_embedding_search(local_site: LocalSite) -> None:
    out = run_example(local_site, "embedding_search", "--compare-with", "", "--layer", "2",
                      "--pooling", "last", "-k", "2")
    (report,) = out["reports"]
    assert report["model"] == TINY_MODEL and report["dim"] == 64 and report["k"] == 2
    assert report["layer"] == 2 and report["pooling"] == "last"
    assert len(report["rankings"]) == 3
    for ranking in report["rankings"]:
        cosines = [hit["cosine"] for hit in ranking["top"]]
        assert len(cosines) == 2 and cosines == sorted(cosines, reverse=True)
        assert all(-1.0001 <= c <= 1.0001 for c in cosines)
    assert 0.0 <= report["precision_at_k"] <= 1.0 and 0.0 <= report["top1_accuracy"] <= 1.0


@slow
def test_linear_probe_here_and_at_site(local_site: LocalSite) -> None:
    here = run_example(local_site, "linear_probe", "--layer", "2")
    there = run_example(local_site, "linear_probe", "--layer", "2", "--at-site")
    assert here["layers"] == [0, 2] and here["n_train"] + here["n_test"] == 32
    assert there["at_site"] is True and here["at_site"] is False
    # Same features, same split, same deterministic training: the same probe either way.
    assert there["scores"] == here["scores"]
    # Control: every sentence ends in ".", so layer 0's last-token state carries no signal.
    assert here["scores"]["0"]["test_accuracy"] == 0.5
    for layer in ("0", "2"):
        assert 0.0 <= here["scores"][layer]["test_accuracy"] <= 1.0
        assert here["scores"][layer]["dim"] == 64


@slow
def test_steering(local_site: LocalSite) -> None:
    out = run_example(local_site, "steering", "--layer", "1", "--scale", "4",
                      "--max-tokens", "12")
    assert out["dim"] == 64 and out["layer"] == 1 and out["vector_norm"] > 0
    rows = out["generations"]
    assert len(rows) == 3
    # Unsteered requests batched with steered ones are unchanged ...
    assert all(r["plain_unchanged_in_batch"] for r in rows)
    # ... and the hook does change the steered ones.
    assert any(r["toward"] != r["plain"] for r in rows)


@slow
def test_perplexity(local_site: LocalSite) -> None:
    out = run_example(local_site, "perplexity", "--text", "The quick brown fox jumps.",
                      "--text", "Proteins fold into shapes.")
    assert [s["text"] for s in out["scored"]] == ["The quick brown fox jumps.",
                                                  "Proteins fold into shapes."]
    for s in out["scored"] + out["shuffled"]:
        assert len(s["logprobs"]) == len(s["token_ids"]) > 0
        assert all(lp <= 0 for lp in s["logprobs"])
        assert s["total"] == pytest.approx(sum(s["logprobs"]), abs=1e-3)
        assert s["perplexity"] >= 1.0
    assert len(out["choices"]) == 3


@slow
def test_perplexity_on_smollm2(local_site: LocalSite, smollm2_dir: Path) -> None:
    """The real model: fluent text is far more likely than its shuffled words, and the
    capital of France is Paris."""
    out = run_example(local_site, "perplexity", model="smollm2-135m", timeout=600)
    for fluent, shuffled in zip(out["scored"], out["shuffled"], strict=True):
        assert fluent["perplexity"] < shuffled["perplexity"]
    best = max(out["choices"], key=lambda c: c["total"])
    assert best["option"] == " Paris."
