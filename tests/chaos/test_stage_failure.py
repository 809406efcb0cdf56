"""With pp=2, a step that raises on stage 1 (not the head's rank) fails only its sequence.

A real pp=2 model server (two ranks over gloo, the tiny Llama), started with the tests-only
``FABRIC_TEST_STAGE_FAULT=1:boom``: stage 1 raises on every step that holds a request whose
id contains ``boom`` (standing for what validation cannot foresee on a later stage). That
request gets a typed ``ServerInternalError`` naming the stage; the requests batched with it
get exactly transformers' greedy tokens, and the server (both ranks) goes on serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import env
from fabric.errors import FabricError, ServerInternalError
from tests.chaos.common import report
from tests.plugins.servers import hf_greedy, launch_server

PROMPTS = ["The mitochondria is", "Proteins fold", "Scientists call models"]
MAX_TOKENS = 6


@pytest.mark.slow
def test_stage_one_failure_fails_only_its_request(tmp_path: Path, tiny_llama_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.FABRIC_TEST_STAGE_FAULT.name, "1:boom")
    server = launch_server(tmp_path, tiny_llama_dir, 2, 1, "tiny_stage_fault",
                           max_running=8)
    monkeypatch.delenv(env.FABRIC_TEST_STAGE_FAULT.name)
    typed = crashes = lost = 0
    try:
        expected = [hf_greedy(tiny_llama_dir, p, MAX_TOKENS) for p in PROMPTS]
        client = server.client(timeout_s=120)
        for round_ in range(2):  # the second round proves both ranks still serve
            good = [server.request(request_id=f"good-{round_}-{i}", prompt=p,
                                   sampling={"max_tokens": MAX_TOKENS})
                    for i, p in enumerate(PROMPTS)]
            culprit = server.request(request_id=f"boom-{round_}", prompt="The cell",
                                     sampling={"max_tokens": MAX_TOKENS})
            batch = [good[0], culprit, *good[1:]]
            assert client.submit_many([(r, server.ticket) for r in batch]) == [None] * 4
            with pytest.raises(ServerInternalError) as err:
                client.result(culprit.request_id, 120)
            assert "stage 1" in str(err.value) and "injected fault" in str(err.value)
            assert err.value.details["request_id"] == culprit.request_id
            typed += 1
            for req, want in zip(good, expected, strict=True):
                try:
                    got = client.result(req.request_id, 120)["token_ids"]
                except FabricError:
                    crashes += 1
                    raise
                lost += got != want
                assert got == want, req.request_id
        health = server.wait_idle(60)
        assert health["state"] == "ready" and server.alive()
        assert health["running"] == 0 and health["queue_depth"] == 0
    finally:
        server.stop()
        report("stage-failure-pp2", inputs=8, typed_errors=typed, crashes=crashes, lost=lost)
