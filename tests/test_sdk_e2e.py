"""The SDK and CLI end to end, against a real local site serving a tiny random Llama.

The session's site (``local_site``) is the production path: a site process with a
GlobusComputeEngine of request workers, a model server launched as a job. The first test pays
the cold start; later ones reuse the warm server. Bad input must get its typed error *and*
leave the site serving the next request.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import (
    ContextLengthExceeded,
    Fabric,
    InvalidRequest,
    UnknownModel,
    UserFunctionError,
)
from fabric.serverclient import ServerClient
from tests.plugins.servers import hf_greedy, hf_tokenizer
from tests.plugins.site import (
    LONG_TOKENS,
    TINY_MODEL,
    assert_stopped_early,
    server_idle,
    server_pid,
    wait_until,
)
from tests.plugins.throttle import throttle_process

pytestmark = pytest.mark.slow

PROMPT = "The mitochondria is"
STATES = {"absent", "queued", "loading", "ready"}


@pytest.fixture
def fab(site_transport: Any) -> Iterator[Fabric]:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


# User functions are shipped by reference, so they live at module level (importable at the
# site, whose workers have the repository root on PYTHONPATH).

def generate_with_handle(handle: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Uses the warm model through the handle, returns plain data."""
    result = handle.generate(prompt, max_tokens=max_tokens)
    return {"text": result.text, "token_ids": result.token_ids, "model": handle.model}


def generate_tops(handle: Any, prompt: str) -> Any:
    return handle.generate(prompt, max_tokens=3, top_logprobs=2).top_logprobs


def failing_function(handle: Any, value: int) -> None:
    """Raises, so the traceback must come back to the caller."""
    ratio = value / 0
    print(ratio)


def test_generate(fab: Fabric) -> None:
    statuses: list[dict[str, Any]] = []
    fab.on_status = statuses.append
    started = time.monotonic()
    result = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=8)
    if time.monotonic() - started > 3.0:  # this test paid the cold start: it was reported
        assert statuses and {s["state"] for s in statuses} <= STATES
    assert result.model.name == TINY_MODEL and result.model.version == "test"
    assert len(result.model.sha256) == 64
    assert 1 <= len(result.token_ids) <= 8 and result.usage.completion_tokens == len(
        result.token_ids)
    assert result.finish_reason in ("length", "eos", "stop")
    assert isinstance(result.text, str)
    again = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=8)
    assert again.token_ids == result.token_ids  # greedy is deterministic


def test_stream_concatenates_to_generate(fab: Fabric) -> None:
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=16)
    with fab.stream(PROMPT, model=TINY_MODEL, max_tokens=16) as stream:
        chunks = list(stream)
    assert stream.result is not None
    assert "".join(chunks) == stream.result.text == expected.text
    assert stream.token_ids == stream.result.token_ids == expected.token_ids


def test_a_stream_cut_by_a_stop_string_lists_what_generate_lists(fab: Fabric) -> None:
    """A stop string's tokens stream out before the stop is seen whole; at the end the
    stream's tokens and scores are the result's, as ``generate`` gives them (the text
    before the stop), not the text's plus the stop string's."""
    free = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=16, logprobs=True)
    stop = next((free.text[i:i + 3] for i in range(2, len(free.text) - 3)
                 if free.text[i:i + 3].strip() and free.text.find(free.text[i:i + 3]) == i),
                None)
    assert stop is not None, free.text
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=16, logprobs=True, stop=[stop])
    with fab.stream(PROMPT, model=TINY_MODEL, max_tokens=16, logprobs=True,
                    stop=[stop]) as stream:
        text = "".join(stream)
    assert stream.result is not None and stream.result.finish_reason == "stop"
    assert text == expected.text == free.text[:free.text.find(stop)]
    assert stream.token_ids == expected.token_ids == free.token_ids[:len(expected.token_ids)]
    assert stream.logprobs == expected.logprobs


