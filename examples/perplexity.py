"""Perplexity and scoring with ``fab.logprobs``: per-token log-probabilities of a continuation.

    python examples/perplexity.py                        # built-in texts on SmolLM2
    python examples/perplexity.py --text "Water boils at 100 degrees Celsius."

``fab.logprobs(context, continuation)`` returns ``log p(token | everything before it)`` for each
token of ``continuation``, exactly as transformers computes them in fp32. Perplexity is
``exp(-mean log p)``. Each text is split at its first space: the first word is the context, the
rest is scored. A fluent sentence should score a lower perplexity than the same words shuffled;
and the same continuation can be compared under different contexts (a multiple-choice score).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from typing import Any

from fabric import Fabric

TEXTS = [
    "The mitochondria is the powerhouse of the cell.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital and largest city of France.",
]
CHOICE = ("The capital of France is", [" Paris.", " Berlin.", " a banana."])


def score(fab: Fabric, text: str, model: str) -> dict[str, Any]:
    """Per-token log-probs and perplexity of ``text`` after its first word."""
    context, _, rest = text.partition(" ")
    if not rest.strip():
        raise SystemExit(f"need at least two words to score: {text!r}")
    out = fab.logprobs(context, " " + rest, model=model)
    logprobs = [float(x) for x in out["logprobs"]]
    mean = sum(logprobs) / len(logprobs)
    return {"text": text, "context": context, "token_ids": list(out["token_ids"]),
            "logprobs": logprobs, "total": float(out["total"]),
            "perplexity": math.exp(-mean)}


def shuffled(text: str, seed: int) -> str:
    words = text.rstrip(".").split()
    random.Random(seed).shuffle(words)
    return " ".join(words) + "."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="local", help="site name or definition folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", action="append", help="text to score (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="word-shuffle seed")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    texts = args.text or TEXTS
    with Fabric(site=args.site) as fab:
        scored = [score(fab, t, args.model) for t in texts]
        controls = [score(fab, shuffled(t, args.seed), args.model) for t in texts]
        context, options = CHOICE
        choices: list[dict[str, Any]] = [
            {"option": o, "total": float(fab.logprobs(context, o, model=args.model)["total"])}
            for o in options]

    for s in scored:
        print(f"\n{s['text']!r}  (context {s['context']!r})")
        for tok, lp in zip(s["token_ids"], s["logprobs"], strict=True):
            print(f"  token {tok:>6}  log p = {lp:8.3f}")
        print(f"  total {s['total']:.2f}, perplexity {s['perplexity']:.2f}")
    print("\nperplexity, sentence vs the same words shuffled:")
    for s, c in zip(scored, controls, strict=True):
        print(f"  {s['perplexity']:10.2f} vs {c['perplexity']:10.2f}   {s['text']}")
    print(f"\nscoring continuations of {context!r}:")
    for c in sorted(choices, key=lambda c: -c["total"]):
        print(f"  {c['total']:8.3f}  {c['option']!r}")
    if args.json:
        print(json.dumps({"example": "perplexity", "model": args.model, "scored": scored,
                          "shuffled": controls, "choices": choices}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
