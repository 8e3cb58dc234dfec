"""Inference with and without the encoded-feature cache, in the same run (``ml.inference.EncodedFeatureCache``).

    python benchmarks/inference.py                      # scales small,medium
    python benchmarks/inference.py --scales small,medium,large --repeats 2

Per scale: the library chain on generated data (3 days, paper neighbourhood layout, features in memory as the
``entity_embeddings`` asset reads them), an untrained ``small`` model (the cost does not depend on the weights),
then every pin and board of the universe embedded through ``embed_entities``, alternating "anchor" (the cache
off: each batch encodes every distinct entity it names) and "cache" (each graph node encoded once per
embedder), best of ``--repeats``. The embeddings of both are compared before any time is printed. The ratio
is anchor time / cache time; ``growth`` is (time ratio) / (entity ratio) between consecutive scales. One
torch thread. The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_engine.batch import NeighborhoodLayout
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_table import open_features
from ml.config import small
from ml.inference import EncodedFeatureCache, embed_entities
from ml.model import OmniSageModel


def in_memory_builder(builder) -> BatchBuilder:
    """The fixture's builder over the in-memory ``FeatureTable`` (what the asset uses when it fits)."""
    f = builder.featurizer
    table = open_features(f.path, max_tokens=f.max_tokens, snapshot=builder.snapshot)
    return BatchBuilder(builder.snapshot, builder.neighborhoods, table, builder.layout)


def embed_all(model, builder, universe, cached: bool) -> tuple[float, list[np.ndarray]]:
    nodes = len(builder.snapshot.node_id)
    t0 = time.perf_counter()
    out = []
    for entity_type in ("pin", "board"):
        cache = EncodedFeatureCache(nodes, max_bytes=(4 << 30) if cached else 0)
        out.append(embed_entities(model, builder, entity_type, universe[entity_type], feature_cache=cache))
    return time.perf_counter() - t0, out


def one_scale(scale: str, repeats: int) -> dict:
    from tests.pipeline_fixtures import build_library_pipeline

    art = build_library_pipeline(
        Path(tempfile.mkdtemp()), scale=scale, layout=NeighborhoodLayout.paper_default(), budget=10_000
    )
    builder = in_memory_builder(art.builder)
    cfg, _ = small(image_dim=art.image_dim)
    torch.manual_seed(0)
    model = OmniSageModel(cfg).eval()
    best = {"anchor": float("inf"), "cache": float("inf")}
    for _ in range(repeats):
        for mode in ("anchor", "cache"):
            seconds, emb = embed_all(model, builder, art.universe, cached=mode == "cache")
            best[mode] = min(best[mode], seconds)
            if mode == "anchor":
                reference = emb
            diff = max(float(np.abs(a - b).max(initial=0.0)) for a, b in zip(emb, reference))
            if diff > 1e-4:
                raise SystemExit(f"{scale}: cached embeddings differ from the anchor's by {diff:.2e}")
    entities = int(sum(art.universe[t].size for t in ("pin", "board")))
    row = {
        "scale": scale,
        "entities": entities,
        "graph_nodes": len(builder.snapshot.node_id),
        "anchor_s": round(best["anchor"], 2),
        "cache_s": round(best["cache"], 2),
        "anchor_entities_per_s": round(entities / best["anchor"]),
        "cache_entities_per_s": round(entities / best["cache"]),
        "ratio": round(best["anchor"] / best["cache"], 2),
    }
    print(
        f"{scale}: {entities} entities, {row['graph_nodes']} graph nodes: anchor {row['anchor_s']} s "
        f"({row['anchor_entities_per_s']}/s), cache {row['cache_s']} s ({row['cache_entities_per_s']}/s), "
        f"ratio {row['ratio']}",
        flush=True,
    )
    return row


def growth(rows: list[dict], key: str) -> list[dict]:
    return [
        {
            "from": a["scale"],
            "to": b["scale"],
            "growth": round((b[key] / a[key]) / (b["entities"] / a["entities"]), 2),
        }
        for a, b in itertools.pairwise(rows)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="small,medium", help="comma-separated synthetic scales")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each mode (best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [one_scale(s, args.repeats) for s in args.scales.split(",")]
    result = {
        "benchmark": "inference",
        "machine": f"{platform.node()} {torch.get_num_threads()} torch thread(s)",
        "scales": rows,
        "growth_anchor": growth(rows, "anchor_s"),
        "growth_cache": growth(rows, "cache_s"),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