def test_stream_by_long_poll(fab: Fabric) -> None:
    """A transport that cannot reach model servers streams through the endpoint instead."""
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=12)
    fab.transport.can_reach_servers = False
    try:
        with fab.stream(PROMPT, model=TINY_MODEL, max_tokens=12) as stream:
            text = "".join(stream)
    finally:
        fab.transport.can_reach_servers = True
    assert text == expected.text and stream.token_ids == expected.token_ids


def test_stream_close_midway_then_serve_again(fab: Fabric, long_prompt: str) -> None:
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    with throttle_process(pid):  # slowed until the cancel has reached it
        stream = fab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
        first = next(stream)
        stream.close()
    assert stream.cancelled and stream.finished and stream.result is None
    assert isinstance(first, str) and len(stream.token_ids) < LONG_TOKENS
    # The server stopped that request early (uncancelled, it runs all LONG_TOKENS), holds no
    # running slot or KV memory for it, and keeps serving.
    assert_stopped_early(fab, before)
    result = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=4)
    assert len(result.token_ids) <= 4


def test_a_stream_dropped_unfinished_is_cancelled(fab: Fabric, long_prompt: str) -> None:
    """No ``with``, no ``close``: the loop breaks and the stream is dropped. The server stops
    that request (it ran to ``max_tokens`` for nobody before) and keeps serving."""
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    (dep,) = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d.get("health")]
    got: list[str] = []
    with throttle_process(pid), ServerClient(dep["address"], dep["public_key"],
                                             timeout_s=60) as server:
        for chunk in fab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS):
            got.append(chunk)
            break
        # Asked of the server itself, not through the site: a health ping the site found
        # slow (the server runs at 5% here) would count the server as dead.
        wait_until(lambda: server.health(60)["running"] == 0, 120,
                   "the dropped stream's request to end at the server")
    assert len(got) == 1
    assert_stopped_early(fab, before)
    assert len(fab.generate(PROMPT, model=TINY_MODEL, max_tokens=4).token_ids) <= 4


def test_stream_cancel_from_another_thread(fab: Fabric, long_prompt: str) -> None:
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    got: list[str] = []
    raised: list[BaseException] = []

    def read() -> None:
        try:
            got.extend(stream)
        except BaseException as exc:  # the reader must end quietly: we asked for the cancel
            raised.append(exc)

    reader = threading.Thread(target=read)
    with throttle_process(pid):  # slowed from its admission until the cancel has reached it
        stream = fab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
        reader.start()
        while not stream.token_ids and reader.is_alive():
            time.sleep(0.005)
        assert stream.cancel() == "running"
    reader.join(30)
    assert not reader.is_alive() and stream.cancelled and raised == []
    assert len(stream.token_ids) < LONG_TOKENS
    assert_stopped_early(fab, before)


def test_stream_close_by_long_poll(fab: Fabric, long_prompt: str) -> None:
    pid = server_pid(fab)
    before = server_idle(fab)["tokens_total"]
    fab.transport.can_reach_servers = False
    try:
        with throttle_process(pid):
            stream = fab.stream(long_prompt, model=TINY_MODEL, max_tokens=LONG_TOKENS)
            next(stream)
            stream.close()  # through the site: it forwards the cancel to the server
    finally:
        fab.transport.can_reach_servers = True
    assert stream.cancelled and len(stream.token_ids) < LONG_TOKENS
    assert_stopped_early(fab, before)


def test_chat(fab: Fabric, tiny_llama_dir: Path) -> None:
    """The conversation is the checkpoint's chat template with the assistant's turn opened
    (as transformers renders it, system message included), and greedy decoding goes on from
    there as transformers' ``generate`` does."""
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What do proteins do?"}]
    result = fab.chat(messages, model=TINY_MODEL, max_tokens=8, temperature=0)
    rendered = hf_tokenizer(tiny_llama_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True)
    ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert result.usage.prompt_tokens == len(ids)
    assert result.token_ids == hf_greedy(tiny_llama_dir, ids, 8)[:len(result.token_ids)]
    assert 1 <= len(result.token_ids) <= 8
    with fab.stream(messages=messages, model=TINY_MODEL, max_tokens=8) as stream:
        assert "".join(stream) == result.text


