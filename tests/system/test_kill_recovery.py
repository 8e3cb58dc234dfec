"""Kill tests: every asset that publishes is SIGKILLed while it re-materializes a partition
that is already published, at each publish phase (the fault hook of ``omnisage_pipeline.storage.publish``) and at a
seeded random moment of its build, and afterwards

(a) the previously published partition is intact and readable: its version directory still holds the same
    content as the clean run;
(b) nothing half-written is visible: every ``dt=D`` of every dataset is a symlink to a complete directory in
    ``.versions``, readers (``list_published``, pyarrow datasets, DuckDB globs with hive partitioning) see
    exactly the published partitions and their rows, and everything else lives in dot-directories;
(c) a re-run succeeds, removes the dead writer's leftovers (staging, orphan version), keeps the version that
    was visible before it as the one previous version, and publishes the same content as a clean run (rows
    as multisets for Parquet, keys and values for the RocksDB feature store via rocksdict, arrays for the graph
    snapshot and its neighbourhood cache; timings and version-directory names in manifests are ignored).

Two writers of the same day: every asset re-materializes the partition in two processes at once (the
DuckDB engine, as every child here); afterwards ``dt=D`` is one complete version of one of them with the
clean run's content, every version left in ``.versions`` is whole, and no staging is left behind.

Plus: ``omnisage_model`` SIGKILLed from outside once it has written a checkpoint resumes from exactly that
checkpoint on the next materialization (the real-kill variant of the ``stop_after`` test in
tests/test_training_assets.py); the resumed model is the champion the embedding and report cases use.

How. Tiny synthetic data (two days, DuckDB engine) is built once per module. Every materialization runs in
a child process forked from a multiprocessing *forkserver* that has imported dagster, the definitions,
torch and mlflow once, so a case costs a fork instead of ~5 s of imports. A plain fork of the pytest
process is not safe: numba's OpenMP threading layer aborts a child forked from a process that already ran a
parallel kernel, and torch's libgomp hangs one, and the rest of the suite runs both in this process. The
forkserver is a fresh interpreter that never runs either; the children do, each once.

Matrix: every asset x the 4 phases on the dataset that marks the partition published (the valid table for
the ingest assets, ``embeddings`` for entity_embeddings) + one seeded random kill, and for the assets that
publish two datasets also 2 phases on the one published first (quarantine / user_embeddings). Each kill is
followed by a re-run, so every case checks (a), (b) and (c). The random kill: the parent polls until the
child has begun publishing (its staging or version directory exists), then SIGKILLs it after a delay drawn
(seeded) from [0, the length of that stretch in the clean run). Where it landed depends on the machine's
speed and is printed (``-s``); the assertions hold wherever it lands, including after a normal exit.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import TINY_TRAIN as TRAIN

from omnisage_pipeline.storage.publish import (
    FAULT_DATASET_ENV,
    FAULT_PHASE_ENV,
    PUBLISH_PHASES,
    dataset_label,
    list_published,
    published_path,
)

DAYS = ["2026-01-01", "2026-01-02"]  # valid partitions of daily_partitions (default start 2026-01-01)
DAY = DAYS[-1]  # the partition every case re-materializes
SEED = 9001  # seeds the random kill moments
CHILD_TIMEOUT_S = 300  # a child that runs longer than this is hung: killed and reported

#: asset -> the datasets it publishes (relative to OMNISAGE_HOME), in publish order; the LAST one marks the
#: partition as published (downstream reads it), the first is published before it.
PUBLISHED: dict[str, list[str]] = {
    "engagement_logs": ["warehouse/quarantine/engagement_logs", "warehouse/engagement_logs"],
    "entity_metadata": ["warehouse/quarantine/entity_metadata", "warehouse/entity_metadata"],
    "daily_edges": ["warehouse/daily_edges"],
    "pruned_edges": ["warehouse/pruned_edges"],
    "graph_snapshot": ["graph"],
    "feature_store": ["features"],
    "training_examples": ["warehouse/training_examples"],
    "entity_embeddings": ["user_embeddings", "embeddings"],
}
if (Path(__file__).resolve().parents[2] / "assets" / "evaluation.py").is_file():  # recall_report
    PUBLISHED["recall_report"] = ["reports"]
PUBLISHED["ann_index"] = ["indexes"]  # the FAISS indexes of the day's embeddings
#: Assets of DAY only, materialized after the model (in this order: each reads the one before).
MODEL_ASSETS = [a for a in ("entity_embeddings", "recall_report", "ann_index") if a in PUBLISHED]
DATA_ASSETS = [a for a in PUBLISHED if a not in MODEL_ASSETS]
#: Datasets whose version directory is one Parquet table (readers glob them with hive partitioning).
PARQUET_TABLES = {
    "warehouse/engagement_logs",
    "warehouse/quarantine/engagement_logs",
    "warehouse/daily_edges",
    "warehouse/pruned_edges",
    "embeddings",
    "user_embeddings",
}

# TRAIN (tests/pipeline_fixtures.TINY_TRAIN) checkpoints every 5 steps, so a kill lands with 5..15 steps to go.

CASES: list[tuple[str, str, str]] = []  # (asset, phase | "random", dataset)
for _asset, _datasets in PUBLISHED.items():
    CASES += [(_asset, phase, _datasets[-1]) for phase in PUBLISH_PHASES]
    if len(_datasets) > 1:
        CASES += [(_asset, phase, _datasets[0]) for phase in ("staged", "swapped")]
    CASES.append((_asset, "random", _datasets[-1]))


# ------------------------------------------------------------------------------------------- the children
def _plain(value):
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else str(value)


def _child(env: dict, steps: list, log_path: str, result_path: str) -> None:
    """Materialize ``steps`` [(asset key, partition or None, run_config or None)] in this (forked) process;
    the fault-injection variables come only from ``env``. Writes each asset's metadata to ``result_path``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for key in (FAULT_PHASE_ENV, FAULT_DATASET_ENV):
        os.environ.pop(key, None)
    os.environ.update(env)

    import dagster as dg

    from omnisage_pipeline.definitions import build_resources, defs
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    resources = build_resources(settings)
    assets = list(defs.assets)
    out = {}
    for key, partition, run_config in steps:
        result = dg.materialize(
            assets, selection=[key], partition_key=partition, resources=resources, run_config=run_config
        )
        assert result.success, f"{key} dt={partition} failed"
        mats = result.asset_materializations_for_node(key)
        out[key] = {k: _plain(v) for k, v in mats[-1].metadata.items()} if mats else {}
    Path(result_path).write_text(json.dumps(out, default=str))


