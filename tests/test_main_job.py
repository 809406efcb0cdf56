"""The issue's "done when": the CLI's greedy answer equals transformers' own greedy generate.

Runs the real path end to end on the real SmolLM2 weights: `fabric generate` starts a local
site (GlobusComputeEngine request workers), which launches a model server job through Parsl,
and the answer streams back to the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.servers import hf_greedy_text
from tests.plugins.site import write_site

PROMPTS = ["The mitochondria is", "Write a haiku about the ocean."]


@pytest.fixture(scope="module")
def smollm2_site(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Iterator[Path]:
    """A temp site hosting smollm2-135m (pp=1 tp=1); stopped with its servers afterwards."""
    folder = write_site(tmp_path_factory.mktemp("smol-site"), name="smol-test",
                        models=[{"name": "smollm2-135m", "plan": {"pp": 1, "tp": 1}}])
    yield folder
    subprocess.run([sys.executable, "-m", "fabric.cli.main", "endpoint", "stop", "--site",
                    str(folder), "--all"], capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_cli_generate_prints_transformers_greedy_text(smollm2_site: Path, smollm2_dir: Path,
                                                      prompt: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "fabric.cli.main", "generate", prompt, "--model", "smollm2-135m",
         "--max-tokens", "24", "--temperature", "0", "--site", str(smollm2_site)],
        capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    expected = hf_greedy_text(smollm2_dir, prompt, 24)
    assert run.stdout.rstrip("\n") == expected.rstrip("\n")
