"""A steering vector: push generations toward one concept with a per-request hook.

    python examples/steering.py                      # SmolLM2, decoder layer 10, scale 4
    python examples/steering.py --layer 12 --scale 8

1. Collect the residual stream after decoder layer L (``hidden_states`` index L + 1) for two
   sets of prompts (here: joyful vs gloomy sentences), mean over tokens and prompts.
2. The steering vector is the difference of the two means.
3. Generate the same prompts without and with a ``steer`` hook at layer L that adds
   ``scale * vector`` to every token's residual stream. The hook lives only in that request:
   the unsteered requests batched next to it are unchanged.

Layer numbering: a hook's ``layer`` is a decoder layer (0 .. L-1); ``hidden_states`` layers count
as transformers does, 0 = embeddings, so the output of decoder layer L is ``hidden_states[L + 1]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import inspect
import json
import sys
from typing import Any

import numpy as np

from fabric import Fabric
from fabric.client.decoding import parse_generation
from fabric.protocol import GenerationResult, InferenceRequest

POSITIVE = [
    "I love this! What a wonderful, joyful day.",
    "We laughed and celebrated; everything was delightful.",
    "This is fantastic news, I am so happy and grateful.",
    "The party was amazing and everyone was smiling.",
]
NEGATIVE = [
    "I hate this. What a miserable, gloomy day.",
    "We cried and argued; everything was awful.",
    "This is terrible news, I am so sad and angry.",
    "The party was a disaster and everyone was upset.",
]
PROMPTS = ["I think the movie was", "Today at work I felt", "The weather this weekend"]


def mean_activation(fab: Fabric, texts: list[str], hs_layer: int, model: str) -> Any:
    """Mean over tokens, then over texts, of ``hidden_states[hs_layer]``."""
    def one(text: str) -> Any:
        out = fab.hidden_states(text, model=model, layers=[hs_layer])
        return out["layers"][str(hs_layer)].numpy().mean(0)

    with cf.ThreadPoolExecutor(4) as pool:
        return np.mean(list(pool.map(one, texts)), axis=0)


def generate(fab: Fabric, prompt: str, model: str, max_tokens: int,
             hooks: list[dict[str, Any]]) -> GenerationResult:
    """``fab.generate`` with per-request hooks.

    Until ``Fabric.generate`` takes ``hooks=``, the request is built here and run by the
    endpoint's ``run_request`` through the SDK's own transport (what ``generate`` does inside).
    """
    if "hooks" in inspect.signature(fab.generate).parameters:
        extra: dict[str, Any] = {"hooks": hooks}
        return fab.generate(prompt, model=model, max_tokens=max_tokens, **extra)
    from fabric.wire.functions import run_request

    request = InferenceRequest(model=model, prompt=prompt, hooks=hooks,
                               sampling={"max_tokens": max_tokens})
    return parse_generation(fab.transport.submit(
        run_request, request.model_dump(mode="json"), fab.auth).result())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="local", help="site name or definition folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=10, help="decoder layer to steer")
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", help="prompt to steer (repeatable)")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    prompts = args.prompt or PROMPTS
    with Fabric(site=args.site) as fab:
        hs = args.layer + 1  # the output of decoder layer L
        vector = (mean_activation(fab, POSITIVE, hs, args.model)
                  - mean_activation(fab, NEGATIVE, hs, args.model))
        print(f"steering vector: decoder layer {args.layer}, {vector.shape[0]} dims, "
              f"norm {np.linalg.norm(vector):.2f}, scale {args.scale}")
        steer = [{"kind": "steer", "layer": args.layer, "scale": args.scale,
                  "vector": [float(v) for v in vector]}]
        away = [{**steer[0], "scale": -args.scale}]
        # All requests in flight together: steered and plain ones share the server's batches.
        with cf.ThreadPoolExecutor(6) as pool:
            jobs = {(p, name): pool.submit(generate, fab, p, args.model, args.max_tokens, hooks)
                    for p in prompts for name, hooks in
                    (("plain", []), ("toward", steer), ("away", away))}
            out = {key: job.result() for key, job in jobs.items()}
            # The same plain requests again, without steered neighbours, for comparison.
            plain_again = list(pool.map(
                lambda p: generate(fab, p, args.model, args.max_tokens, []), prompts))

    rows = []
    for p, again in zip(prompts, plain_again, strict=True):
        texts = {name: out[(p, name)].text for name in ("plain", "toward", "away")}
        print(f"\n{p!r}")
        print(f"  plain:          {texts['plain']!r}")
        print(f"  toward joyful:  {texts['toward']!r}")
        print(f"  toward gloomy:  {texts['away']!r}")
        rows.append({"prompt": p, **texts,
                     "plain_unchanged_in_batch": out[(p, "plain")].token_ids == again.token_ids})
    print("\nplain generations batched with steered ones equal plain ones run alone: "
          f"{all(r['plain_unchanged_in_batch'] for r in rows)}")
    if args.json:
        print(json.dumps({"example": "steering", "model": args.model, "layer": args.layer,
                          "scale": args.scale, "vector_norm": float(np.linalg.norm(vector)),
                          "dim": int(vector.shape[0]), "generations": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