def test_a_hash_pinned_version_names_the_warm_server(fab: Fabric) -> None:
    """A call pinned by weights hash (as ``provenance.rerun()`` pins) finds its warm server
    in the site's status: it was reported as "launching a model server" while it waited."""
    sha = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=1).model.sha256
    for pin in (f"sha256:{sha[:12]}", sha[:16], None):
        status = fab._path.query_status(TINY_MODEL, pin).result(timeout=30)
        assert status.get("state") == "ready", (pin, status)
    other = fab._path.query_status(TINY_MODEL, "sha256:" + "0" * 12).result(timeout=30)
    assert other.get("state") == "absent"


def test_submit_uses_the_handle(fab: Fabric) -> None:
    direct = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=6)
    future = fab.submit(generate_with_handle, PROMPT, 6, model=TINY_MODEL)
    value = future.result(timeout=300)
    assert value == {"text": direct.text, "token_ids": direct.token_ids, "model": TINY_MODEL}


def test_the_handle_gives_top_logprobs_as_the_sdk_does(fab: Fabric) -> None:
    want = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=3, top_logprobs=2).top_logprobs
    got = fab.submit(generate_tops, PROMPT, model=TINY_MODEL).result(timeout=300)
    assert want is not None and len(want) == 3 and all(len(top) == 2 for top in want)
    assert [[tuple(pair) for pair in top] for top in got] == want


def test_submit_error_brings_the_traceback_back(fab: Fabric) -> None:
    future = fab.submit(failing_function, 3, model=TINY_MODEL)
    with pytest.raises(UserFunctionError, match="ZeroDivisionError") as info:
        future.result(timeout=300)
    trace = info.value.details["traceback"]
    assert "failing_function" in trace and "ratio = value / 0" in trace
    # The site keeps serving after a user function raised.
    assert fab.submit(generate_with_handle, PROMPT, 2, model=TINY_MODEL).result(300)["text"] \
        is not None


def test_unknown_model_lists_available(fab: Fabric) -> None:
    with pytest.raises(UnknownModel) as info:
        fab.generate("hi", model="no-such-model")
    assert TINY_MODEL in info.value.details["available"]
    assert TINY_MODEL in str(info.value) and "smollm2-135m" in str(info.value)
    with pytest.raises(UnknownModel):
        fab.stream("hi", model="no-such-model")
    with pytest.raises(UnknownModel):
        fab.submit(generate_with_handle, "hi", 1, model="no-such-model").result(300)


def test_context_limits_are_typed(fab: Fabric) -> None:
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 400  # >> 512 positions
    with pytest.raises(ContextLengthExceeded):
        fab.generate(long_prompt, model=TINY_MODEL, max_tokens=4)
    with pytest.raises(ContextLengthExceeded):
        fab.generate(PROMPT, model=TINY_MODEL, max_tokens=100_000)
    with pytest.raises(InvalidRequest):  # ContextLengthExceeded is an InvalidRequest too
        fab.stream(long_prompt, model=TINY_MODEL, max_tokens=4)
    assert fab.generate(PROMPT, model=TINY_MODEL, max_tokens=2).token_ids


def test_embed_hidden_states_logprobs(fab: Fabric) -> None:
    import numpy as np
    import torch

    vectors = fab.embed(["a cat", "a dog", "a cat"], model=TINY_MODEL)
    assert isinstance(vectors, np.ndarray) and vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5)
    one = fab.embed("a cat", model=TINY_MODEL)
    assert one.shape == (64,) and np.allclose(one, vectors[0], atol=1e-5)
    raw = fab.embed("a cat", model=TINY_MODEL, normalize=False)
    assert not np.isclose(np.linalg.norm(raw), 1.0)

    states = fab.hidden_states("The cell", model=TINY_MODEL, layers=[0, -1])
    n = len(states["token_ids"])
    assert set(states["layers"]) == {"0", "-1"}
    assert isinstance(states["layers"]["-1"], torch.Tensor)
    assert tuple(states["layers"]["-1"].shape) == (n, 64)
    last = fab.hidden_states("The cell", model=TINY_MODEL, layers=[-1], positions=[-1])
    assert torch.allclose(last["layers"]["-1"][0], states["layers"]["-1"][-1], atol=1e-5)

    scored = fab.logprobs("The cell is", " the powerhouse", model=TINY_MODEL)
    assert len(scored["logprobs"]) == len(scored["token_ids"]) >= 1
    assert all(lp <= 0 for lp in scored["logprobs"])
    assert abs(scored["total"] - sum(scored["logprobs"])) < 1e-4