_CTX = multiprocessing.get_context("forkserver")
#: Set only in the environment the forkserver starts with: when the server preloads this module it also runs
#: one trivial materialization, so that each child skips Dagster's ~1 s of first-run initialisation.
_WARM_UP_ENV = "OMNISAGE_KILL_TESTS_FORKSERVER"
#: One thread per library in the children: the cases run one at a time, and OpenMP threads that spin-wait on
#: a busy 2-core machine make a tiny training step take seconds instead of a fraction of one.
_SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def _warm_up_forkserver() -> None:
    import dagster as dg

    @dg.asset
    def kill_tests_warm_up() -> int:
        return 1

    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        dg.materialize([kill_tests_warm_up])
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
    # Process-shared locks that numba (before its first parallel kernel) and tqdm (MLflow's download bars)
    # would otherwise create in every child: a SIGKILLed child cannot unregister its own, and the resource
    # tracker would warn about them at the end of the session. Created here (no thread is started), the
    # children inherit them.
    import tqdm
    from numba.np.ufunc import parallel

    if hasattr(parallel, "_set_init_process_lock"):  # numba internals: an optimisation only
        parallel._set_init_process_lock()
    tqdm.tqdm.get_lock()


if os.environ.get(_WARM_UP_ENV) == "1" and multiprocessing.current_process().name == "MainProcess":
    _warm_up_forkserver()


@dataclass
class Child:
    proc: multiprocessing.process.BaseProcess
    log: Path
    result: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-n:]

    def finish(self) -> int:
        self.proc.join(CHILD_TIMEOUT_S)
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(30)
            pytest.fail(f"child {self.pid} still running after {CHILD_TIMEOUT_S}s:\n{self.log_tail()}")
        return self.proc.exitcode


