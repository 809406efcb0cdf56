"""A linear probe on hidden states: does a middle layer know biology from physics?

    python examples/linear_probe.py                    # SmolLM2, decoder output of layer 15
    python examples/linear_probe.py --layer 24
    python examples/linear_probe.py --at-site          # collect + train next to the model

For each sentence we take the residual stream at one layer at the last token
(``fab.hidden_states(text, layers=[layer], positions=[-1])``), then fit a logistic regression
(numpy, L2-regularised, full-batch gradient descent) on a training split and report accuracy on
held-out sentences. Layer 0 (the token embeddings) is the control: every sentence ends in ".",
so its last-token embedding is the same for all of them and the probe can only guess.

With ``--at-site`` the whole job (features and training) runs as a user function at the site
(``fab.submit``), and only the probe's accuracy comes back: how one would probe thousands of
sentences without moving their activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from fabric import Fabric

BIOLOGY = [
    "The mitochondria is the powerhouse of the cell.",
    "Enzymes speed up chemical reactions in living cells.",
    "DNA carries the genetic instructions of an organism.",
    "Red blood cells carry oxygen around the body.",
    "Plants make sugar from sunlight by photosynthesis.",
    "Bacteria can divide every twenty minutes.",
    "Neurons send signals with electrical impulses.",
    "The liver breaks down toxins in the blood.",
    "Proteins fold into shapes that decide their function.",
    "Antibodies recognise viruses and mark them for destruction.",
    "Ribosomes translate messenger RNA into protein.",
    "Evolution acts on variation within a population.",
    "The heart pumps blood through arteries and veins.",
    "Fungi absorb nutrients from decaying matter.",
    "Insulin lets cells take up glucose.",
    "A species is a group of organisms that can interbreed.",
]
PHYSICS = [
    "A photon is a particle of light with no rest mass.",
    "Gravity bends the path of light near a massive star.",
    "Energy is conserved in a closed system.",
    "Electrons in a magnetic field move along curved paths.",
    "The speed of light in vacuum is the same for every observer.",
    "Heat flows from a hot body to a cold one.",
    "A pendulum's period depends on its length.",
    "Current through a resistor is proportional to the voltage.",
    "Entropy of an isolated system never decreases.",
    "Sound travels faster in water than in air.",
    "A lens focuses light by refraction.",
    "Nuclear fission releases energy by splitting heavy atoms.",
    "Momentum is conserved when two balls collide.",
    "Quarks are held together by the strong force.",
    "A black hole's gravity traps even light.",
    "Radio waves are electromagnetic waves with long wavelengths.",
]


def split(n_per_class: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified train/test split of indices into ``BIOLOGY + PHYSICS``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for offset in (0, n_per_class):
        idx = rng.permutation(n_per_class) + offset
        n_test = max(1, round(test_fraction * n_per_class))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return train, test


def probe(source: Any, texts: list[str], labels: list[int], layers: list[int],
          train: list[int], test: list[int], model: str | None = None) -> dict[str, Any]:
    """Last-token features at ``layers``, then a logistic regression per layer.

    ``source`` is a ``Fabric`` (here; pass ``model``) or the ``ModelHandle`` a user function
    gets at the site. The function is self-contained (imports inside, no module globals) because
    ``fab.submit`` ships it by value from a script.
    """
    import concurrent.futures as cf

    import numpy as np

    extra = {"model": model} if model else {}

    def one(text: str) -> dict[str, Any]:
        out = source.hidden_states(text, layers=layers, positions=[-1], **extra)
        return {key: value[0].numpy() for key, value in out["layers"].items()}

    # A few requests in flight at once: the model server batches them.
    with cf.ThreadPoolExecutor(4) as pool:
        rows = list(pool.map(one, texts))
    y = np.asarray(labels, dtype=np.float64)
    scores: dict[str, Any] = {}
    for layer in layers:
        x = np.stack([r[str(layer)] for r in rows]).astype(np.float64)
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(500):  # L2-regularised logistic regression, full-batch descent
            p = 1.0 / (1.0 + np.exp(-(x[train] @ w + b)))
            w -= 0.1 * (x[train].T @ (p - y[train]) / len(train) + 1e-2 * w)
            b -= 0.1 * float((p - y[train]).mean())
        pred = (x @ w + b > 0).astype(float)
        scores[str(layer)] = {"train_accuracy": float((pred[train] == y[train]).mean()),
                              "test_accuracy": float((pred[test] == y[test]).mean()),
                              "dim": int(x.shape[1])}
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="local", help="site name or definition folder")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15,
                        help="hidden-state layer to probe (SmolLM2 has 30 decoder layers)")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--at-site", action="store_true",
                        help="collect features and train inside a user function at the site")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    texts = BIOLOGY + PHYSICS
    labels = [1] * len(BIOLOGY) + [0] * len(PHYSICS)
    train, test = split(len(BIOLOGY), args.test_fraction, args.seed)
    layers = [0, args.layer]
    started = time.perf_counter()
    with Fabric(site=args.site) as fab:
        if args.at_site:
            # Runs as probe(handle, ...) in a request worker next to the model server.
            scores = fab.submit(probe, texts, labels, layers, train, test,
                                model=args.model).result()
        else:
            scores = probe(fab, texts, labels, layers, train, test, model=args.model)
    seconds = time.perf_counter() - started
    print(f"features: {len(texts)} sentences x {scores[str(args.layer)]['dim']} dims at "
          f"layers {layers} (last token)")
    print(f"train {len(train)} / held-out {len(test)} sentences; "
          f"{'at the site' if args.at_site else 'here'}; {seconds:.1f} s")
    for layer in layers:
        s = scores[str(layer)]
        note = "  (control: token embeddings)" if layer == 0 else ""
        print(f"  layer {layer:>3}: train {s['train_accuracy']:.2f}  "
              f"held-out {s['test_accuracy']:.2f}{note}")
    if args.json:
        print(json.dumps({"example": "linear_probe", "model": args.model, "layers": layers,
                          "n_train": len(train), "n_test": len(test), "scores": scores,
                          "at_site": args.at_site, "seconds": round(seconds, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
