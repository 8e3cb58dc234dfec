"""Two partitions materialized at the same time by two processes.

Two child processes share one OMNISAGE_HOME, one DAGSTER_HOME (sqlite run storage) and one fresh MLflow sqlite
store, as two runs of `dagster dev` with more than one concurrent run would. Each child imports everything,
says "ready" and waits; the parent releases both at once (a barrier over their stdin), so the two runs overlap:

1. the daily data assets, child A for day 1 and child B for day 2 (OMNISAGE_WINDOW_DAYS=1, so neither day
   reads the other's output and the concurrent result must equal a sequential run's exactly);
2. then omnisage_model, child A trained on day 1 and child B on day 2, at the same time, into the same MLflow
   store, which neither of them has initialised yet.

Asserted: both children succeed at every step; every published partition of every data asset has the same
content (rows, arrays, RocksDB keys and values, JSON manifests without timings and paths) as a sequential run
of the same two days in another OMNISAGE_HOME; no staging or orphan versions are left behind; the Dagster
instance recorded both runs; and the MLflow store is readable afterwards with both runs FINISHED (params
naming their training partition), two model versions, and the champion alias on one of them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ml.tracking import prepare_store
from omnisage_pipeline.settings import prepare_dagster_home
from omnisage_pipeline.storage.publish import list_published, published_path
from omnisage_pipeline.tools.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
DAYS = ["2026-01-01", "2026-01-02"]
CHILD_TIMEOUT_S = 600
TINY_TRAIN = {
    "preset": "small",
    "steps": 4,
    "warmup_steps": 1,
    "batch_size": 16,
    "num_random_negatives": 16,
    "pool_size": 200,
    "log_every": 2,
    "checkpoint_every": 0,
    "device": "cpu",
}

#: Data asset -> the datasets it publishes (relative to OMNISAGE_HOME), contract "Outputs".
DATASETS = {
    "engagement_logs": ["warehouse/engagement_logs", "warehouse/quarantine/engagement_logs"],
    "entity_metadata": ["warehouse/entity_metadata", "warehouse/quarantine/entity_metadata"],
    "daily_edges": ["warehouse/daily_edges"],
    "pruned_edges": ["warehouse/pruned_edges"],
    "graph_snapshot": ["graph"],
    "feature_store": ["features"],
    "training_examples": ["warehouse/training_examples"],
}

#: One child: a list of steps, each run right after the parent says "go" (when "sync") or at once.
CHILD = r"""
import json, sys
spec = json.loads(sys.argv[1])
import dagster as dg
from omnisage_pipeline.definitions import defs

def say(*parts):
    print(*parts, flush=True)

instance = dg.DagsterInstance.get()
daily = defs.resolve_job_def("daily_pipeline")
data_keys = [k for k in daily.asset_layer.executable_asset_keys if k.to_user_string() in spec["data_assets"]]
for step in spec["steps"]:
    if spec["sync"]:
        say("ready")
        if sys.stdin.readline().strip() != "go":
            sys.exit(3)
    if step["kind"] == "data":
        for day in step["days"]:
            daily.execute_in_process(instance=instance, partition_key=day, asset_selection=data_keys)
        say("result", json.dumps({"kind": "data", "days": step["days"]}))
    else:
        result = defs.resolve_job_def("train_omnisage_model").execute_in_process(
            instance=instance, run_config={"ops": {"omnisage_model": {"config": step["config"]}}}
        )
        meta = result.asset_materializations_for_node("omnisage_model")[-1].metadata
        keys = ("mlflow_run_id", "model_version", "alias", "training_partition")
        say("result", json.dumps({"kind": "train", **{k: meta[k].value for k in keys}}))
