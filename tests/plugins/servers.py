"""Real model servers for engine tests: launched as jobs through Parsl's LocalProvider.

``model_server(weights_dir, pp=1, tp=1, name="tiny", **server_overrides)`` starts the
production server program as the deployment manager launches it
(``fabric.engine.launch.prepare_server_launch``), pp x tp ranks of one ``JobLauncher`` job,
waits for its info file to say "ready" and returns a ``ServerHandle``. One running
server per distinct argument set is kept for the session (the least recently used beyond
``MAX_LIVE`` are stopped to bound memory); all are cancelled at session end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fabric import tickets
from fabric.catalog import CatalogEntry, WeightSource
from fabric.endpoint.jobs import JobLauncher
from fabric.engine.launch import ServerLaunchConfig, prepare_server_launch
from fabric.procs import process_running
from fabric.protocol import InferenceRequest
from fabric.serverclient import ServerClient
from fabric.sites import JobsConfig, Plan, ServerConfig, TypedSpec

READY_TIMEOUT_S = 180.0
MAX_LIVE = 4
DEFAULTS: dict[str, Any] = {"idle_timeout_s": 3600.0, "threads_per_rank": 1}


@dataclass
class ServerHandle:
    """A running model server and what a test needs to talk to it."""

    cfg: ServerLaunchConfig
    info: dict[str, Any]
    ticket: str
    key: bytes
    job_id: str
    launcher: JobLauncher
    folder: Path
    _clients: list[ServerClient] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The model name requests must use."""
        return self.cfg.model.name

    def client(self, timeout_s: float = 60.0) -> ServerClient:
        """A new connection (closed at teardown unless closed earlier)."""
        c = ServerClient(self.info["address"], self.info["public_key"], timeout_s=timeout_s)
        self._clients.append(c)
        return c

    def request(self, **fields: Any) -> InferenceRequest:
        """An ``InferenceRequest`` for this server's model."""
        return InferenceRequest(model=self.name, **fields)

    def run(self, client: ServerClient | None = None, timeout_s: float = 120.0,
            **fields: Any) -> dict[str, Any]:
        """Submit one request and wait for its result."""
        c = client or self.client()
        req = self.request(**fields)
        c.submit(req, self.ticket)
        return c.result(req.request_id, timeout_s)

    def health(self) -> dict[str, Any]:
        """The server's health reply."""
        with ServerClient(self.info["address"], self.info["public_key"], timeout_s=30) as c:
            return c.health()

    def wait_idle(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait until nothing is queued or running; returns the last health reply."""
        deadline = time.monotonic() + timeout_s
        while True:
            h = self.health()
            if (h["running"] == 0 and h["queue_depth"] == 0) or time.monotonic() > deadline:
                return h
            time.sleep(0.05)

    def alive(self) -> bool:
        """True while the head still reports ready."""
        try:
            info = json.loads(Path(self.cfg.info_path).read_text())
        except (OSError, ValueError):
            return False
        return info.get("state") == "ready" and process_running(int(info.get("pid") or 0))

    def close_clients(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()

    def stop(self) -> None:
        """Cancel the job and make sure every rank is gone."""
        self.close_clients()
        pid = int(self.info.get("pid") or 0)
        with contextlib.suppress(Exception):
            self.launcher.cancel(self.job_id)
        deadline = time.monotonic() + 5
        while pid and process_running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid and process_running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def launch_server(root: Path, weights_dir: Path, pp: int, tp: int, name: str,
                  family: str = "causal-lm", ep: int = 1, fp8: str = "auto",
                  **overrides: Any) -> ServerHandle:
    """Start one server job and wait until it is ready (or fail with its reason)."""
    from fabric.weights import prepare

    entry = CatalogEntry(name=name, version="test", family=family,
                         source=WeightSource(kind="path", path=str(weights_dir)))
    weights = prepare(entry)
    folder = root / f"{name}-{pp}x{tp}-{int(time.time() * 1000) % 10**8}"
    folder.mkdir(parents=True)
    state = root / "state"
    state.mkdir(exist_ok=True)
    server = ServerConfig(**{**DEFAULTS, **overrides})
    plan = Plan(pp=pp, tp=tp, ep=ep, fp8=fp8)  # type: ignore[arg-type]  # checked by pydantic
    launch = prepare_server_launch(folder.name, entry, weights, plan, server, state, folder)
    cfg = launch.config
    jobs = JobsConfig(provider=TypedSpec(type="LocalProvider"),
                      launcher=TypedSpec(type="SingleNodeLauncher"), walltime="02:00:00")
    launcher = JobLauncher.from_config(jobs, folder / "scripts")
    key = tickets.load_or_create_key(Path(cfg.ticket_key_path))
    job_id = launch.submit(launcher, folder.name)
    handle = ServerHandle(cfg, {}, tickets.issue(key, model=name, ttl_s=6 * 3600), key, job_id,
                          launcher, folder)
    deadline = time.monotonic() + READY_TIMEOUT_S
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(Path(cfg.info_path).read_text())
        if info.get("state") == "ready":
            handle.info = info
            return handle
        if info.get("state") == "dead":
            handle.stop()
            pytest.fail(f"model server {folder.name} died while loading: {info.get('reason')}")
        time.sleep(0.2)
    handle.info = info
    handle.stop()
    logs = "\n".join(p.read_text()[-3000:] for p in (folder / "scripts").glob("*.e*"))
    pytest.fail(f"model server {folder.name} not ready after {READY_TIMEOUT_S} s "
                f"(info: {info}); stderr tail:\n{logs}")


ServerFactory = Callable[..., ServerHandle]


@pytest.fixture(scope="session")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Factory: ``model_server(weights_dir, pp=1, tp=1, name="tiny", ep=1, fp8="auto",
    **server_overrides)``."""
    root = tmp_path_factory.mktemp("servers")
    live: OrderedDict[tuple[Any, ...], ServerHandle] = OrderedDict()

    def factory(weights_dir: Path, pp: int = 1, tp: int = 1, name: str = "tiny",
                family: str = "causal-lm", ep: int = 1, fp8: str = "auto",
                **overrides: Any) -> ServerHandle:
        key = (str(weights_dir), pp, tp, ep, fp8, name, family,
               tuple(sorted(overrides.items())))
        handle = live.get(key)
        if handle is not None and handle.alive():
            live.move_to_end(key)
            return handle
        if handle is not None:
            handle.stop()
            del live[key]
        while len(live) >= MAX_LIVE:
            _, old = live.popitem(last=False)
            old.stop()
        handle = launch_server(root, Path(weights_dir), pp, tp, name, family, ep, fp8,
                               **overrides)
        live[key] = handle
        return handle

    yield factory
    for handle in live.values():
        handle.stop()
    live.clear()


_HF: dict[str, Any] = {}


def hf_model(weights_dir: Path) -> Any:
    """The checkpoint loaded in-process by transformers (fp32, eval), cached per folder."""
    from transformers import AutoModelForCausalLM

    key = str(weights_dir)
    if key not in _HF:
        import torch

        _HF[key] = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).eval()
    return _HF[key]


