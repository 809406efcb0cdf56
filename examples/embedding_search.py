"""Embedding similarity search: embed a small corpus, rank it by cosine similarity to queries.

    python examples/embedding_search.py                       # SmolLM2 vs MiniLM
    python examples/embedding_search.py --layer 15 --pooling last
    python examples/embedding_search.py --compare-with ""     # SmolLM2 only

Any causal LM gives embeddings: the hidden states of one layer (``--layer``, -1 = final normed
output, 0 = token embeddings) pooled over the tokens (mean / last / first) and L2-normalised, so
cosine similarity is a dot product. The same search runs with a model trained for embeddings
(all-MiniLM-L6-v2) for comparison: each sentence has a topic, and ``precision@3`` says how many
of a query's three nearest sentences share its topic (and how often the nearest one does).
The time printed for each model includes its cold start if its server was not running yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from fabric import Fabric

CORPUS = [
    ("biology", "The mitochondria is the powerhouse of the cell."),
    ("biology", "Enzymes are proteins that speed up chemical reactions in living things."),
    ("biology", "DNA is copied before a cell divides."),
    ("biology", "Photosynthesis turns sunlight, water and carbon dioxide into sugar."),
    ("physics", "A photon is a particle of light with no rest mass."),
    ("physics", "Gravity bends the path of light around massive stars."),
    ("physics", "Energy is conserved in a closed system."),
    ("physics", "Electrons in a magnetic field move along curved paths."),
    ("cooking", "Knead the dough for ten minutes before letting it rise."),
    ("cooking", "Simmer the tomato sauce slowly with garlic and basil."),
    ("cooking", "Whisk the eggs and sugar until the mixture is pale."),
    ("cooking", "Roast the vegetables in a hot oven until golden."),
]
QUERIES = [
    ("biology", "How do cells make energy?"),
    ("physics", "What is light made of?"),
    ("cooking", "How long should bread dough be kneaded?"),
]


def search(fab: Fabric, model: str, layer: int, pooling: str, k: int) -> dict[str, Any]:
    """Rank the corpus for each query; ``precision@k`` by topic."""
    started = time.perf_counter()
    # One call per list: the SDK sends one request per text and the server batches them.
    docs = fab.embed([text for _, text in CORPUS], model=model, layer=layer, pooling=pooling)
    queries = fab.embed([text for _, text in QUERIES], model=model, layer=layer,
                        pooling=pooling)
    seconds = time.perf_counter() - started
    scores = queries @ docs.T  # unit vectors: cosine similarity
    hits, firsts, rankings = 0, 0, []
    for (topic, query), row in zip(QUERIES, scores, strict=True):
        top = np.argsort(-row)[:k]
        hits += sum(CORPUS[i][0] == topic for i in top)
        firsts += CORPUS[top[0]][0] == topic
        rankings.append({"query": query, "top": [
            {"text": CORPUS[i][1], "topic": CORPUS[i][0], "cosine": round(float(row[i]), 4)}
            for i in top]})
    return {"model": model, "layer": layer, "pooling": pooling, "dim": int(docs.shape[1]),
            "precision_at_k": hits / (k * len(QUERIES)), "top1_accuracy": firsts / len(QUERIES),
            "k": k, "seconds": round(seconds, 3),
            "rankings": rankings}


def show(report: dict[str, Any]) -> None:
    print(f"\n== {report['model']} (layer {report['layer']}, {report['pooling']} pooling, "
          f"{report['dim']} dims, {report['seconds']:.2f} s for "
          f"{len(CORPUS) + len(QUERIES)} texts)")
    for ranking in report["rankings"]:
        print(f"  query: {ranking['query']}")
        for hit in ranking["top"]:
            print(f"    {hit['cosine']:+.3f}  [{hit['topic']}] {hit['text']}")
    print(f"  by topic: precision@{report['k']} {report['precision_at_k']:.2f}, "
          f"nearest neighbour right {report['top1_accuracy']:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="local", help="site name or definition folder")
    parser.add_argument("--model", default="smollm2-135m", help="causal LM to embed with")
    parser.add_argument("--layer", type=int, default=-1, help="hidden-state layer (-1 = last)")
    parser.add_argument("--pooling", choices=("mean", "last", "first"), default="mean")
    parser.add_argument("--compare-with", default="minilm-l6",
                        help="an embedding model to compare with ('' to skip)")
    parser.add_argument("-k", type=int, default=3, help="neighbours per query")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    reports = []
    with Fabric(site=args.site) as fab:
        reports.append(search(fab, args.model, args.layer, args.pooling, args.k))
        if args.compare_with:
            # Embedding models return their own (final-layer, mean-pooled) sentence vectors.
            reports.append(search(fab, args.compare_with, -1, "mean", args.k))
    for report in reports:
        show(report)
    if args.json:
        print(json.dumps({"example": "embedding_search", "reports": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