def test_models_and_deployments(fab: Fabric) -> None:
    fab.generate(PROMPT, model=TINY_MODEL, max_tokens=1)  # make sure it is deployed
    names = {m["name"]: m for m in fab.models()}
    assert {TINY_MODEL, "smollm2-135m", "minilm-l6"} <= set(names)
    deployments = [d for d in fab.deployments() if d["model"] == TINY_MODEL]
    assert any(d["state"] == "ready" and d["address"] for d in deployments)


def fabric_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("fabric")), *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_against_the_site(local_site: Any, fab: Fabric) -> None:
    site = ["--site", str(local_site.site_dir)]
    expected = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=10)
    out = fabric_cli("generate", PROMPT, *site, "--model", TINY_MODEL, "--max-tokens", "10")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected.text + "\n"
    out = fabric_cli("generate", PROMPT, *site, "-m", TINY_MODEL, "-n", "10", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == expected.token_ids

    bad = fabric_cli("generate", "hi", *site, "--model", "nope")
    # Only the error: a slow call prints status lines first, and a model the site does not
    # serve has none (it said "launching a model server").
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: unknown model 'nope'"), bad.stderr
    assert fab._path.query_status("nope", None).result() == {}
    assert fab._path.query_status(TINY_MODEL, "no-such-version").result()["state"] == "absent"
    assert "Traceback" not in bad.stderr
    too_long = fabric_cli("generate", PROMPT, *site, "-m", TINY_MODEL, "-n", "100000")
    assert too_long.returncode == 2 and too_long.stderr.startswith("error: ")

    models = fabric_cli("models", *site)
    assert models.returncode == 0 and TINY_MODEL in models.stdout
    deployments = fabric_cli("deployments", *site, "--json")
    assert deployments.returncode == 0, deployments.stderr
    assert any(d["model"] == TINY_MODEL and d["state"] == "ready"
               for d in json.loads(deployments.stdout))
    embedded = fabric_cli("embed", "a cat", *site, "-m", TINY_MODEL, "--json")
    assert embedded.returncode == 0, embedded.stderr
    assert len(json.loads(embedded.stdout)["embeddings"][0]["embedding"]) == 64


def test_deploy_undeploy_then_cold_start_reports_status(fab: Fabric) -> None:
    """Last in the module: it stops the warm server, so the next request starts a new one."""
    record = fab.deploy(TINY_MODEL, timeout=300)
    assert record["state"] == "ready" and record["model"] == TINY_MODEL
    assert record["id"] in {d["id"] for d in fab.deployments()}
    stopped = fab.undeploy(record["id"])
    assert stopped["id"] == record["id"] and stopped["state"] in ("draining", "dead")
    live = [d for d in fab.deployments() if d["id"] == record["id"]]
    assert all(d["state"] in ("draining", "dead") for d in live)

    statuses: list[dict[str, Any]] = []
    fab.on_status = statuses.append
    fab.status_interval_s = 0.5
    result = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=2)
    assert result.token_ids
    assert statuses, "a cold start must report the deployment's state while it waits"
    assert {s["state"] for s in statuses} <= STATES
    assert any(s["state"] in ("absent", "queued", "loading") for s in statuses)
    fresh = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d["state"] == "ready"]
    assert fresh and fresh[0]["id"] != record["id"]
