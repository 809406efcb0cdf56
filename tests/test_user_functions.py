"""User inference functions (``fab.submit(fn, data, model=...)``) on a real local site.

The function runs in one of the site's request workers (never inside the model server) with a
``ModelHandle`` to the warm server. Each failure must come back as a typed error, and the model
server must keep serving afterwards. Functions are module-level so the site's workers can
import them by reference (the site has the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fabric import Fabric
from fabric.endpoint.userproc import RESULT_LIMIT_BYTES
from fabric.errors import (
    FunctionNotAllowed,
    ResultTooLarge,
    UnknownModel,
    UserFunctionError,
)
from fabric.wire.functions import list_deployments
from tests.plugins.globus_offline import OfflineGlobus
from tests.plugins.site import TINY_MODEL, LocalSite

pytestmark = pytest.mark.slow  # a site process, a model server job, Parsl workers

PROMPT = "The mitochondria is"


@pytest.fixture
def fab(site_transport: Any) -> Iterator[Fabric]:
    with Fabric(transport=site_transport, on_status=None) as client:
        yield client


# -- functions shipped to the site ---------------------------------------------------------------

def use_every_mode(handle: Any, texts: list[str]) -> dict[str, Any]:
    """generate / embed / hidden_states / logprobs through the handle; a small summary back."""
    import os as _os

    gen = handle.generate(texts[0], max_tokens=6)
    vectors = handle.embed(texts, layer=2, pooling="last")
    states = handle.hidden_states(texts[0], layers=[1, -1], positions=[-1])
    scored = handle.logprobs(texts[0], " the cell")
    return {
        "model": handle.model,
        "pid": _os.getpid(),
        "text": gen.text,
        "token_ids": gen.token_ids,
        "embed_shape": list(vectors.shape),
        "norms": [float(x) for x in np.linalg.norm(vectors, axis=1)],
        "hidden_shapes": {k: list(v.shape) for k, v in states["layers"].items()},
        "logprob_total": float(scored["total"]),
        "n_scored": len(scored["token_ids"]),
    }


def train_probe_at_site(handle: Any, texts: list[str], labels: list[int],
                        layer: int) -> dict[str, Any]:
    """Features stay at the site; only the probe's weights and accuracy come back."""
    import numpy as _np

    feats = _np.stack([handle.hidden_states(t, layers=[layer], positions=[-1])["layers"]
                       [str(layer)][0].numpy() for t in texts])
    y = _np.asarray(labels, dtype=_np.float64)
    x = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    w, b = _np.zeros(x.shape[1]), 0.0
    for _ in range(300):
        p = 1 / (1 + _np.exp(-(x @ w + b)))
        w -= 0.1 * (x.T @ (p - y) / len(y) + 1e-3 * w)
        b -= 0.1 * float((p - y).mean())
    acc = float((((x @ w + b) > 0).astype(int) == y).mean())
    return {"weights": [float(v) for v in w], "train_accuracy": acc, "n": len(texts)}


def raises_inside(handle: Any, value: int) -> float:
    return value / 0


def returns_a_generator(handle: Any) -> Any:
    return (i for i in range(3))


def returns_too_much(handle: Any, n_bytes: int) -> bytes:
    return b"\0" * n_bytes


def writes_large_result(handle: Any, texts: list[str], folder: str) -> dict[str, Any]:
    """The documented way out for big results: write them at the site, return where."""
    import numpy as _np

    rows = [handle.hidden_states(t, layers=[-1])["layers"]["-1"].numpy() for t in texts]
    path = Path(folder) / "activations.npz"
    _np.savez(path, *rows)
    return {"path": str(path), "shapes": [list(r.shape) for r in rows]}


def server_pid(handle: Any) -> int:
    """The worker's own pid (the function must not run inside the model server)."""
    import os as _os

    handle.generate("x", max_tokens=1)
    return _os.getpid()


def started_at(handle: Any, hold_s: float) -> tuple[int, float]:
    """Its process's pid and when that process was started (Unix time)."""
    import os as _os
    import time as _time

    import psutil

    _time.sleep(hold_s)
    return _os.getpid(), psutil.Process().create_time()


# -- tests ---------------------------------------------------------------------------------------

def test_handle_offers_every_mode(fab: Fabric) -> None:
    texts = [PROMPT, "Proteins fold into shapes"]
    out = fab.submit(use_every_mode, texts, model=TINY_MODEL).result(timeout=300)
    assert out["model"] == TINY_MODEL
    assert out["token_ids"] == fab.generate(texts[0], model=TINY_MODEL, max_tokens=6).token_ids
    assert out["embed_shape"][0] == 2 and out["norms"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out["hidden_shapes"] == {"1": [1, out["embed_shape"][1]],
                                    "-1": [1, out["embed_shape"][1]]}
    direct = fab.logprobs(texts[0], " the cell", model=TINY_MODEL)
    assert out["n_scored"] == len(direct["token_ids"])
    assert out["logprob_total"] == pytest.approx(direct["total"], abs=1e-6)


def test_function_runs_in_a_request_worker(fab: Fabric, local_site: LocalSite) -> None:
    pid = fab.submit(server_pid, model=TINY_MODEL).result(timeout=300)
    servers = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d.get("health")]
    assert servers and all(pid != d["health"].get("pid") for d in servers)
    assert pid != os.getpid() and pid != local_site.info.get("pid")


