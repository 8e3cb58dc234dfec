"""Blocking asset checks evaluated on a day's STAGED output, before it is published.

Each asset passes a ``StagedGate`` as the ``validate`` hook of ``omnisage_pipeline.storage.publish.publish_partition``:
the gate evaluates the checks on the staging directory; when a blocking check fails it raises
``assets.daily.BlockingCheckFailed`` inside the publish, so the staging is thrown away and every reader keeps
the previous version. ``assets.daily.materialize_days`` then records the results (failed ones included)
and fails the step with a message naming the check, the day and the figure. The evaluators below are
Dagster-free apart from the result type and read only footers or vectorised columns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from assets.daily import BlockingCheckFailed
from omnisage_pipeline.storage.publish import published_path

ERROR = dg.AssetCheckSeverity.ERROR


def blocking_spec(
    name: str, asset: str, description: str, *, partitions_def: dg.PartitionsDefinition | None
) -> dg.AssetCheckSpec:
    """A blocking check. ``partitions_def``: the asset's (Dagster requires the same) when the result belongs
    to one day, so that ``assets.daily.materialize_days`` records each day's result for that day's partition;
    None for a check of a whole unpartitioned asset."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description, partitions_def=partitions_def)


class StagedGate:
    """``validate`` hook of publish_partition: evaluate checks on the staged directory, keep the results,
    raise BlockingCheckFailed when one of severity ERROR failed (nothing is published then).

    ``early``: results already known from what is about to be staged (``no_empty_replacement``, from the
    validated row counts). ``refuse_early()`` raises on them before the asset publishes anything of the day
    (an asset that publishes a quarantine table first would otherwise replace it); every evaluation of the
    staged output reports them with its own results."""

    def __init__(
        self,
        day: str,
        evaluate: Callable[[Path], Sequence[dg.AssetCheckResult]],
        early: Sequence[dg.AssetCheckResult] = (),
    ):
        self.day = day
        self.evaluate = evaluate
        self.early = list(early)
        self.results: list[dg.AssetCheckResult] = []

    def refuse_early(self) -> None:
        self._record(self.early)

    def __call__(self, staging: Path) -> None:
        self._record([*self.early, *self.evaluate(staging)])

    def _record(self, results: list[dg.AssetCheckResult]) -> None:
        self.results = results
        if any(not r.passed and r.severity == ERROR for r in self.results):
            raise BlockingCheckFailed(self.day, self.results)


def parquet_rows(paths: Iterable[Path]) -> int:
    """Rows of the Parquet files in these folders (or files), from their footers."""
    total = 0
    for path in paths:
        path = Path(path)
        files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        total += sum(pq.ParquetFile(f).metadata.num_rows for f in files if f.is_file())
    return total


def result(asset: str, name: str, passed: bool, description: str, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        asset_key=asset, check_name=name, passed=bool(passed), metadata=metadata, description=description
    )


# ------------------------------------------------------------------------------------------ ingest
def published_rows(dataset_dir: Path, day: str, tables: Sequence[str]) -> dict[str, int | None]:
    """Rows of each table (a sub-folder; ``""``: the partition folder itself) of the version of ``day``
    published now: 0 when the day was never published, None when its files cannot be read (a damaged
    version is not protected: ``reuse_identical_versions=False`` exists to replace one)."""
    version = published_path(dataset_dir, day)
    counts: dict[str, int | None] = {}
    for table in tables:
        try:
            counts[table] = parquet_rows([version / table]) if version is not None else 0
        except (OSError, pa.ArrowException):
            counts[table] = None
    return counts


def no_empty_replacement(
    asset: str, staged: Mapping[str, int], published: Mapping[str, int | None], allow: bool
) -> dg.AssetCheckResult:
    """No table of the day that has rows in its published version is replaced by an empty one (a lost or
    half-delivered input, not a day without data), unless ``allow`` (run config ``allow_empty_replacement``)."""
    emptied = [t for t, n in published.items() if n and not staged.get(t, 0)]
    names = ", ".join(f"{t or asset} ({published[t]} rows published)" for t in emptied)
    if not emptied:
        text = "no published table with rows would be replaced by an empty one"
    elif allow:
        text = f"replacing {names} by an empty table, as allow_empty_replacement asks"
    else:
        text = (
            f"refused to replace {names} by an empty table; the published version stays "
            "(set allow_empty_replacement to empty the day on purpose)"
        )
    return result(
        asset,
        "no_empty_replacement",
        not emptied or allow,
        text,
        staged_rows=dg.MetadataValue.json(dict(staged)),
        published_rows=dg.MetadataValue.json(dict(published)),
        emptied_tables=dg.MetadataValue.json(emptied),
        allow_empty_replacement=bool(allow),
    )


# ------------------------------------------------------------------------------------------ engagement_logs
def quarantine_share(asset: str, rows_read: int, rows_quarantined: int, max_fraction: float) -> dg.AssetCheckResult:
    """The quarantined share of a day's rows is at most ``max_fraction`` (an empty day passes)."""
    share = rows_quarantined / rows_read if rows_read else 0.0
    return result(
        asset,
        "quarantine_share",
        share <= max_fraction,
        f"quarantined share {share:.3f} ({rows_quarantined} of {rows_read} rows) "
        f"{'<=' if share <= max_fraction else '>'} max_quarantine_fraction {max_fraction}",
        quarantined_share=float(share),
        rows_read=int(rows_read),
        rows_quarantined=int(rows_quarantined),
        max_quarantine_fraction=float(max_fraction),
    )


