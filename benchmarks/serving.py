"""Benchmark: `omnisage serve` under concurrent load, steady and across a day switch.

Builds ``indexes/dt=D`` with the ann_index library (the asset's code path and default config: index type by
size, search parameters tuned to the recall check) from random unit vectors at the ``large`` synthetic scale
(200K pins, 100K boards, 50K users) and the model's output dimension (ml.config.ModelConfig.out_dim, 256),
or uses the newest published index of ``--home``. Starts ``omnisage serve`` in a subprocess (uvicorn, one
FAISS thread per search), then runs ``--clients`` client threads on loopback sending ``--qps`` requests per
second in total (open loop: each client on a fixed schedule) for ``--seconds`` seconds, twice: once steady,
once while the index is re-published as a new version of the same day (hard links, so the swap costs the
server one full load of the index, as a new day would). Reported per phase: requests, achieved QPS, p50 / p99
/ max latency, errors, and when the server switched. Last line: one JSON object.

    python benchmarks/serving.py --clients 8 --seconds 30 --qps 200
    python benchmarks/serving.py --home ./.omnisage --qps 200

Route mix: related pins 50%, boards for a pin 20%, related boards 15%, homefeed 15% (pins instead when the
index holds no users). Goal on an idle 2-core box: p99 < 20 ms at 200 QPS, no errors across the switch.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DAY = "2026-01-01"
ROUTE_MIX = (
    ("/v1/related/pin/", "pin", 0.50),
    ("/v1/boards/pin/", "pin", 0.20),
    ("/v1/related/board/", "board", 0.15),
    ("/v1/homefeed/user/", "user", 0.15),
)


def random_vectors(kind: str, pins: int, boards: int, users: int, dim: int, noise: float, seed: int):
    """Unit vectors [n, dim] for pins, boards and users.

    ``planted``: the ``large`` synthetic universe's planted latent vectors (32-d, topic and sub-topic
    clusters: what a perfect model would embed), lifted to ``dim`` by a random orthonormal map (inner
    products kept) plus isotropic noise of norm ``noise`` (model error), re-normalised. ``uniform``: i.i.d.
    on the sphere -- no structure at all, the worst case of any ANN index (HNSW needs a huge efSearch)."""
    rng = np.random.default_rng(seed)

    def unit(m: np.ndarray) -> np.ndarray:
        return (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)

    if kind == "uniform":
        return [unit(rng.standard_normal((n, dim), dtype=np.float32)) for n in (pins, boards, users)]
    from omnisage_pipeline.tools.synthetic import build_universe

    universe = build_universe("large", seed)
    latents = [universe.pin_latent[:pins], universe.board_latent[:boards], universe.user_latent[:users]]
    lift, _ = np.linalg.qr(rng.standard_normal((dim, latents[0].shape[1])))  # orthonormal columns
    return [
        unit(
            z @ lift.T.astype(np.float32) + noise / np.sqrt(dim) * rng.standard_normal((len(z), dim), dtype=np.float32)
        )
        for z in latents
    ]


def random_home(root: Path, args) -> dict:
    """Publish random unit embeddings as entity_embeddings would, then build the index like ann_index."""
    import pyarrow.parquet as pq

    from omnisage_pipeline.embedding.day import entity_table, user_table
    from omnisage_pipeline.serving.build import CheckParams, build_day_index
    from omnisage_pipeline.serving.index import IndexParams
    from omnisage_pipeline.storage.publish import publish_partition

    pins, boards, users = random_vectors(
        args.vectors, args.pins, args.boards, args.users, args.dim, args.noise, args.seed
    )
    with publish_partition(root / "embeddings", DAY) as staging:
        pq.write_table(entity_table("pin", 10**9 + np.arange(len(pins)), pins, "bench"), staging / "pins.parquet")
        pq.write_table(
            entity_table("board", 2 * 10**9 + np.arange(len(boards)), boards, "bench"), staging / "boards.parquet"
        )
    with publish_partition(root / "user_embeddings", DAY) as staging:
        pq.write_table(user_table(np.arange(len(users)), users, "bench"), staging / "users.parquet")
    t0 = time.perf_counter()
    check = CheckParams(queries=200, min_recall=args.min_recall, tune_target=0.95)
    manifest = build_day_index(
        root / "embeddings", root / "user_embeddings", root / "indexes", DAY, IndexParams(), check, log=print
    )
    manifest["bench_build_seconds"] = round(time.perf_counter() - t0, 1)
    return manifest


def republish(indexes_dir: Path, day: str) -> None:
    """The same files as a new version of ``day`` (hard links): the server sees a new link target and swaps."""
    from omnisage_pipeline.storage.publish import publish_partition, published_path

    current = published_path(indexes_dir, day)
    with publish_partition(indexes_dir, day) as staging:
        for f in current.iterdir():
            os.link(f, staging / f.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int) -> dict | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        body = resp.read()
        return json.loads(body) if resp.status == 200 else None
    except OSError:
        return None


def start_server(home: Path, port: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        OMNISAGE_HOME=str(home),
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "omnisage_pipeline.cli",
        "serve",
        "--port",
        str(port),
        "--poll-seconds",
        "1",
        "--faiss-threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    deadline = time.monotonic() + 600
    while health(port) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not come up (exit code {proc.poll()})")
        time.sleep(0.2)
    return proc


def plan_requests(ids: dict[str, np.ndarray], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    routes = [(p, t, w) for p, t, w in ROUTE_MIX if len(ids.get(t, ()))]
    weights = np.array([w for _, _, w in routes]) / sum(w for _, _, w in routes)
    picks = rng.choice(len(routes), size=n, p=weights)
    paths = []
    for r in picks:  # request plan only (not the measured path): n ~ qps * seconds
        prefix, t, _ = routes[r]
        paths.append(f"{prefix}{int(ids[t][rng.integers(len(ids[t]))])}?k=10")
    return paths


def run_load(port: int, paths: list[str], clients: int, qps: float, seconds: float) -> dict:
    """Open loop: client c sends request i at start + (i * clients + c) / qps; latency from the send."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = time.perf_counter() + 0.2

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        i = 0
        while True:
            slot = start + (i * clients + c) / qps
            if slot - start >= seconds:
                break
            time.sleep(max(0.0, slot - time.perf_counter()))
            path = paths[(i * clients + c) % len(paths)]
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    errors[c].append(f"{resp.status} {path}")
            except (OSError, http.client.HTTPException) as exc:
                errors[c].append(f"{exc!r} {path}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            latencies[c].append(time.perf_counter() - t0)
            i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array([x for per in latencies for x in per]) * 1000
    errs = [e for per in errors for e in per]
    elapsed = time.perf_counter() - start
    return {
        "requests": int(lat.size),
        "qps": round(lat.size / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
        "max_ms": round(float(lat.max()), 2) if lat.size else None,
        "errors": len(errs),
        "error_samples": errs[:5],
    }


def index_ids(indexes_dir: Path) -> tuple[str, dict[str, np.ndarray]]:
    from omnisage_pipeline.storage.publish import list_published, published_path

    day = list_published(indexes_dir)[-1]
    path = published_path(indexes_dir, day)
    return day, {
        t: np.load(path / f"{t}.ids.npy") for t in ("pin", "board", "user") if (path / f"{t}.ids.npy").exists()
    }


def main() -> None:
    from ml.config import ModelConfig
    from omnisage_pipeline.tools.synthetic import SCALES

    large = SCALES["large"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each phase (steady, switch)")
    ap.add_argument("--qps", type=float, default=200.0, help="total requests per second of all clients")
    ap.add_argument("--home", type=Path, default=None, help="serve this OMNISAGE_HOME's newest published index")
    ap.add_argument("--pins", type=int, default=large.pins)
    ap.add_argument("--boards", type=int, default=large.boards)
    ap.add_argument("--users", type=int, default=large.users)
    ap.add_argument("--dim", type=int, default=ModelConfig.out_dim)
    ap.add_argument(
        "--min-recall",
        type=float,
        default=0.0,
        help="the build's check; the search parameters are tuned toward 0.95 whatever this is (random vectors "
        "are ANN's worst case: the recall reached is reported)",
    )
    ap.add_argument(
        "--vectors",
        choices=["planted", "uniform"],
        default="planted",
        help="planted: the large universe's clustered latents lifted to --dim; uniform: i.i.d.",
    )
    ap.add_argument("--noise", type=float, default=0.3, help="planted: norm of the isotropic noise added")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    scratch = None
    manifest: dict = {}
    if args.home is None:
        scratch = Path(tempfile.mkdtemp(prefix="omnisage-serving-bench-"))
        home = scratch / "home"
        manifest = random_home(home, args)
        print(
            f"built random index in {manifest['bench_build_seconds']} s: "
            f"{ {t: (e['index_type'], e['params']) for t, e in manifest['types'].items()} }, "
            f"check recall {manifest['check']['recall']}"
        )
    else:
        home = args.home.resolve()
    indexes_dir = home / "indexes"
    day, ids = index_ids(indexes_dir)
    paths = plan_requests(ids, max(int(args.qps * args.seconds), 1000), args.seed)
    port = free_port()
    t0 = time.perf_counter()
    server = start_server(home, port)
    load_seconds = time.perf_counter() - t0
    print(
        f"server up on 127.0.0.1:{port} in {load_seconds:.1f} s (dt={day}, {', '.join(f'{len(v)} {t}s' for t, v in ids.items())})"
    )
    try:
        steady = run_load(port, paths, args.clients, args.qps, args.seconds)
        print(f"steady: {steady}")
        before = health(port)["version"]
        switch_at: dict = {}

        def switch() -> None:
            time.sleep(args.seconds / 3)
            t = time.perf_counter()
            republish(indexes_dir, day)
            while (h := health(port)) is None or h["version"] == before:
                time.sleep(0.05)
            switch_at["seconds_to_switch"] = round(time.perf_counter() - t, 2)

        switcher = threading.Thread(target=switch)
        switcher.start()
        across = run_load(port, paths, args.clients, args.qps, args.seconds)
        switcher.join()
        across.update(switch_at, switched=health(port)["version"] != before)
        print(f"across the switch: {across}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "benchmark": "serving",
        "clients": args.clients,
        "seconds": args.seconds,
        "target_qps": args.qps,
        "home": str(args.home) if args.home else None,
        "vectors": None if args.home else args.vectors,
        "counts": {t: len(v) for t, v in ids.items()},
        "dim": manifest.get("dimension") or args.dim,
        "index": {t: {"index_type": e["index_type"], **e["params"]} for t, e in manifest.get("types", {}).items()},
        "check_recall": manifest.get("check", {}).get("recall"),
        "build_seconds": manifest.get("bench_build_seconds"),
        "server_start_seconds": round(load_seconds, 1),
        "steady": steady,
        "switch": across,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