def test_each_call_gets_a_process_started_before_it(fab: Fabric,
                                                    local_site: LocalSite) -> None:
    """Each request worker keeps a spare process started (fabric.endpoint.userchild): a call
    does not wait for one to start, and no process serves two calls."""
    import time

    workers = int(local_site.info["workers"])
    # Every worker busy at once: each has built its context (which starts its spare).
    first = [f.result(timeout=300) for f in
             [fab.submit(started_at, 1.0, model=None) for _ in range(workers)]]
    pids = {pid for pid, _ in first}
    for _ in range(4):
        time.sleep(1.0)  # the spare a worker starts once a call is over
        submitted = time.time()
        pid, created = fab.submit(started_at, 0.0, model=None).result(timeout=300)
        assert created < submitted, (created, submitted)
        assert pid not in pids
        pids.add(pid)


def test_probe_trained_at_site(fab: Fabric) -> None:
    texts = ["Cells divide by mitosis.", "Enzymes speed up reactions.",
             "Photons carry light.", "Gravity bends spacetime."]
    out = fab.submit(train_probe_at_site, texts, [1, 1, 0, 0], 2,
                     model=TINY_MODEL).result(timeout=300)
    assert out["n"] == 4 and 0.0 <= out["train_accuracy"] <= 1.0
    assert len(out["weights"]) > 0


def test_function_that_raises(fab: Fabric) -> None:
    with pytest.raises(UserFunctionError, match="ZeroDivisionError") as err:
        fab.submit(raises_inside, 3, model=TINY_MODEL).result(timeout=300)
    assert err.value.details["exception_type"] == "ZeroDivisionError"
    tb = err.value.details["traceback"]
    assert "Traceback" in tb and "raises_inside" in tb and "value / 0" in tb


def test_unserialisable_result(fab: Fabric) -> None:
    with pytest.raises(UserFunctionError, match="cannot be serialised") as err:
        fab.submit(returns_a_generator, model=TINY_MODEL).result(timeout=300)
    assert err.value.details["reason"] == "unserialisable"
    assert err.value.details["type"] == "generator"


def test_result_size_limit(fab: Fabric) -> None:
    # Results are serialised with dill + base64 (x1.35 for bytes): 7 MB fits, 8 MB does not.
    small = fab.submit(returns_too_much, 7_000_000, model=TINY_MODEL).result(timeout=300)
    assert len(small) == 7_000_000
    with pytest.raises(ResultTooLarge) as err:
        fab.submit(returns_too_much, 8_000_000, model=TINY_MODEL).result(timeout=300)
    assert err.value.details["limit"] == RESULT_LIMIT_BYTES
    assert err.value.details["size"] > RESULT_LIMIT_BYTES


def test_large_results_go_to_the_site_filesystem(fab: Fabric, tmp_path: Path) -> None:
    texts = [PROMPT, "Proteins fold into shapes that decide what they do."]
    out = fab.submit(writes_large_result, texts, str(tmp_path), model=TINY_MODEL
                     ).result(timeout=300)
    with np.load(out["path"]) as saved:
        arrays = [saved[k] for k in sorted(saved.files, key=lambda k: int(k.split("_")[1]))]
    assert [list(a.shape) for a in arrays] == out["shapes"]


def test_unknown_model_fails_before_user_code(fab: Fabric) -> None:
    with pytest.raises(UnknownModel):
        fab.submit(raises_inside, 1, model="no-such-model").result(timeout=300)


def test_model_server_keeps_serving(fab: Fabric) -> None:
    """After every failure above, the same warm server still answers."""
    for fn, args in ((raises_inside, (1,)), (returns_a_generator, ())):
        with pytest.raises(UserFunctionError):
            fab.submit(fn, *args, model=TINY_MODEL).result(timeout=300)
    result = fab.generate(PROMPT, model=TINY_MODEL, max_tokens=4)
    assert 1 <= len(result.token_ids) <= 4
    ready = [d for d in fab.deployments() if d["model"] == TINY_MODEL and d["state"] == "ready"]
    assert len(ready) == 1


@pytest.mark.globus
def test_site_that_disallows_user_functions(tmp_path: Path, globus_closed: OfflineGlobus) -> None:
    """``allow_user_functions: false``: refused before the function or any model is touched.

    The site's policy is read by its workers: the real Globus Compute endpoint of a site with
    user functions off (``globus_closed``), reached through the real Executor, runs the check.
    """
    with Fabric(transport=globus_closed.transport(tmp_path / "home"), on_status=None) as remote:
        with pytest.raises(FunctionNotAllowed, match="allow_user_functions") as err:
            remote.submit(raises_inside, 1, model=TINY_MODEL).result(timeout=300)
        assert err.value.details["rule"] == "allow_user_functions"
        assert remote.transport.submit(list_deployments, None, None).result(timeout=120) == []