@dataclass
class World:
    home: Path
    env: dict
    logs: Path
    baseline: dict = field(default_factory=dict)  # dataset -> content of dt=DAY from the clean run
    rows: dict = field(default_factory=dict)  # Parquet dataset -> {day: rows} from the clean run
    build_seconds: dict = field(default_factory=dict)  # asset -> staging seen .. exit, clean run
    training: dict = field(default_factory=dict)
    counter: int = 0

    def dataset(self, rel: str) -> Path:
        return self.home / rel

    def all_datasets(self) -> list[str]:
        return [d for ds in PUBLISHED.values() for d in ds]

    def expected_days(self, rel: str) -> list[str]:
        owner = next(a for a, ds in PUBLISHED.items() if rel in ds)
        return DAYS if owner in DATA_ASSETS else [DAY]

    def start(self, steps: list, fault: tuple[str, str] | None = None, env_over: dict | None = None) -> Child:
        self.counter += 1
        env = {**self.env, **(env_over or {})}
        if fault is not None:
            env[FAULT_PHASE_ENV], env[FAULT_DATASET_ENV] = fault
        log = self.logs / f"{self.counter:03d}.log"
        result = self.logs / f"{self.counter:03d}.json"
        proc = _CTX.Process(target=_child, args=(env, steps, str(log), str(result)), daemon=True)
        proc.start()
        return Child(proc, log, result)

    def run_ok(self, steps: list) -> dict:
        child = self.start(steps)
        code = child.finish()
        assert code == 0, f"clean run {steps} exited with {code}:\n{child.log_tail()}"
        return json.loads(child.result.read_text())

    def staging_of(self, asset: str, pid: int) -> list[Path]:
        return [p for rel in PUBLISHED[asset] for p in (self.dataset(rel) / ".staging").glob(f"dt={DAY}.{pid}.*")]

    def publishing(self, asset: str, pid: int) -> bool:
        """Whether writer ``pid`` has begun publishing one of ``asset``'s datasets (staging or version)."""
        return bool(self.staging_of(asset, pid)) or any(
            any((self.dataset(rel) / ".versions").glob(f"dt={DAY}.{pid}.*")) for rel in PUBLISHED[asset]
        )


#: entity_metadata links a day whose catalogue did not change to the version already published (both days
#: here have the same one), so a re-run would publish nothing new: the cases make it write a fresh copy, so
#: that every publish phase is reached (the shared-version path: tests/test_metadata_versions.py).
_RUN_CONFIG = {"entity_metadata": {"ops": {"entity_metadata": {"config": {"reuse_identical_versions": False}}}}}


def _asset_steps(asset: str, day: str = DAY) -> list:
    return [(asset, day, _RUN_CONFIG.get(asset))]


def _watch(world: World, asset: str, child: Child, kill_after: float | None = None) -> tuple[int, str]:
    """Poll (2 ms) until the child has begun publishing one of ``asset``'s datasets (its staging or version
    directory exists) or has exited; then, with ``kill_after``, SIGKILL it that many seconds later unless it
    exited first. Without ``kill_after`` (a clean run) record how long that phase lasted.
    Returns (exit code, where the kill landed)."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while child.proc.is_alive() and not world.publishing(asset, child.pid):
        assert time.monotonic() < deadline, f"{asset}: no staging after {CHILD_TIMEOUT_S}s:\n{child.log_tail()}"
        child.proc.join(0.002)
    seen = time.monotonic()
    landed = "none"
    if kill_after is not None and child.proc.is_alive():
        child.proc.join(kill_after)
        if child.proc.is_alive():
            building = bool(world.staging_of(asset, child.pid))
            os.kill(child.pid, signal.SIGKILL)
            landed = "mid-build (its staging existed)" if building else "after its build (publishing or later)"
    code = child.finish()
    if kill_after is not None and code != -signal.SIGKILL:
        landed = "none: it finished first"
    if kill_after is None:
        world.build_seconds[asset] = max(time.monotonic() - seen, 0.02)
    return code, landed


# ---------------------------------------------------------------------------------------------- content
_VERSION_NAME = re.compile(r"/\.versions/(dt=[^/.]+)\.\d+\.[0-9a-f]+")
_TIMING_KEY = re.compile(r"(seconds|per_second|_s)$|^db_bytes$")  # db_bytes: RocksDB's LOG etc. vary
#: entity_embeddings' stage_key: a hash of the input version-directory names
_VOLATILE_KEYS = {"stage_key"}
#: part files of one table (DuckDB / write_table / the embeddings' shards)
_PART_FILE = re.compile(r"^part-[0-9]+(-of-[0-9]+)?\.parquet$")


def _canon(value):
    """Hashable, NaN-safe, with timings dropped and version-directory names replaced by the partition name."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, str):
        return _VERSION_NAME.sub(r"/\1", value)
    if isinstance(value, (list, tuple)):
        return tuple(_canon(v) for v in value)
    if isinstance(value, dict):
        return tuple(
            sorted((k, _canon(v)) for k, v in value.items() if not _TIMING_KEY.search(k) and k not in _VOLATILE_KEYS)
        )
    return value