say("done")
"""


def _env(tmp_path: Path, name: str, data_root: Path) -> dict[str, str]:
    home, dagster_home = tmp_path / name / "home", tmp_path / name / "dagster_home"
    prepare_dagster_home(dagster_home)  # the project's instance config: telemetry off (else ~/.dagster)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OMNISAGE_", "DAGSTER_", "MLFLOW_"))}
    return {
        **inherited,
        # One numba cache for the three children: the sequential run compiles, the concurrent ones load.
        "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
        "MPLCONFIGDIR": str(home / "scratch" / "matplotlib"),
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_DATA_ROOT": str(data_root),
        "OMNISAGE_ENGINE": "duckdb",
        "OMNISAGE_START_DATE": DAYS[0],
        "OMNISAGE_WINDOW_DAYS": "1",  # day 2 reads nothing of day 1: the concurrent result is well defined
        "OMNISAGE_RETENTION_DAYS": "30",  # and nothing expires while the other child still runs
        "DAGSTER_HOME": str(dagster_home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }


class Child:
    """A child process that talks on stdout ("ready", "result <json>", "done") and waits for "go" on stdin."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._stderr = open(log, "wb")  # noqa: SIM115 (closed by finish/kill)
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.results: list[dict] = []
        self._buffer = b""
        self._deadline = time.monotonic() + CHILD_TIMEOUT_S

    @classmethod
    def pipeline(cls, env: dict[str, str], steps: list[dict], sync: bool, log: Path) -> Child:
        spec = {"steps": steps, "sync": sync, "data_assets": list(DATASETS)}
        return cls(["-c", CHILD, json.dumps(spec)], env, log)

    def _fail(self, what: str) -> str:
        self._stderr.flush()
        return f"child {self.proc.pid} {what}:\n{self.log.read_bytes()[-6000:].decode(errors='replace')}"

    def _line(self) -> str | None:
        """The next stdout line, or None at end of file; fails the test past the child's deadline."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = self._deadline - time.monotonic()
            assert remaining > 0, self._fail(f"still running after {CHILD_TIMEOUT_S} s")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, word: str) -> None:
        """Read stdout lines until one starting with ``word`` (other lines are library chatter)."""
        while True:
            line = self._line()
            assert line is not None, self._fail(f"exited (rc={self.proc.wait()}) before saying {word!r}")
            if line.startswith("result "):
                self.results.append(json.loads(line[len("result ") :]))
            if line.split(" ", 1)[0].strip() == word:
                return

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self.expect("done")
        rc = self.proc.wait(timeout=CHILD_TIMEOUT_S)
        self._stderr.close()
        assert rc == 0, self._fail(f"rc={rc}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


# ----------------------------------------------------------------------------------------- content
_VERSION_NAME = re.compile(r"/\.versions/(dt=[^/.]+)\.\d+\.[0-9a-f]+")
#: Timings, and sizes on disk (RocksDB's bytes depend on when it compacted; the contract promises the same
#: keys and values, not the same bytes).
_VOLATILE_KEY = re.compile(r"(seconds|per_second|_s|time|timestamp|stage_key|bytes)$")


def _canon(value, home: str):
    """A value with the home directory, version-directory names and timings taken out; NaN comparable."""
    if isinstance(value, str):
        return _VERSION_NAME.sub(r"/\1", value.replace(home, "$OMNISAGE_HOME"))
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, (list, tuple)):
        return tuple(_canon(v, home) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _canon(v, home)) for k, v in value.items() if not _VOLATILE_KEY.search(k)))
    return value


def _content(version: Path, home: Path) -> dict:
    """What a reader gets from one published version directory: Parquet rows as multisets, .npy arrays,
    JSON documents and the RocksDB feature store's keys and values; other files by their bytes."""
    h = str(home)
    out: dict = {}
    rocks = (version / "CURRENT").is_file()
    if rocks:
        from rocksdict import AccessType, Rdict

        from graph_engine.feature_store import MANIFEST_KEY, store_options

        db = Rdict(str(version), options=store_options(), access_type=AccessType.read_only())
        try:
            records = {bytes(k): bytes(v) for k, v in db.items()}
        finally:
            db.close()
        manifest = records.pop(MANIFEST_KEY, None)
        assert records, f"{version}: empty feature store"
        out["<records>"] = hashlib.sha256(repr(sorted(records.items())).encode()).hexdigest()
        out["<manifest>"] = _canon(json.loads(manifest), h) if manifest else None
    tables: dict[str, Counter] = {}
    for path in sorted(version.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        rel = str(path.relative_to(version))
        if path.suffix == ".parquet":
            rows = tables.setdefault(str(path.parent.relative_to(version)), Counter())
            rows.update(tuple(_canon(v, h) for v in row.values()) for row in pq.read_table(path).to_pylist())
        elif path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            out[rel] = (
                str(arr.dtype),
                arr.shape,
                hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(),
            )
        elif path.suffix == ".json":
            out[rel] = _canon(json.loads(path.read_text()), h)
        elif not rocks:  # RocksDB's own files carry ids and times; its content was read above
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    out.update({f"{folder}/*.parquet": rows for folder, rows in tables.items()})
    assert out, f"{version} is empty"
    return out


def _published_content(env: dict[str, str]) -> dict:
    home = Path(env["OMNISAGE_HOME"])
    out = {}
    for asset, datasets in DATASETS.items():
        for dataset in datasets:
            assert list_published(home / dataset) == DAYS, (asset, dataset, list_published(home / dataset))
            for day in DAYS:
                out[(dataset, day)] = _content(published_path(home / dataset, day), home)
    return out


def _leftovers(home: Path) -> list[str]:
    """Staging directories, and version directories no dt=D link points to (a concurrent writer's mess)."""
    bad = []
    for datasets in DATASETS.values():
        for dataset in datasets:
            root = home / dataset
            bad += [str(p) for p in (root / ".staging").glob("dt=*")]
            live = {published_path(root, day) for day in DAYS}
            bad += [str(p) for p in (root / ".versions").glob("dt=*") if p.resolve() not in live]
    return bad


def _release_together(children: list[Child]) -> None:
    for child in children:
        child.expect("ready")
    for child in children:  # both have finished importing and wait on stdin: released at the same moment
        child.go()


OPEN_STORE = r"""
import json, sys
from omnisage_pipeline.resources import MlflowResource
resource = MlflowResource(tracking_uri=sys.argv[1], artifact_root=sys.argv[2])
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(3)
experiment = resource.experiment_id()
client = resource.client()
client.search_registered_models()
print("result", json.dumps({"experiment_id": experiment}), flush=True)
print("done", flush=True)
"""


def test_a_fresh_mlflow_store_opened_by_three_processes_at_once(tmp_path):
    """MLflow creates a sqlite store's schema in the first process that opens it, without a lock: three
    processes opening a new store together used to fail with alembic errors ("duplicate column name: step",
    "UNIQUE constraint failed: alembic_version") or a second create_experiment. MlflowResource serialises
    the schema creation and the experiment's get-or-create with a file lock next to the database."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNISAGE_", "MLFLOW_"))}
    children = []
    try:
        for i in range(3):
            args = ["-c", OPEN_STORE, uri, str(tmp_path / "home" / "artifacts")]
            children.append(Child(args, env, tmp_path / f"store-{i}.stderr"))
        _release_together(children)
        for child in children:
            child.finish()
    finally:
        for child in children:
            child.kill()
    assert {c.results[0]["experiment_id"] for c in children} == {"1"}
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [e.name for e in client.search_experiments()].count("omnisage") == 1
    assert (tmp_path / "home" / "mlflow.db.lock").is_file()  # the lock lives next to the store, not in cwd


def _gate(client, result: dict) -> dict:
    tags = client.get_run(result["mlflow_run_id"]).data.tags
    return {
        "version": result["model_version"],
        "alias": tags["gate.alias"],
        "previous": tags["gate.previous_champion"],
    }


def test_two_partitions_at_the_same_time_equal_a_sequential_run(tmp_path):
    import dagster as dg
    import mlflow

    data_root = tmp_path / "data"
    generate(data_root, start_date=DAYS[0], days=len(DAYS), scale="tiny", seed=0)
    concurrent, sequential = _env(tmp_path, "concurrent", data_root), _env(tmp_path, "sequential", data_root)
    # Dagster's sqlite storage must be created once before processes share it (two processes migrating a
    # fresh DAGSTER_HOME at the same time collide in alembic; `dagster dev` also creates it before any run).
    dg.DagsterInstance.from_config(concurrent["DAGSTER_HOME"]).dispose()
    # The MLflow store exists too (its concurrent creation is the test above): both trainings then start from
    # the same point and reach the promotion gate together.
    prepare_store(concurrent["MLFLOW_TRACKING_URI"])

    # The sequential reference runs first, alone (and fills the numba cache); then the two children, which
    # imported everything meanwhile, are released together for the data assets, then for the training.
    reference = Child.pipeline(sequential, [{"kind": "data", "days": DAYS}], sync=False, log=tmp_path / "seq.stderr")
    children = [
        Child.pipeline(
            concurrent,
            [
                {"kind": "data", "days": [DAYS[i]]},
                {"kind": "train", "config": {**TINY_TRAIN, "training_partition": DAYS[i], "seed": i}},
            ],
            sync=True,
            log=tmp_path / f"day{i + 1}.stderr",
        )
        for i in range(2)
    ]
    try:
        reference.finish()
        _release_together(children)  # data assets: day 1 and day 2 at the same time
        _release_together(children)  # omnisage_model on day 1 and on day 2 at the same time, one MLflow store
        for child in children:
            child.finish()
    finally:
        for child in [reference, *children]:
            child.kill()

    # Data: each concurrently built partition holds exactly what the sequential run built.
    got, want = _published_content(concurrent), _published_content(sequential)
    differ = [key for key in want if got.get(key) != want[key]]
    assert not differ, f"concurrent partitions differ from the sequential run: {differ}"
    assert _leftovers(Path(concurrent["OMNISAGE_HOME"])) == []

    # Dagster: the shared sqlite instance recorded both children's runs, all successful.
    with dg.DagsterInstance.from_config(concurrent["DAGSTER_HOME"]) as instance:
        records = instance.get_run_records()
        assert len(records) == 4, [(r.dagster_run.job_name, r.dagster_run.status) for r in records]
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        for asset in DATASETS:
            assert set(instance.get_materialized_partitions(dg.AssetKey(asset))) == set(DAYS), asset

    # MLflow: the store both children created and wrote at the same time is readable and complete.
    trained = sorted(
        (r for c in children for r in c.results if r["kind"] == "train"),
        key=lambda r: r["training_partition"],
    )
    assert [r["training_partition"] for r in trained] == DAYS
    client = mlflow.MlflowClient(
        tracking_uri=concurrent["MLFLOW_TRACKING_URI"], registry_uri=concurrent["MLFLOW_TRACKING_URI"]
    )
    for r in trained:
        run = client.get_run(r["mlflow_run_id"])
        assert run.info.status == "FINISHED", run.info
        assert run.data.params["training_partition"] == r["training_partition"]
        assert run.data.tags.get("model_version") == r["model_version"]
    versions = client.search_model_versions("name='omnisage'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {r["mlflow_run_id"] for r in trained}
    experiments = [e.name for e in client.search_experiments()]
    assert experiments.count("omnisage") == 1, experiments

    # The promotion gate saw the two trainings one after the other: exactly one of them found no champion,
    # the other was compared with it, and the alias ended where the later decision put it.
    gates = [_gate(client, r) for r in trained]
    first = [g for g in gates if g["previous"] == ""]
    assert len(first) == 1, f"both trainings decided without seeing the other's model: {gates}"
    first, second = first[0], next(g for g in gates if g["previous"] != "")
    assert first["alias"] == "champion" and second["previous"] == first["version"], gates
    champion = str(client.get_model_version_by_alias("omnisage", "champion").version)
    assert champion == (second["version"] if second["alias"] == "champion" else first["version"]), (
        gates,
        champion,
    )