def hf_tokenizer(weights_dir: Path) -> Any:
    """The checkpoint's tokenizer (cached)."""
    from transformers import AutoTokenizer

    key = f"tok:{weights_dir}"
    if key not in _HF:
        _HF[key] = AutoTokenizer.from_pretrained(weights_dir)
    return _HF[key]


def hf_greedy(weights_dir: Path, prompt: str | list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` continuation of ``prompt`` (text, or token ids such
    as a chat template's) as token ids, eos included."""
    import torch

    model, tok = hf_model(weights_dir), hf_tokenizer(weights_dir)
    ids = torch.tensor([tok(prompt).input_ids if isinstance(prompt, str) else prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    return [int(t) for t in out[0, ids.shape[1]:]]


def hf_greedy_text(weights_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """``hf_greedy`` decoded as a user sees it (special tokens dropped)."""
    ids = hf_greedy(weights_dir, prompt, max_new_tokens)
    return str(hf_tokenizer(weights_dir).decode(ids, skip_special_tokens=True))


CANDIDATE_PROMPTS = [
    "The", "The mitochondria", "Proteins fold", "Scientists call", "Tensor parallel",
    "The quick brown fox", "pipeline parallel splits", "supercomputer sites", "fold into shapes",
    "The cell", "jumps over the lazy dog", "Scientists", "models through a", "decide what",
]


def no_eos_prompts(weights_dir: Path, n: int, want: int = 1) -> list[str]:
    """Up to ``want`` prompts whose greedy continuation (per transformers) has no EOS in ``n``
    tokens, so a greedy request for them generates exactly ``n`` tokens."""
    eos = hf_tokenizer(weights_dir).eos_token_id
    key = f"noeos:{weights_dir}:{n}:{want}"
    if key not in _HF:
        found: list[str] = []
        for p in CANDIDATE_PROMPTS:
            if eos not in hf_greedy(weights_dir, p, n):
                found.append(p)
                if len(found) == want:
                    break
        assert found, f"every candidate prompt reaches EOS within {n} tokens"
        _HF[key] = found
    return list(_HF[key])


def check_served_against_transformers(server: Any, weights: Path, prompts: list[str],
                                      max_new: int) -> None:
    """A running model server's greedy continuations of ``prompts`` (sent together, so they
    share steps) and its prompt log-probabilities equal transformers' on the same weights."""
    import numpy as np
    import torch

    client = server.client()
    reqs = [server.request(prompt=p, sampling={"max_tokens": max_new}) for p in prompts]
    for r in reqs:
        client.submit(r, server.ticket)
    for prompt, r in zip(prompts, reqs, strict=True):
        assert client.result(r.request_id, 120)["token_ids"] == hf_greedy(weights, prompt,
                                                                           max_new), prompt
    tok, model = hf_tokenizer(weights), hf_model(weights)
    text = "Proteins fold into shapes that decide what they do."
    res = server.run(client, kind="logprobs", prompt=text)
    ids = tok(text).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
    np.testing.assert_allclose(res["logprobs"], want, atol=1e-4, rtol=0)