# ------------------------------------------------------------------------------------------ graph_snapshot
def graph_coverage(neighborhoods_dir: Path, min_coverage: float) -> dg.AssetCheckResult:
    """Share of graph nodes whose cached neighbourhood N(u) is not empty (paper 3.1.1); an empty graph passes."""
    index = np.load(Path(neighborhoods_dir) / "index.npy", mmap_mode="r")
    nodes = int(index.shape[0])
    covered = int((np.asarray(index) >= 0).any(axis=1).sum()) if nodes else 0
    share = covered / nodes if nodes else 1.0
    return result(
        "graph_snapshot",
        "graph_coverage",
        share >= min_coverage,
        f"{covered} of {nodes} nodes ({share:.3f}) have a non-empty neighbourhood; min_coverage {min_coverage}",
        coverage=float(share),
        nodes=nodes,
        nodes_with_neighbours=covered,
        min_coverage=float(min_coverage),
    )


# ------------------------------------------------------------------------------------------- feature_store
def features_complete(store_dir: Path, entities: dict[str, np.ndarray]) -> dg.AssetCheckResult:
    """Every entity of the day (metadata UNION graph nodes, contract) has a record in the staged store."""
    from graph_engine.batch import NODE_TYPE_CODE
    from graph_engine.feature_store import describe_key, encode_keys, key_list
    from graph_engine.featurizer import Featurizer

    expected = sum(len(ids) for ids in entities.values())
    missing: list[bytes] = []
    with Featurizer(store_dir) as store:
        for entity_type, ids in entities.items():
            keys = key_list(encode_keys(NODE_TYPE_CODE[entity_type], ids))
            for start in range(0, len(keys), 4096):
                chunk = keys[start : start + 4096]
                missing += [k for k, v in zip(chunk, store.multi_get(chunk)) if v is None]
    return result(
        "feature_store",
        "every_entity_has_features",
        not missing,
        f"{len(missing)} of {expected} entities (metadata and graph nodes) have no record"
        + (f", e.g. {', '.join(describe_key(k) for k in missing[:3])}" if missing else ""),
        entities_expected=expected,
        entities_missing=len(missing),
    )


# --------------------------------------------------------------------------------------- training_examples
#: The table a task trains on (ml.training_examples layout): an enabled task needs at least one row.
TASK_TABLES = {"entity_entity": "pairs", "entity_feature": "feature_nodes", "user_entity": "sequences"}


def examples_per_task(examples_dir: Path, required: Sequence[str]) -> dg.AssetCheckResult:
    """Every task has training rows. An empty ``required`` task fails with severity ERROR (blocking); an
    empty task that is not required is flagged with severity WARN (e.g. user_entity on the first days, when
    the window is not longer than the evaluation horizon and no training sequence exists yet)."""
    rows = {task: parquet_rows([Path(examples_dir) / f"{table}.parquet"]) for task, table in TASK_TABLES.items()}
    empty = [task for task, n in rows.items() if n == 0]
    blocking = [task for task in empty if task in required]
    return dg.AssetCheckResult(
        asset_key="training_examples",
        check_name="examples_for_every_task",
        passed=not empty,
        severity=ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={
            "rows_per_task": dg.MetadataValue.json(rows),
            "empty_tasks": dg.MetadataValue.json(empty),
            "required_tasks": dg.MetadataValue.json(list(required)),
        },
        description=f"tasks without training examples: {', '.join(f'{t} (0 rows of {TASK_TABLES[t]})' for t in empty)}"
        + (f"; required: {', '.join(blocking)}" if blocking else "")
        if empty
        else f"every task has examples: {rows}",
    )


# --------------------------------------------------------------------------------------- entity_embeddings
def embeddings_valid(
    embeddings_dir: Path, expected_entities: int, model_version: str, norm_tolerance: float
) -> dg.AssetCheckResult:
    """Staged embeddings: finite, unit L2 norm (within ``norm_tolerance``), exactly one per entity of the day,
    all from ``model_version`` (the champion the run resolved)."""
    table = pq.read_table(sorted(Path(embeddings_dir).glob("*.parquet")))
    n = table.num_rows
    flat = pc.list_flatten(table.column("embedding")).to_numpy(zero_copy_only=False).astype(np.float32)
    dim = flat.size // n if n else 0
    vectors = flat.reshape(n, dim) if n and dim and flat.size == n * dim else None
    finite = np.isfinite(vectors).all(axis=1) if vectors is not None else np.zeros(n, bool)
    norms = np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1) if vectors is not None else np.zeros(n)
    off_norm = int((np.abs(norms - 1.0) > norm_tolerance).sum())
    keys = table.select(["entity_type", "entity_id"]).group_by(["entity_type", "entity_id"]).aggregate([])
    duplicates = n - keys.num_rows
    versions = sorted(set(table.column("model_version").to_pylist()))
    problems = {
        "non_finite": int((~finite).sum()),
        "not_unit_norm": off_norm,
        "duplicates": int(duplicates),
        "missing_or_extra": int(keys.num_rows - expected_entities),
        "other_versions": len([v for v in versions if v != model_version]),
    }
    bad = {k: v for k, v in problems.items() if v}
    return result(
        "entity_embeddings",
        "embeddings_valid",
        not bad,
        f"{n} embeddings for {expected_entities} entities of model version {model_version}: "
        + (", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "all finite, unit norm, one per entity"),
        rows=n,
        expected_entities=int(expected_entities),
        model_version=str(model_version),
        versions_found=dg.MetadataValue.json(versions),
        **problems,
    )