def _content(version: Path) -> dict:
    """What a reader gets from one version directory (see the module docstring, (c))."""
    version = Path(version)
    out: dict = {}
    rocks = (version / "CURRENT").is_file()
    if rocks:  # the feature store: every key and value, the manifest record without its timings
        from rocksdict import AccessType, Rdict

        from graph_engine.feature_store import MANIFEST_KEY, store_options

        db = Rdict(str(version), options=store_options(), access_type=AccessType.read_only())
        try:
            records = {bytes(k): bytes(v) for k, v in db.items()}
        finally:
            db.close()
        manifest = records.pop(MANIFEST_KEY, None)
        assert records, f"{version}: empty feature store"
        out["<records>"] = (len(records), hashlib.sha256(repr(sorted(records.items())).encode()).hexdigest())
        out["<manifest record>"] = _canon(json.loads(manifest)) if manifest else None
    tables: dict[str, list] = {}
    for path in sorted(version.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = str(path.relative_to(version))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            # part-NNNNN files of a folder form one table; any other .parquet file is a table of its own
            name = "part-*.parquet" if _PART_FILE.match(path.name) else path.name
            key = str(path.parent.relative_to(version) / name)
            entry = tables.setdefault(key, [str(table.schema), Counter()])
            assert entry[0] == str(table.schema), f"{path}: schema differs from its sibling part files"
            entry[1].update(tuple(_canon(v) for v in row.values()) for row in table.to_pylist())
        elif path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            out[rel] = (
                str(arr.dtype),
                arr.shape,
                hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
            )
        elif path.suffix == ".json":
            out[rel] = _canon(json.loads(path.read_text()))
        elif not rocks:  # RocksDB's own files (SST, MANIFEST, LOG, ...) carry ids and times: read above
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    for key, (schema, rows) in tables.items():
        out[key] = (schema, rows)
    assert out, f"{version}: nothing in it"
    return out


def _diff(expected: dict, got: dict) -> str:
    keys = sorted(set(expected) | set(got))
    return ", ".join(k for k in keys if expected.get(k) != got.get(k)) or "none"


# ----------------------------------------------------------------------------------------------- checks
def _check_visible(world: World, asset: str) -> None:
    """(b) for every dataset: only dt=* symlinks to complete versions are visible; readers see the
    published partitions with the clean run's rows and nothing from .staging or .versions. The content of
    ``asset``'s datasets (the only ones the case wrote) is compared with the clean run's."""
    import duckdb
    import pyarrow.dataset as pads

    for rel in world.all_datasets():
        ds = world.dataset(rel)
        for entry in ds.iterdir():
            if entry.name.startswith("."):
                continue  # .staging, .versions, .leases, .shards: no reader lists dot-directories
            assert entry.name.startswith("dt=") and entry.is_symlink(), f"{entry}: visible and not a dt= symlink"
            target = entry.resolve()
            assert target.is_dir(), f"{entry} -> {os.readlink(entry)}: points at nothing"
            assert target.parent == (ds / ".versions").resolve(), f"{entry} -> {target}: not a published version"
            assert any(target.iterdir()), f"{entry} -> {target}: empty"
        assert list_published(ds) == world.expected_days(rel), (rel, list_published(ds))
        if rel in PUBLISHED[asset]:
            assert _content(published_path(ds, DAY)) == world.baseline[rel], (
                f"{rel}/dt={DAY} differs from the clean run in: "
                f"{_diff(world.baseline[rel], _content(published_path(ds, DAY)))}"
            )
        if rel in PARQUET_TABLES:
            expected = world.rows[rel]
            got = dict(
                duckdb.sql(
                    f"SELECT CAST(dt AS VARCHAR), count(*) FROM read_parquet('{ds}/*/*.parquet', "
                    "hive_partitioning = true, union_by_name = true) GROUP BY ALL"
                ).fetchall()
            )
            assert got == {d: n for d, n in expected.items() if n}, (rel, got, expected)
            dataset = pads.dataset(ds, format="parquet", partitioning="hive")
            assert all(Path(f).relative_to(ds).parts[0].startswith("dt=") for f in dataset.files), dataset.files
            assert dataset.count_rows() == sum(expected.values()), rel


def _check_previous_intact(world: World, asset: str, before: dict[str, Path]) -> None:
    """(a) the version each dataset showed before the kill is still on disk, whole."""
    for rel in PUBLISHED[asset]:
        assert before[rel].is_dir(), f"{rel}: the previously published version {before[rel]} is gone"
        assert _content(before[rel]) == world.baseline[rel], (
            f"{rel}: previously published version changed: {_diff(world.baseline[rel], _content(before[rel]))}"
        )


def _rerun_and_check(world: World, asset: str, killed_pid: int) -> None:
    """(c) the re-run succeeds, cleans up after the dead writer and publishes the clean run's content."""
    visible = {rel: published_path(world.dataset(rel), DAY) for rel in PUBLISHED[asset]}
    world.run_ok(_asset_steps(asset))
    for rel in PUBLISHED[asset]:
        ds = world.dataset(rel)
        now = published_path(ds, DAY)
        assert now != visible[rel], f"{rel}: the re-run did not publish"
        leftovers = [p for sub in (".staging", ".versions") for p in (ds / sub).glob(f"*.{killed_pid}.*")]
        # Only the killed writer's version that was visible (killed after its swap) may stay, as the previous.
        assert all(p.resolve() == visible[rel] for p in leftovers), (
            f"{rel}: the killed writer {killed_pid} left {leftovers}"
        )
        versions = {p.resolve() for p in (ds / ".versions").glob(f"dt={DAY}.*")}
        assert versions == {now, visible[rel]}, (
            f"{rel}: expected the new version + the one visible before the re-run, found {sorted(versions)}"
        )
    _check_visible(world, asset)


# ---------------------------------------------------------------------------------------------- fixture
def _model_config() -> dict:
    from assets.training import OmniSageModelConfig

    config = dict(TRAIN)
    if "pinsage_baseline" in OmniSageModelConfig.model_fields:
        config["pinsage_baseline"] = False  # recall_report then reports that baseline as unavailable
    return {"ops": {"omnisage_model": {"config": config}}}


def _train_killed_then_resumed(world: World) -> None:
    """omnisage_model SIGKILLed once its first checkpoint exists, then materialized again."""
    import torch

    steps = [("omnisage_model", None, _model_config())]
    ckpts = world.home / "checkpoints" / "omnisage_model"
    child = world.start(steps)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while child.proc.is_alive() and not list(ckpts.glob("*/last.pt")):
        assert time.monotonic() < deadline, f"no checkpoint after {CHILD_TIMEOUT_S}s:\n{child.log_tail()}"
        child.proc.join(0.005)
    if child.proc.is_alive():
        os.kill(child.pid, signal.SIGKILL)
    world.training["killed_exitcode"] = child.finish()
    world.training["killed_log"] = child.log_tail()
    found = list(ckpts.glob("*/last.pt"))
    world.training["checkpoints"] = len(found)
    if found:
        world.training["checkpoint_step"] = int(torch.load(found[0], weights_only=True)["step"])
    world.training["metadata"] = world.run_ok(steps)["omnisage_model"]
    world.training["checkpoints_after"] = len(list(ckpts.glob("*/last.pt")))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from omnisage_pipeline.tools.synthetic import generate

    root = tmp_path_factory.mktemp("kill")
    home = root / "home"
    home.mkdir()
    env = {
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_ENGINE": "duckdb",
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "OMNISAGE_DATA_ROOT": str(root / "data"),
        "NUMBA_CACHE_DIR": str(root / "numba"),
        "OMNISAGE_START_DATE": DAYS[0],
    }
    generate(root / "data", start_date=DAYS[0], days=len(DAYS), scale="tiny", seed=0)
    logs = root / "logs"
    logs.mkdir()
    w = World(home=home, env=env, logs=logs)

    # The forkserver starts with this module's environment and imports the heavy modules once.
    mp = pytest.MonkeyPatch()
    try:
        # Python 3.11's forkserver ignores the parent's sys.path: PYTHONPATH lets it import this module,
        # pipeline_fixtures (tests/) and the project (the repository root).
        here = Path(__file__).resolve().parent
        paths = [here, here.parent, here.parents[1]]
        python_path = os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])
        for key, value in {**env, **_SINGLE_THREAD, _WARM_UP_ENV: "1", "PYTHONPATH": python_path}.items():
            mp.setenv(key, value)
        for key in (FAULT_PHASE_ENV, FAULT_DATASET_ENV):
            mp.delenv(key, raising=False)
        _CTX.set_forkserver_preload(["dagster", "torch", "mlflow", "omnisage_pipeline.definitions", _child.__module__])
        # Clean runs: the first day in one child, then each asset of DAY on its own (timing its build).
        w.run_ok([step for asset in DATA_ASSETS for step in _asset_steps(asset, DAYS[0])])
        for asset in DATA_ASSETS:
            code, _ = _watch(w, asset, w.start(_asset_steps(asset)))
            assert code == 0, f"clean {asset}: exit {code}"
        _train_killed_then_resumed(w)
        for asset in MODEL_ASSETS:
            code, _ = _watch(w, asset, w.start(_asset_steps(asset)))
            assert code == 0, f"clean {asset}: exit {code}"
    finally:
        mp.undo()

    for rel in w.all_datasets():
        ds = w.dataset(rel)
        w.baseline[rel] = _content(published_path(ds, DAY))
        if rel in PARQUET_TABLES:
            w.rows[rel] = {d: pq.read_table(published_path(ds, d)).num_rows for d in w.expected_days(rel)}
    yield w
    shutil.rmtree(root / "data", ignore_errors=True)
    # Stop the forkserver: a later user of the "forkserver" context starts its own, with its own environment.
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    if server is not None and hasattr(server, "_stop"):
        server._stop()


