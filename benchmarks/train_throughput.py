"""Training throughput on CPU (small preset): asynchronous loader vs synchronous vs prebuilt batches.

Builds its own synthetic day with the library chain (the generator's ``small`` scale, the paper's
neighbourhood layout of 25 + 75 + 50 neighbours, the demo's batch of 64 pairs and 64 random negatives), then
trains the same model (same seed) several ways, each for the same number of timed steps after warm-up:

- ``examples_per_s``           ml.loader.BatchLoader with the default workers, features in memory
- ``examples_per_s_sync``      the same batches built on the training thread (num_workers=0)
- ``examples_per_s_prebuilt``  the same steps materialised as tensors beforehand: the model-bound ceiling
- ``examples_per_s_rocksdb``   the asynchronous loader with the feature store over the memory budget
- ``inference_entities_per_s`` ml.inference.embed_entities over every pin and board of the day

An example is one query of any task (the sum of the task batches' lengths in a step). Every figure uses the
machine default ``torch.get_num_threads()``; loader workers share those cores. ``--profile`` adds the top
operators of one training step (torch.profiler, self CPU time).

On a GPU (``--device cuda --preset paper``, what ``benchmarks/gpu_check.sh`` runs) it also reports steps/s,
peak GPU memory and the mean GPU utilisation sampled by nvidia-smi during the asynchronous run.

Usage: python benchmarks/train_throughput.py [--quick] [--steps N] [--workers N] [--profile]
                                             [--device cpu|cuda] [--preset small|paper] [--scale small]
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as ml/__init__.py does, before torch loads
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graph_engine.batch import NeighborhoodLayout
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_table import open_features
from ml.batches import tensorize_step
from ml.config import preset
from ml.inference import embed_entities
from ml.loader import BatchLoader, StepPayload, default_num_workers
from ml.step_sampler import BatchConfig, make_batch_iterator_factory
from ml.train import Trainer


class Prebuilt:
    """The steps of a loader, built once and replayed (keyed like the loader)."""

    resumable = True

    def __init__(self, payloads: list):
        self.payloads, self.steps_per_epoch = payloads, len(payloads)

    def __call__(self, epoch: int = 0, start: int = 0):
        return iter(self.payloads[start:])


def build_day(root: Path, scale: str):
    from tests.pipeline_fixtures import build_library_pipeline

    t0 = time.perf_counter()
    art = build_library_pipeline(root, scale=scale, days=3, layout=NeighborhoodLayout.paper_default(), budget=10_000)
    print(
        f"day built: {scale} scale in {time.perf_counter() - t0:.1f}s, {art.data.pairs.num_rows} training pairs, "
        f"{len(art.universe['pin'])} pins, {len(art.universe['board'])} boards",
        flush=True,
    )
    return art


class GpuUtilisation:
    """Mean GPU utilisation (%) sampled by nvidia-smi every 200 ms while the ``with`` block runs."""

    def __enter__(self):
        import subprocess

        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out = self.proc.communicate()[0]
        values = [float(v) for v in out.split() if v.strip().replace(".", "", 1).isdigit()]
        self.mean = sum(values) / len(values) if values else None


def timed_training(source, model_config, train_config, warmup: int, steps: int) -> tuple[float, int]:
    """-> (examples/s over the timed steps, examples) for one fresh trainer (same seed every time)."""
    trainer = Trainer(model_config, train_config, source, progress=None)
    counted = {"examples": 0}
    step = trainer.train_step

    def counting_step(batches):
        r = step(batches)
        counted["examples"] += int(r["examples"])
        return r

    trainer.train_step = counting_step
    trainer.fit(stop_after=warmup)
    counted["examples"] = 0
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.fit(stop_after=warmup + steps)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return counted["examples"] / seconds, counted["examples"]


def profile_step(source, model_config, train_config, top: int = 10) -> list[dict]:
    """Top operators of 3 steps by self time: CPU time on CPU, device time on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    trainer = Trainer(model_config, train_config, source, progress=None)
    payloads = list(source(0))[:4]
    trainer.train_step(payloads[0])
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for p in payloads[1:]:
            trainer.train_step(p)
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    total = sum(getattr(e, attr) for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms_per_step": round(getattr(e, attr) / 1e3 / 3, 2),
            "share": round(getattr(e, attr) / total, 3),
        }
        for e in rows
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps (finishes within 5 minutes on 2 cores)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    ap.add_argument("--workers", type=int, default=None, help="loader workers [default: ml.loader default]")
    ap.add_argument("--scale", default="small")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--negatives", type=int, default=64)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--preset", default="small", choices=["small", "paper"])
    args = ap.parse_args()
    steps = args.steps or (40 if args.quick else 100)
    warmup = 5
    workers = default_num_workers() if args.workers is None else args.workers
    threads = torch.get_num_threads()
    print(f"torch threads {threads}, loader workers {workers}, cpus {os.cpu_count()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="omnisage-throughput-") as tmp:
        art = build_day(Path(tmp), args.scale)
        mc, tc = preset(args.preset, image_dim=art.image_dim)
        tc = tc.replace(device=args.device, total_steps=10_000, warmup_steps=10, log_every=10_000, checkpoint_dir=None)
        cuda = args.device.startswith("cuda")
        table = open_features(art.features_dir, snapshot=art.snapshot)
        rocks = open_features(art.features_dir, memory_budget_mb=0)

        def source_for(features):
            builder = BatchBuilder(art.snapshot, art.neighborhoods, features, art.layout)
            batches = BatchConfig(
                batch_size=args.batch_size,
                num_random_negatives=args.negatives,
                seed=0,
                max_sequence_length=mc.sequence.max_len,
            )
            return make_batch_iterator_factory(art.data, builder, batches)

        results: dict = {
            "torch_threads": threads,
            "num_workers": workers,
            "steps": steps,
            "scale": args.scale,
            "batch_size": args.batch_size,
            "negatives": args.negatives,
            "device": args.device,
            "preset": args.preset,
        }
        runs = {
            "examples_per_s": (source_for(table), workers),
            "examples_per_s_sync": (source_for(table), 0),
            "examples_per_s_rocksdb": (source_for(rocks), workers),
        }
        for name, (source, n_workers) in runs.items():
            loader = BatchLoader(source, num_workers=n_workers, prefetch_factor=4, pin_memory=cuda)
            try:
                if cuda and name == "examples_per_s":
                    torch.cuda.reset_peak_memory_stats()
                    with GpuUtilisation() as util:
                        results[name], examples = timed_training(loader, mc, tc, warmup, steps)
                    results["gpu_utilisation_mean_pct"] = util.mean
                    results["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    results["steps_per_s"] = results[name] / (examples / steps)
                else:
                    results[name], _ = timed_training(loader, mc, tc, warmup, steps)
            finally:
                loader.close()
            print(f"{name}: {results[name]:.1f}", flush=True)
        source = source_for(table)
        payloads = [StepPayload(tensorize_step(source.build_step(0, i)), True) for i in range(warmup + steps)]
        if cuda:
            payloads = [p.pin_memory() for p in payloads]
        results["examples_per_s_prebuilt"], _ = timed_training(Prebuilt(payloads), mc, tc, warmup, steps)
        print(f"examples_per_s_prebuilt: {results['examples_per_s_prebuilt']:.1f}", flush=True)

        model = Trainer(mc, tc, Prebuilt(payloads), progress=None).model.eval()
        builder = BatchBuilder(art.snapshot, art.neighborhoods, table, art.layout)
        n, t0 = 0, time.perf_counter()
        for t in ("pin", "board"):
            ids = art.universe[t]
            embed_entities(model, builder, t, ids, batch_size=512)
            n += ids.size
        results["inference_entities_per_s"] = n / (time.perf_counter() - t0)
        print(f"inference_entities_per_s: {results['inference_entities_per_s']:.1f}", flush=True)
        if args.profile:
            results["top_ops"] = profile_step(Prebuilt(payloads), mc, tc)
            for row in results["top_ops"]:  # device time on CUDA
                print(f"  {row['op']:<60} {row['self_ms_per_step']:>8.2f} ms/step {row['share']:.1%}")

    results["ratio_async_to_prebuilt"] = results["examples_per_s"] / results["examples_per_s_prebuilt"]
    results["ratio_async_to_sync"] = results["examples_per_s"] / results["examples_per_s_sync"]
    results = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in results.items()}
    print(json.dumps(results))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
