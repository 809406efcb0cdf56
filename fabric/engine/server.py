"""The model server program: ``python -m fabric.engine.server CONFIG_JSON [--launch-index N]``.

Every rank of the batch job runs this. Each builds its own slice of the model; the head
(rank 0) also binds the ZMQ front door, writes the info file the endpoint waits for, and runs
the serving loop; the other ranks follow the head's steps until it tells them to stop (idle
timeout, drain, or SIGTERM from the scheduler at walltime / scancel).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import zmq

from fabric import env, tickets
from fabric.engine.dist import RankInfo, init_groups, rank_from_env
from fabric.engine.engine import Engine, StepExecutor
from fabric.engine.experts import sparse_layers
from fabric.engine.families import attention_spec
from fabric.engine.fp8 import weight_bytes
from fabric.engine.frontend import Frontend
from fabric.engine.graphs import GraphOptions
from fabric.engine.launch import ServerLaunchConfig, select_accelerator, threads_per_rank
from fabric.engine.loader import DTYPES, build_stage
from fabric.engine.netaddr import front_door
from fabric.engine.pipeline import Pipeline, hand_off, worker_loop
from fabric.engine.prepare import ModelLimits, Preparer
from fabric.engine.runner import StageRunner
from fabric.engine.scheduler import Limits
from fabric.provenance import server_record
from fabric.weights import HashJob, materialize

log = logging.getLogger("fabric.server")


def curve_keys(folder: Path) -> tuple[bytes, bytes]:
    """The site's server CURVE key pair (public, secret), created 0600 on first use."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    pub, sec = folder / "server.key", folder / "server.key_secret"
    if not sec.exists():
        public, secret = zmq.curve_keypair()
        for path, data in ((pub, public), (sec, secret)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
    return pub.read_bytes().strip(), sec.read_bytes().strip()


def write_info(cfg: ServerLaunchConfig, info: dict[str, Any]) -> None:
    """Atomically (re)write the info file the endpoint polls."""
    path = Path(cfg.info_path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.chmod(0o600)
    tmp.replace(path)


def _threads(cfg: ServerLaunchConfig, world: int) -> int:
    configured = env.OMP_NUM_THREADS.get_int()
    if configured is not None:
        return configured
    return threads_per_rank(cfg.server.threads_per_rank, env.ranks_on_node() or world)


def _device(cfg: ServerLaunchConfig, info: RankInfo) -> str:
    """This rank's device: its node-local GPU when the plan says cuda."""
    if cfg.plan.device != "cuda":
        return "cpu"
    index = info.rank % max(1, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def _wrap_deepspeed(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hand the stage to DeepSpeed-Inference (placement and dtype; tp is done at load)."""
    import deepspeed

    deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=False,
                             tensor_parallel={"tp_size": 1})


def _fast_path(cfg: ServerLaunchConfig, info: RankInfo) -> GraphOptions | None:
    """The decode fast path's options where the plan and config allow it (``None``: off)."""
    s = cfg.server
    on_cuda = cfg.plan.device == "cuda"
    if info.world != 1 or s.decode_graphs == "off" or (s.decode_graphs == "auto" and not on_cuda):
        return None
    return GraphOptions(slots=min(s.graph_slots, s.max_running), slot_tokens=s.graph_slot_tokens,
                        capture=on_cuda, compile=on_cuda and s.graph_compile)


def serve(cfg: ServerLaunchConfig, info: RankInfo) -> str:
    """Load this rank's part and serve (head) or follow (other ranks); returns why it ended."""
    torch.set_num_threads(_threads(cfg, info.world))
    # The weights are made ready and hashed here, where they are loaded, never by the request
    # worker that launched the job: a GGUF entry is converted once (file lock), and the head
    # settles the hash in background threads while the ranks load (``HashJob``: a registered
    # model whose files changed is refused at once).
    materialize(cfg.model, Path(cfg.weights_path))
    hashing = HashJob(Path(cfg.weights_path), cfg.sha256, cfg.weights_claim) \
        if info.is_head else None
    backend = "nccl" if cfg.plan.device == "cuda" else "gloo"
    groups = init_groups(info, cfg.master_addr, cfg.master_port, backend, cfg.server.network,
                         cfg.rendezvous_path, cfg.rendezvous_token)
    head_info = {"pid": os.getpid(), "state": "loading", "address": None, "public_key": None}
    if info.is_head:
        write_info(cfg, head_info)
    fp8_mode = ""
    if cfg.model.family == "embedding":
        from fabric.engine.encoder import EncoderExecutor

        executor: Any = EncoderExecutor(Path(cfg.weights_path), DTYPES[cfg.plan.dtype])
        config = executor.config
    else:
        device = _device(cfg, info)
        handoff = hand_off(cfg.plan.device, cfg.plan.dtype, backend, device)
        model, report = build_stage(Path(cfg.weights_path), info.rank, info.pp, info.tp,
                                    cfg.plan.dtype, groups.tp_comm(),
                                    Path(cfg.shard_dir) if cfg.shard_dir else None,
                                    device, cfg.plan.balance, cfg.plan.ep, cfg.plan.fp8)
        if not model.kept_fp8:  # init_inference casts every tensor, FP8 buffers included
            _wrap_deepspeed(model, DTYPES[cfg.plan.dtype])
        # The decode fast path fuses dense MLPs and grouped-query attention with plain
        # weights only: mixtures of experts, latent attention and kept FP8 run eagerly.
        stage = StageRunner(model, _fast_path(cfg, info) if model.fast_path_capable else None)
        log.info("rank %d loaded %d bytes in %.2f s (fp8: %s)", info.rank, report.bytes_read,
                 report.seconds, report.fp8 or "none in checkpoint")
        # Recorded from what the model holds, not from what was asked.
        fp8_mode = "keep" if weight_bytes(model)["fp8"] else report.fp8 and "dequantize"
        config = model.config
        if not info.is_head:
            worker_loop(info, groups, stage, handoff)
            return "stopped"
        executor = Pipeline(info, groups, stage, cfg.server.micro_batches, handoff)
    assert hashing is not None  # the head's
    return _serve_head(cfg, info, executor, config, head_info, hashing, fp8_mode)


def _serve_head(cfg: ServerLaunchConfig, info: RankInfo, executor: StepExecutor, config: Any,
                head_info: dict[str, Any], hashing: HashJob, fp8_mode: str = "") -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.weights_path)
    causal = cfg.model.family != "embedding"
    eos = config.eos_token_id if causal else None
    eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])}
    s = cfg.server
    step_tokens = s.max_batch_tokens if causal else s.encoder_batch_tokens
    # All layers sliding (Mistral): a sequence holds at most the window's KV tokens.
    window = attention_spec(config).uniform_window if causal else None
    limits = Limits(s.kv_budget_tokens, step_tokens, s.max_running, chunked_prefill=causal,
                    kv_window=window)
    context: Any = (cfg.model.max_context or getattr(executor, "max_tokens", None)
                    or getattr(config, "max_position_embeddings", 512))
    settled = hashing.result()  # what the result identities carry: wait for the hash
    log.info("weights sha256 %s (%s, %.2f s)", settled.sha256, settled.how, settled.seconds)
    identity = {"name": cfg.model.name, "version": cfg.model.version, "sha256": settled.sha256}
    key = tickets.load_or_create_key(Path(cfg.ticket_key_path))
    public, secret = curve_keys(Path(cfg.curve_dir))
    preparer = Preparer(tok, ModelLimits(
        n_layers=config.num_hidden_layers, hidden=config.hidden_size,
        heads=config.num_attention_heads,
        intermediate=getattr(config, "intermediate_size", 0), context=int(context),
        kv_budget=s.kv_budget_tokens, causal=causal, kv_window=window,
        sparse_layers=sparse_layers(config)))
    extra = {"model": identity, "plan": {"pp": info.pp, "tp": info.tp, "ep": cfg.plan.ep,
                                         "dtype": cfg.plan.dtype, "fp8": fp8_mode},
             "deployment_id": cfg.deployment_id}
    # The FP8 mode as resolved on this node (``auto`` differs by GPU): it changes the logits.
    record = server_record(cfg.model.name, cfg.model.version, settled.sha256,
                           {**cfg.plan.model_dump(), "fp8": fp8_mode},
                           cfg.deployment_id)  # once per server
    engine = Engine(executor, tok, limits, {**identity, "provenance": record}, eos_ids,
                    config.num_hidden_layers,
                    emit=lambda rid, msg: None)  # replaced once the front door is bound
    frontend = Frontend(engine, preparer, s, key, cfg.model.name, extra)
    door = front_door(s.network)  # the site's bind/advertise choice, on this node
    port = frontend.bind(door.bind, secret, public)
    engine.emit = frontend.emitter()
    head_info.update(address=f"tcp://{door.advertise}:{port}", public_key=public.decode(),
                     sha256=settled.sha256, weights=settled.to_dict())
    frontend.state = "ready"
    frontend.start()
    head_info["state"] = "ready"
    write_info(cfg, head_info)
    signal.signal(signal.SIGTERM, lambda *_: setattr(engine, "stop_requested", True))
    why = engine.run(s.idle_timeout_s, lambda: frontend.draining)
    frontend.stop()
    # Tokens not yet collected by the site (streams that ended since its last collection,
    # or during a drain) go with the epitaph: the site records them when it reads it.
    write_info(cfg, {**head_info, "state": "dead", "reason": why,
                     "usage": frontend.usage.close()})
    return why


def main(argv: list[str] | None = None) -> int:
    """Entry point for every rank."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path, help="ServerLaunchConfig JSON")
    parser.add_argument("--launch-index", type=int, default=None,
                        help="1-based copy index from Parsl's SingleNodeLauncher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = ServerLaunchConfig.read(args.config)
    info = rank_from_env(cfg.plan.pp, cfg.plan.tp, args.launch_index)
    try:
        select_accelerator(cfg.plan.device)
        why = serve(cfg, info)
    except BaseException as exc:
        if info.is_head:
            # The endpoint waits on this file: say why instead of letting it time out.
            write_info(cfg, {"pid": os.getpid(), "state": "dead", "address": None,
                             "public_key": None, "reason": f"{type(exc).__name__}: {exc}"})
        raise
    log.info("rank %d exits: %s", info.rank, why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