# ------------------------------------------------------------------------------------------------ tests
def test_training_killed_mid_run_resumes_from_its_last_checkpoint(world):
    import mlflow

    t = world.training
    assert t["killed_exitcode"] == -signal.SIGKILL, t["killed_log"]
    assert t["checkpoints"] == 1
    step = t["checkpoint_step"]
    assert 0 < step < TRAIN["steps"] and step % TRAIN["checkpoint_every"] == 0
    meta = t["metadata"]
    assert meta["resumed_from_step"] == step  # the last checkpoint the killed run wrote, not step 0
    assert meta["steps"] == TRAIN["steps"]
    assert meta["alias"] == "champion" and meta["model_version"] == "1"
    assert t["checkpoints_after"] == 0  # removed once the model is registered

    client = mlflow.MlflowClient(
        tracking_uri=world.env["MLFLOW_TRACKING_URI"], registry_uri=world.env["MLFLOW_TRACKING_URI"]
    )
    run = client.get_run(meta["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(step)
    killed = client.get_run(run.data.tags["resumed_from_run"])
    assert killed.info.status == "KILLED"  # the killed run is closed by the one that resumed it
    history = client.get_metric_history(run.info.run_id, "loss/total")
    assert history and min(m.step for m in history) > step  # the resumed run logged only the steps after it


@pytest.mark.parametrize(
    ("asset", "phase", "rel"),
    CASES,
    ids=[f"{a}-{p}-{dataset_label(Path(r)).replace('/', '.')}" for a, p, r in CASES],
)
def test_kill_leaves_the_published_partition_and_a_rerun_recovers(world, asset, phase, rel):
    target = world.dataset(rel)
    before = {r: published_path(world.dataset(r), DAY) for r in PUBLISHED[asset]}
    assert all(before.values())

    if phase == "random":
        rng = random.Random(f"{SEED}-{asset}")
        delay = rng.uniform(0.0, world.build_seconds[asset])
        child = world.start(_asset_steps(asset))
        code, landed = _watch(world, asset, child, kill_after=delay)
        print(
            f"{asset}: kill {delay * 1000:.0f} ms (of a {world.build_seconds[asset] * 1000:.0f} ms window) after it "
            f"began publishing: {landed} (exit {code})"
        )
        assert code in (0, -signal.SIGKILL), child.log_tail()
    else:
        child = world.start(_asset_steps(asset), fault=(phase, dataset_label(target)))
        code = child.finish()
        assert code == -signal.SIGKILL, f"{asset} with fault {phase}@{rel}: exit {code}\n{child.log_tail()}"
        # The kill landed in the phase asked for.
        staging = list((target / ".staging").glob(f"dt={DAY}.{child.pid}.*"))
        versions = list((target / ".versions").glob(f"dt={DAY}.{child.pid}.*"))
        now = published_path(target, DAY)
        if phase == "begin":
            assert len(staging) == 1 and not any(staging[0].iterdir()) and not versions
        elif phase == "staged":
            assert len(staging) == 1 and any(staging[0].iterdir()) and not versions
        elif phase == "versioned":
            assert not staging and len(versions) == 1 and versions[0].resolve() != now
        else:  # swapped: the new version is visible, the old one not yet cleaned up
            assert not staging and len(versions) == 1 and versions[0].resolve() == now != before[rel]
        if phase != "swapped":
            assert now == before[rel], f"{rel}: dt={DAY} moved although the writer died before the swap"
        # Datasets published after the target were not touched.
        for later in PUBLISHED[asset][PUBLISHED[asset].index(rel) + 1 :]:
            assert published_path(world.dataset(later), DAY) == before[later]

    _check_previous_intact(world, asset, before)  # (a)
    _check_visible(world, asset)  # (b)
    _rerun_and_check(world, asset, child.pid)  # (c)


@pytest.mark.parametrize("asset", list(PUBLISHED))
def test_two_writers_of_the_same_day_leave_one_complete_version(world, asset):
    """Two processes re-materialize the same partition at once: each publishes a whole version and swaps it
    in; whichever swapped last is visible, never a mix of the two, never an empty folder, and neither
    leaves staging behind."""
    before = {rel: published_path(world.dataset(rel), DAY) for rel in PUBLISHED[asset]}
    writers = [world.start(_asset_steps(asset)) for _ in range(2)]
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while all(w.proc.is_alive() for w in writers) and not any(world.publishing(asset, w.pid) for w in writers):
        assert time.monotonic() < deadline, writers[0].log_tail()
        time.sleep(0.002)
    overlapped = all(w.proc.is_alive() for w in writers)
    codes = [w.finish() for w in writers]
    print(f"{asset}: both writers running when the first began publishing: {overlapped}")
    for w, code in zip(writers, codes, strict=True):
        assert code == 0, f"{asset}: writer {w.pid} exited with {code}:\n{w.log_tail()}"

    pids = {str(w.pid) for w in writers}
    for rel in PUBLISHED[asset]:
        ds = world.dataset(rel)
        now = published_path(ds, DAY)
        assert now != before[rel] and now.name.split(".")[1] in pids, f"{rel}: {now} is neither writer's"
        leftovers = [p.name for p in (ds / ".staging").iterdir() if not p.name.startswith(".")]
        assert not [n for n in leftovers if n.startswith(("dt=", "link."))], f"{rel}: staging left: {leftovers}"
        for version in (ds / ".versions").glob(f"dt={DAY}.*"):  # whatever stays is one whole version
            assert _content(version) == world.baseline[rel], (
                f"{rel}: {version.name} differs from the clean run in {_diff(world.baseline[rel], _content(version))}"
            )
    _check_visible(world, asset)


@pytest.mark.parametrize(("asset", "phase"), [("daily_edges", "staged"), ("pruned_edges", "versioned")])
def test_spark_engine_killed_mid_publish_leaves_the_day_and_a_rerun_recovers(world, asset, phase):
    """The same faults with OMNISAGE_ENGINE=spark (a local Spark in the child): Spark writes into the staging
    folder that publishing owns, so a kill before the swap leaves the published day as it was, and a re-run
    (the DuckDB engine: both engines publish identical rows) recovers it whole."""
    rel = PUBLISHED[asset][-1]
    target = world.dataset(rel)
    before = {rel: published_path(target, DAY)}
    child = world.start(
        _asset_steps(asset), fault=(phase, dataset_label(target)), env_over={"OMNISAGE_ENGINE": "spark"}
    )
    code = child.finish()
    assert code == -signal.SIGKILL, f"spark {asset} with fault {phase}: exit {code}\n{child.log_tail()}"
    # the dead writer's files are Spark's (its committer names them part-*-c000*.parquet)
    left = [
        *(target / ".staging").glob(f"dt={DAY}.{child.pid}.*"),
        *(target / ".versions").glob(f"dt={DAY}.{child.pid}.*"),
    ]
    assert left and any("-c000" in f.name for d in left for f in d.rglob("*.parquet")), child.log_tail()
    assert published_path(target, DAY) == before[rel]
    _check_previous_intact(world, asset, before)
    _check_visible(world, asset)
    _rerun_and_check(world, asset, child.pid)
