"""Benchmark: naive vs chunked (paper 3.4.2, Algorithm 1) sampled softmax, one forward + backward.

B = 4096 queries/positives, |N| = 16384 random negatives, d = 256 (defaults), with logQ correction,
accidental-hit keys and per-example weights switched on (the full training path).

Each measurement runs in a fresh subprocess (``sys.executable`` running this file with ``--mode``):
  * ``inputs``  - allocates the inputs only (baseline: interpreter + torch + inputs),
  * ``naive``   - ``sampled_softmax_loss(..., chunk_size=None)``: full [B, B + |N|] logits,
  * ``chunked`` - ``sampled_softmax_loss(..., chunk_size=C)``.
Peak memory is the child's max RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, reported by the child;
tracemalloc does not see torch's allocator) - on CUDA additionally ``torch.cuda.max_memory_allocated``.
The loss-attributable memory is the increment over the ``inputs`` child; the ratio of increments is what
Algorithm 1 changes (the interpreter + torch + inputs baseline is the same for both).
Children save their gradients as .npy into a temporary directory; the parent compares them.

Usage: python benchmarks/chunked_softmax.py [--b 4096 --n 16384 --d 256 --chunk-size 512 --device cpu]
Last line of output: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from ml.losses import sampled_softmax_loss

    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    b, m, d = args.b, args.n, args.d
    norm = torch.nn.functional.normalize
    q = norm(torch.randn(b, d, generator=g), dim=-1)
    p = norm(q + 0.5 * torch.randn(b, d, generator=g), dim=-1)
    n = norm(torch.randn(m, d, generator=g), dim=-1)
    pos_log_q = -torch.rand(b, generator=g) * 5
    pos_keys = torch.randint(0, 4 * b, (b,), generator=g)  # some in-batch duplicates -> accidental hits
    neg_keys = torch.randint(0, 1 << 40, (m,), generator=g)
    weights = torch.rand(b, generator=g) + 0.5
    q, p, n, pos_log_q, pos_keys, neg_keys, weights = (
        t.to(dev) for t in (q, p, n, pos_log_q, pos_keys, neg_keys, weights)
    )
    q.requires_grad_()
    p.requires_grad_()
    n.requires_grad_()
    scale = torch.tensor(20.0, device=dev, requires_grad=True)
    out: dict = {"mode": args.mode}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["cuda_base_allocated"] = torch.cuda.memory_allocated()
    if args.mode != "inputs":
        chunk = None if args.mode == "naive" else args.chunk_size
        t0 = time.perf_counter()
        loss = sampled_softmax_loss(
            q,
            p,
            n,
            scale=scale,
            positive_log_q=pos_log_q,
            negative_log_q=float(np.log(m / 1e6)),
            positive_keys=pos_keys,
            negative_keys=neg_keys,
            weights=weights,
            chunk_size=chunk,
        )
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out["time_s"] = time.perf_counter() - t0
        out["loss"] = float(loss)
        out["scale_grad"] = float(scale.grad)
        if dev.type == "cuda":
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    out["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if args.mode != "inputs":
        gdir = Path(args.grad_dir)
        for name, t in (("q", q.grad), ("p", p.grad), ("n", n.grad), ("scale", scale.grad)):
            np.save(gdir / f"{args.mode}_{name}.npy", t.detach().cpu().numpy())
    print(json.dumps(out), flush=True)


def _run_child(mode: str, args: argparse.Namespace, grad_dir: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--mode",
        mode,
        "--grad-dir",
        grad_dir,
        "--b",
        str(args.b),
        "--n",
        str(args.n),
        "--d",
        str(args.d),
        "--chunk-size",
        str(args.chunk_size),
        "--device",
        args.device,
    ]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=os.environ.copy())
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child {mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["inputs", "naive", "chunked"], default=None)
    ap.add_argument("--grad-dir", default=None)
    ap.add_argument("--b", type=int, default=4096)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.mode is not None:
        _child(args)
        return

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="chunked_softmax_bench_") as tmp:
        base = _run_child("inputs", args, tmp)
        naive = _run_child("naive", args, tmp)
        chunked = _run_child("chunked", args, tmp)
        diffs = {}
        for name in ("q", "p", "n", "scale"):
            a = np.load(Path(tmp) / f"naive_{name}.npy")
            c = np.load(Path(tmp) / f"chunked_{name}.npy")
            diffs[name] = float(np.max(np.abs(a.astype(np.float64) - c.astype(np.float64))))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over all children
    mib = 1 << 20
    inc_naive = naive["max_rss_bytes"] - base["max_rss_bytes"]
    inc_chunked = chunked["max_rss_bytes"] - base["max_rss_bytes"]
    logits_mib = args.b * (args.b + args.n) * 4 / mib
    print(
        f"machine: {os.cpu_count()} cores, device {args.device}; B={args.b} |N|={args.n} d={args.d} "
        f"chunk_size={args.chunk_size}; one fp32 [B, B+|N|] logits matrix = {logits_mib:.0f} MiB"
    )
    for r in (base, naive, chunked):
        extra = f", time {r['time_s']:.3f} s" if "time_s" in r else ""
        print(f"  {r['mode']:8s} max RSS {r['max_rss_bytes'] / mib:8.1f} MiB{extra}")
    print(
        f"  RSS increment over inputs-only child: naive {inc_naive / mib:.1f} MiB, chunked {inc_chunked / mib:.1f} MiB"
    )
    print(
        f"  max abs grad diff: {diffs}; loss naive {naive['loss']:.6f} chunked {chunked['loss']:.6f}; "
        f"dL/dlambda naive {naive['scale_grad']:.6g} chunked {chunked['scale_grad']:.6g}"
    )
    figures = {
        "machine_cores": os.cpu_count(),
        "device": args.device,
        "B": args.b,
        "N": args.n,
        "d": args.d,
        "chunk_size": args.chunk_size,
        "rss_inputs_mib": round(base["max_rss_bytes"] / mib, 1),
        "rss_naive_mib": round(naive["max_rss_bytes"] / mib, 1),
        "rss_chunked_mib": round(chunked["max_rss_bytes"] / mib, 1),
        "rss_children_max_mib": round(children / mib, 1),
        "peak_mem_ratio": round(chunked["max_rss_bytes"] / naive["max_rss_bytes"], 4),
        "peak_mem_increment_ratio": round(inc_chunked / inc_naive, 4) if inc_naive > 0 else None,
        "time_naive_s": round(naive["time_s"], 4),
        "time_chunked_s": round(chunked["time_s"], 4),
        "time_ratio": round(chunked["time_s"] / naive["time_s"], 4),
        "loss_abs_diff": abs(naive["loss"] - chunked["loss"]),
        "max_abs_grad_diff": max(diffs.values()),
        "max_abs_grad_diff_by_input": diffs,
    }
    if args.device.startswith("cuda"):
        cn, cc = naive["cuda_peak_allocated"], chunked["cuda_peak_allocated"]
        figures.update(
            {
                "cuda_peak_naive_mib": round(cn / mib, 1),
                "cuda_peak_chunked_mib": round(cc / mib, 1),
                "cuda_peak_ratio": round(cc / cn, 4),
                "cuda_peak_increment_ratio": round(
                    (cc - naive["cuda_base_allocated"]) / (cn - naive["cuda_base_allocated"]), 4
                ),
            }
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
