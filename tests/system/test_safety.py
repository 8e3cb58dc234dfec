"""Safety guarantees (the README's "Safety guarantees (tested)").

(a) No pickle on any load path: a static scan (AST) of every Python file of the project outside tests/ forbids
    pickle-family modules and identifiers (pickle, cloudpickle, dill, joblib, shelve, read_pickle, ...),
    ``mlflow.pytorch``, ``torch.load`` without ``weights_only=True`` and ``allow_pickle=True``; and dynamically,
    with pickle.load/loads/Unpickler and torch.load rigged to fail, the registered champion loads from the
    MLflow registry and ``entity_embeddings`` (the asset that loads it) materializes.
(b) Nothing is written outside OMNISAGE_HOME and the system temp dir: one partition of the data assets runs
    through the CLI (DAGSTER_HOME unset: the contract puts Dagster's storage under OMNISAGE_HOME) in a child
    whose working directory and HOME are read-only empty directories and whose source tree is a read-only
    copy; the child succeeds, the three stay untouched, and the run is recorded under OMNISAGE_HOME/dagster.
(c) The UIs bind to 127.0.0.1: the Makefile's `dev` target (as `make -n` expands it), the commands
    ``omnisage_pipeline.tools.demo.where_to_look`` prints and the README's commands.
(d) No secret and no whole environment is logged: with a secret-looking and an innocuous marker variable in
    the environment of a real run (data assets, training, embeddings), neither value appears in the Dagster
    event logs, run configs and tags, the MLflow params, tags and metrics, or any file under OMNISAGE_HOME.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from omnisage_pipeline.storage.publish import published_path
from omnisage_pipeline.tools.synthetic import generate

REPO = Path(__file__).resolve().parents[2]
DAY = "2026-01-01"
DATA_ASSETS = [
    "engagement_logs",
    "entity_metadata",
    "daily_edges",
    "pruned_edges",
    "graph_snapshot",
    "feature_store",
    "training_examples",
]
SECRET = "omnisage-test-secret-8d41e27a9c"
MARKER = "omnisage-env-marker-3f6b0a15d2"
TINY_TRAIN = {
    "preset": "small",
    "steps": 4,
    "warmup_steps": 1,
    "batch_size": 16,
    "num_random_negatives": 16,
    "pool_size": 200,
    "log_every": 2,
    "checkpoint_every": 2,
    "device": "cpu",
}


# ============================================================================================== (a) static
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def pickle_violations(source: str, filename: str = "<source>") -> list[str]:
    """Every construct that can unpickle, in one module's source (file:line: what)."""
    tree = ast.parse(source, filename)
    aliases = {"torch": {"torch"}, "numpy": {"numpy", "np"}, "mlflow": {"mlflow"}}
    found = []

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                root = a.name.split(".")[0]
                if a.name in aliases:
                    aliases[a.name].add(a.asname or a.name)
                if root in PICKLE_MODULES or a.name.startswith("mlflow.pytorch"):
                    bad(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {a.name for a in node.names}
            if module.split(".")[0] in PICKLE_MODULES or module.startswith("mlflow.pytorch"):
                bad(node, f"from {module} import ...")
            if module == "mlflow" and "pytorch" in names:
                bad(node, "from mlflow import pytorch")
            if module == "torch" and "load" in names:
                bad(node, "from torch import load")
            if module == "numpy" and "load" in names:
                bad(node, "from numpy import load")
        elif isinstance(node, ast.Attribute):
            if "pickle" in node.attr.lower():
                bad(node, f"attribute {_dotted(node)}")
            if node.attr == "pytorch" and _dotted(node.value) in aliases["mlflow"]:
                bad(node, "mlflow.pytorch")
        elif isinstance(node, ast.Name) and "pickle" in node.id.lower():
            bad(node, f"name {node.id}")
        elif isinstance(node, ast.keyword) and node.arg == "allow_pickle":
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                bad(node.value, "allow_pickle not False")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = _dotted(node.func.value)
            if owner in aliases["torch"]:
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                if not (
                    weights_only
                    and isinstance(weights_only[0].value, ast.Constant)
                    and weights_only[0].value.value is True
                ):
                    bad(node, "torch.load without weights_only=True")
    return found


def _project_sources() -> list[Path]:
    """The project's own Python files: its packages and benchmarks (never an environment, cache or build)."""
    roots = ("assets", "ml", "graph_engine", "omnisage_pipeline", "benchmarks")
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_scanner_finds_every_unpickling_construct():
    bad = """
import pickle
import cloudpickle as cp
from joblib import load
import mlflow.pytorch
import torch as t
import numpy as np
from mlflow import pytorch
x = t.load("m.pt")
y = t.load("m.pt", weights_only=False)
z = np.load("a.npy", allow_pickle=True)
w = df.read_pickle("f")
import mlflow
m = mlflow.pytorch.load_model("runs:/1/model")
"""
    found = pickle_violations(bad)
    lines = sorted({int(f.split(":")[1]) for f in found})
    assert lines == [2, 3, 4, 5, 8, 9, 10, 11, 12, 14], found
    good = """
import torch
import numpy as np
state = torch.load("ckpt.pt", map_location="cpu", weights_only=True)
arr = np.load("a.npy", mmap_mode="r", allow_pickle=False)
b = np.load("b.npy")
"""
    assert pickle_violations(good) == []


def test_no_pickle_in_the_project_sources():
    files = _project_sources()
    assert {"ml/model_io.py", "ml/registry.py", "ml/checkpoint.py", "assets/inference.py"} <= {
        str(p.relative_to(REPO)) for p in files
    }
    violations = [v for p in files for v in pickle_violations(p.read_text(), str(p.relative_to(REPO)))]
    assert violations == []


# ========================================================================================= shared pipeline
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One day of tiny data through the data assets, a tiny registered champion, the day's embeddings, with
    a secret and a marker in the environment the whole time (d). Runs on a persistent Dagster instance
    under OMNISAGE_HOME so its event logs can be read back and scanned."""
    import dagster as dg

    from assets.training import OmniSageModelConfig
    from omnisage_pipeline.definitions import build_resources, defs
    from omnisage_pipeline.settings import Settings, prepare_dagster_home

    root = tmp_path_factory.mktemp("safety")
    home = root / "home"
    env = {
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_ENGINE": "duckdb",
        "OMNISAGE_DATA_ROOT": str(root / "data"),
        "OMNISAGE_START_DATE": DAY,
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "DAGSTER_HOME": str(home / "dagster"),
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "OMNISAGE_TEST_SECRET": SECRET,
        "OMNISAGE_TEST_MARKER": MARKER,
    }
    generate(root / "data", start_date=DAY, days=1, scale="tiny", seed=0)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        prepare_dagster_home(home / "dagster")  # the project's instance: telemetry off (else ~/.dagster)
        settings = Settings.from_env()
        assets, resources = list(defs.assets), build_resources(settings)
        with dg.DagsterInstance.get() as instance:
            run_ids = []
            for selection, kwargs in (
                (DATA_ASSETS, {"partition_key": DAY}),
                (
                    ["omnisage_model"],
                    {"run_config": dg.RunConfig({"omnisage_model": OmniSageModelConfig(**TINY_TRAIN)})},
                ),
            ):
                result = dg.materialize(assets, selection=selection, resources=resources, instance=instance, **kwargs)
                assert result.success
                run_ids.append(result.run_id)
            model_meta = result.asset_materializations_for_node("omnisage_model")[-1].metadata
            assert model_meta["alias"].value == "champion"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {
        "settings": settings,
        "assets": assets,
        "resources": resources,
        "run_ids": run_ids,
        "env": env,
        "model_run_id": model_meta["mlflow_run_id"].value,
    }


# ============================================================================================= (a) dynamic
@pytest.fixture
def no_unpickling(monkeypatch):
    """pickle.load/loads/Unpickler (also _pickle's) and torch.load raise while the test runs."""
    import _pickle

    import torch

    calls = []

    def trap(name):
        def boom(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called on a model load path")

        return boom

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, trap(f"{module.__name__}.{name}"))
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    return calls


def test_the_champion_loads_without_unpickling(pipeline, no_unpickling, monkeypatch):
    import dagster as dg

    from ml.registry import ModelRegistry

    settings = pipeline["settings"]
    with pytest.raises(AssertionError, match="pickle.loads called"):
        pickle.loads(pickle.dumps(1))  # the trap is armed
    no_unpickling.clear()

    loaded = ModelRegistry(settings.mlflow_tracking_uri).load_champion()
    assert loaded.version == "1" and loaded.run_id == pipeline["model_run_id"]
    # The asset that loads the champion for inference, end to end, in this process.
    for key, value in pipeline["env"].items():
        monkeypatch.setenv(key, value)
    result = dg.materialize(
        pipeline["assets"],
        selection=["entity_embeddings"],
        partition_key=DAY,
        resources=pipeline["resources"],
    )
    assert result.success
    assert published_path(settings.embeddings_dir, DAY) is not None
    assert no_unpickling == []


# ==================================================================================================== (b)
def _drop_dac_capabilities() -> None:  # pragma: no cover - runs in the child between fork and exec
    """As root, file modes bind only without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER: drop them
    from the bounding set so the exec'd child gets none (the checks after the run hold either way)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def _tree(root: Path) -> dict[str, tuple]:
    out = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _read_only(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o555)
        elif path.is_file():
            path.chmod(0o444)


def test_a_partition_writes_nothing_outside_omnisage_home_and_tmp(tmp_path):
    import dagster as dg

    generate(tmp_path / "data", start_date=DAY, days=1, scale="tiny", seed=0)
    cwd, fake_home, src, home = tmp_path / "cwd", tmp_path / "user_home", tmp_path / "src", tmp_path / "home"
    cwd.mkdir()
    fake_home.mkdir()
    for package in ("assets", "graph_engine", "ml", "omnisage_pipeline"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "workspace.yaml", src / "workspace.yaml")
    watched = {"cwd": cwd, "HOME": fake_home, "source tree": src}
    for folder in watched.values():
        _read_only(folder)
    before = {name: _tree(folder) for name, folder in watched.items()}

    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OMNISAGE_", "DAGSTER_", "MLFLOW_", "NUMBA_", "MPLCONFIGDIR", "PYTHON"))
        },
        "HOME": str(fake_home),
        "PYTHONPATH": str(src),  # the read-only copy is imported, not the repository
        "OMNISAGE_HOME": str(home),
        "OMNISAGE_DATA_ROOT": str(tmp_path / "data"),
        "OMNISAGE_ENGINE": "duckdb",
        "OMNISAGE_START_DATE": DAY,
    }
    cmd = [
        sys.executable,
        "-m",
        "omnisage_pipeline.cli",
        "dagster",
        "asset",
        "materialize",
        "-m",
        "omnisage_pipeline.definitions",
        "--select",
        ",".join(DATA_ASSETS),
        "--partition",
        DAY,
    ]
    drop = _drop_dac_capabilities if os.geteuid() == 0 else None
    try:
        imported = subprocess.run(
            [sys.executable, "-c", "import omnisage_pipeline.cli as m; print(m.__file__)"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            preexec_fn=drop,
        ).stdout.strip()
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False, preexec_fn=drop
        )
    finally:
        for folder in watched.values():
            for path in [folder, *folder.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    path.chmod(0o755)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert imported == str(src / "omnisage_pipeline" / "cli.py")  # the child ran the read-only copy

    after = {name: _tree(folder) for name, folder in watched.items()}
    for name in watched:
        changed = sorted(k for k in set(before[name]) | set(after[name]) if before[name].get(k) != after[name].get(k))
        assert changed == [], f"the run wrote into the {name}: {changed}"

    # Everything it wrote is under OMNISAGE_HOME: the outputs and, DAGSTER_HOME being unset, the Dagster run.
    for dataset in (
        "warehouse/engagement_logs",
        "warehouse/pruned_edges",
        "graph",
        "features",
        "warehouse/training_examples",
    ):
        assert published_path(home / dataset, DAY) is not None, dataset
    with dg.DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("training_examples")) == {DAY}
        # ... in the instance the project creates: the daily chain one run at a time (its pool, enforced per
        # run with limit 1), no telemetry (~/.dagster stays unused).
        pools = instance.get_concurrency_config().pool_config
        assert pools.pool_granularity.value == "run" and pools.default_pool_limit == 1
        assert not instance.telemetry_enabled


# ==================================================================================================== (c)
def _commands(text: str, program: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if program in line]


def _binds_loopback(command: str, flag_names: tuple[str, ...]) -> bool:
    words = command.replace("=", " ").split()
    hosts = [words[i + 1] for i, w in enumerate(words[:-1]) if w in flag_names]
    return hosts == ["127.0.0.1"]


def test_the_uis_bind_to_localhost(tmp_path):
    from omnisage_pipeline.settings import Settings
    from omnisage_pipeline.tools.demo import where_to_look

    made = subprocess.run(
        ["make", "-n", "dev"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "OMNISAGE_HOME": str(tmp_path / "home")},
    )
    assert made.returncode == 0, made.stderr
    printed = where_to_look(Settings.from_env({"OMNISAGE_HOME": str(tmp_path / "home")}))
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    sources = {
        "make -n dev": made.stdout,
        "demo.where_to_look": printed,
        **{str(doc.relative_to(REPO)): doc.read_text() for doc in docs},
    }

    dagster_commands = {name: _commands(text, "dagster dev") for name, text in sources.items()}
    assert dagster_commands["make -n dev"] and dagster_commands["demo.where_to_look"], dagster_commands
    for name, commands in dagster_commands.items():
        for command in commands:
            if command.startswith(("dagster dev", "DAGSTER_HOME")) or " dagster dev " in f" {command} ":
                assert _binds_loopback(command.split("dagster dev", 1)[1], ("-h", "--host")), (name, command)
    mlflow_commands = {
        name: _commands(text, "mlflow ui") + _commands(text, "mlflow server") for name, text in sources.items()
    }
    assert mlflow_commands["demo.where_to_look"], printed
    for name, commands in mlflow_commands.items():
        for command in commands:
            assert _binds_loopback(command, ("-h", "--host")), (name, command)
    for name, text in sources.items():
        assert "0.0.0.0" not in text, name


# ==================================================================================================== (d)
def _dagster_leaks(instance, values: tuple[str, ...]) -> dict[str, list[str]]:
    """run id -> where one of ``values`` appears: the run's config and tags, or an event of its log."""
    import dagster as dg

    leaks = {}
    for run in instance.get_runs():
        record = json.dumps({"config": run.run_config, "tags": dict(run.tags)}, default=str)
        events = [dg.serialize_value(e) for e in instance.all_logs(run.run_id)]
        assert events, run.run_id
        where = ["config/tags"] if any(v in record for v in values) else []
        where += [e[:200] for e in events if any(v in e for v in values)]
        if where:
            leaks[run.run_id] = where
    return leaks


def _mlflow_leaks(client, values: tuple[str, ...]) -> list[str]:
    found = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            logged = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": list(run.data.metrics)})
            found += [run.info.run_id] if any(v in logged for v in values) else []
    for version in client.search_model_versions("name='omnisage'"):
        found += [f"version {version.version}"] if any(v in json.dumps(version.tags) for v in values) else []
    return found


def test_no_secret_or_environment_in_logs_metadata_or_mlflow(pipeline, tmp_path):
    import dagster as dg
    import mlflow

    settings = pipeline["settings"]
    values = (SECRET, MARKER)
    with dg.DagsterInstance.from_config(pipeline["env"]["DAGSTER_HOME"]) as instance:
        assert {r.run_id for r in instance.get_runs()} >= set(pipeline["run_ids"])
        assert _dagster_leaks(instance, values) == {}

    client = mlflow.MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)
    params = client.get_run(pipeline["model_run_id"]).data.params
    assert params["training_partition"] == DAY and len(params) > 20  # the whole configuration was logged ...
    assert _mlflow_leaks(client, values) == []  # ... and nothing of the environment

    # No file the pipeline wrote holds either value (databases, event logs, artifacts, outputs).
    holders = [
        str(p.relative_to(settings.home))
        for p in settings.home.rglob("*")
        if p.is_file() and not p.is_symlink() and any(v.encode() in p.read_bytes() for v in values)
    ]
    assert holders == []

    # The checks above do find a value that is logged (positive control, in a scratch instance and store).
    @dg.asset
    def leaky(context):  # (no annotations: dg is imported locally)
        context.log.info(f"environment marker {MARKER}")
        return dg.MaterializeResult(metadata={"x": SECRET})

    with dg.instance_for_test() as scratch:
        assert dg.materialize([leaky], instance=scratch).success
        leaks = _dagster_leaks(scratch, values)
        assert len(leaks) == 1 and len(next(iter(leaks.values()))) >= 2, leaks
    uri = f"sqlite:///{tmp_path / 'control.db'}"
    control = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    control_run = control.create_run(control.create_experiment("control"))
    control.log_param(control_run.info.run_id, "note", SECRET)
    assert _mlflow_leaks(control, values) == [control_run.info.run_id]
