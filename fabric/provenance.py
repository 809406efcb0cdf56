"""Provenance: the record every result carries so a number in a paper can be traced and rerun.

A model server builds the server's part once (``server_record``: model name, version, weights
hash, plan, fabric version, deployment); each result adds its request's part (``for_request``:
kind, seed, sampling settings). On the wire and in campaign output lines it is a plain map under
``"provenance"``; the SDK parses it as ``Provenance`` (``GenerationResult.provenance``,
``result["provenance"]`` of ``hidden_states``/``logprobs``, ``fab.embed(...,
return_provenance=True)``).

``Provenance.rerun()`` gives the keyword arguments of ``Fabric.generate`` that reproduce a
generation: the weights pinned by hash, the same sampling settings and the seed it was drawn
with (recorded even when the caller gave none). The same tokens come back from the same plan;
another plan (pp, tp, dtype, device) may differ in the last bits of the logits, and so, rarely,
in a token.

Imports only pydantic: the protocol, the engine and the SDK all use it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PLAN_KEYS = ("pp", "tp", "ep", "dtype", "device", "fp8")


class PlanRecord(BaseModel):
    """The parallel plan that served the result."""

    model_config = ConfigDict(extra="ignore")
    pp: int = 1
    tp: int = 1
    ep: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    fp8: str = ""
    """FP8 weights ``keep`` (scaled FP8 matmuls) or ``dequantize`` (at load), as resolved by
    the server (``fabric.engine.fp8``); "" for checkpoints without FP8 tensors."""


class Provenance(BaseModel):
    """Which weights, plan, software and settings produced a result."""

    model_config = ConfigDict(extra="forbid")
    model: str
    """Catalog name."""
    version: str
    """Catalog version (a registered model's, or a built-in's)."""
    sha256: str
    """Weights hash (``fabric.weights.weights_sha256``): pin it as ``version="sha256:<hex>"``."""
    plan: PlanRecord
    fabric_version: str
    deployment_id: str = ""
    kind: Literal["generate", "embed", "hidden_states", "logprobs"] = "generate"
    seed: int | None = None
    """The seed the tokens were drawn with (``generate``): the request's, or the one the server
    drew at random when it gave none, so every generation can be rerun; ``None`` otherwise."""
    sampling: dict[str, Any] | None = None
    """The request's sampling settings (``SamplingParams``) for ``generate``; else ``None``."""
    hooks: int = Field(0, ge=0)
    """How many hooks (steer, ablate, capture) the request carried: the result depends on them."""
    site: str | None = None
    """The site that served it, where a federation's routing chose among several."""
    resent_from: str | None = None
    """The deployment that had accepted this request when its scheduler ended it at its
    walltime; the request was then run again, whole, by ``deployment_id`` (same seed)."""

    def rerun(self) -> dict[str, Any]:
        """Keyword arguments of ``Fabric.generate`` reproducing this result: the model pinned
        by weights hash, the same sampling settings and seed (hooks are the caller's to pass)."""
        sampling = dict(self.sampling or {})
        keep = ("max_tokens", "temperature", "top_p", "top_k", "stop", "logprobs")
        return {"model": self.model, "version": f"sha256:{self.sha256}",
                **{k: sampling[k] for k in keep if k in sampling}, "seed": self.seed}


def server_record(name: str, version: str, sha256: str, plan: dict[str, Any],
                  deployment_id: str = "") -> dict[str, Any]:
    """The server's part of every result's provenance (built once per model server)."""
    from fabric import __version__  # at call time: fabric/__init__ is then fully loaded

    return {"model": name, "version": version, "sha256": sha256,
            "plan": PlanRecord.model_validate(plan).model_dump(),
            "fabric_version": __version__, "deployment_id": deployment_id}


def for_request(server: dict[str, Any], request: Any, seed: int) -> dict[str, Any]:
    """``server``'s record with ``request``'s kind, sampling settings and hook count and the
    ``seed`` its tokens were drawn with added."""
    generates = request.kind == "generate"
    return {**server, "kind": request.kind, "seed": seed if generates else None,
            "sampling": request.sampling.model_dump() if generates else None,
            "hooks": len(request.hooks or [])}
