"""The data side of an ablation: scratch homes and their materialization (the one place that uses Dagster).

Every trained variant gets a scratch OMNISAGE_HOME of its own (``scratch_settings``) under the ablation
root, never the production outputs (``check_root``). The default data of a run (``_base``) is every daily
data asset of the training day plus the window's logs and edges (``build_base_data``); a data variant
re-runs the assets its config touches in its own home and reads the rest from ``_base`` through symlinks
(``build_variant_data``); a model-only variant links the whole of ``_base`` (``link_base_data``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import require_published
from omnisage_pipeline.tools.ablation_studies import AblationError

#: Daily data assets: built for every day of the window (the graph and the sequences read the window) ...
RANGE_ASSETS = ("engagement_logs", "daily_edges")
#: ... and for the training day only.
DAY_ASSETS = ("entity_metadata", "pruned_edges", "graph_snapshot", "feature_store", "training_examples")
#: A data variant re-runs these (from the first one its config touches) and reads the rest from _base.
VARIANT_ASSETS = ("pruned_edges", "graph_snapshot", "feature_store", "training_examples")
UPSTREAM_DATASETS = ("engagement_logs", "daily_edges", "entity_metadata")
#: Production outputs an ablation must never write (contract "Outputs").
PRODUCTION_OUTPUTS = ("warehouse", "graph", "features", "embeddings", "user_embeddings", "reports")


def scratch_settings(production: Settings, home: Path, data_root: Path, engine: str | None = None) -> Settings:
    """Settings of a scratch OMNISAGE_HOME: same engine (unless given), Spark master, start date, window and
    MLflow tracking URI as production; everything written goes under ``home``."""
    return dataclasses.replace(
        production,
        home=Path(home),
        data_root=Path(data_root),
        data_root_is_default=False,
        engine=engine or production.engine,
    )


def check_root(production: Settings, root: Path) -> Path:
    """``root`` as an absolute path, when it is a new or empty folder outside the production outputs."""
    root = Path(root).absolute()
    home = production.home.absolute()
    if root == home:
        raise AblationError(f"ablation root {root} is OMNISAGE_HOME itself: pick a folder of its own")
    for name in PRODUCTION_OUTPUTS + ("mlflow-artifacts", "dagster", "checkpoints"):
        out = home / name
        if root == out or out in root.parents:
            raise AblationError(f"ablation root {root} is inside the production output {out}")
    if root.exists() and any(root.iterdir()):
        raise AblationError(f"ablation root {root} exists and is not empty")
    return root


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target.absolute(), link, target_is_directory=True)


def link_base_data(base: Settings, home: Path, datasets: tuple[str, ...] | None = None) -> None:
    """Make ``home`` read the base data: the given warehouse datasets (data variants), or the whole
    warehouse, graph and features (model-only variants)."""
    if datasets is None:
        _link(base.warehouse, home / "warehouse")
        _link(base.graph_dir, home / "graph")
        _link(base.features_dir, home / "features")
    else:
        for name in datasets:
            _link(base.warehouse_dataset(name), home / "warehouse" / name)


# ==========================================================================================================
# Materialization (the one place that uses Dagster)
# ==========================================================================================================
def materialize(
    settings: Settings,
    selection: tuple[str, ...],
    *,
    day: str | None = None,
    days: list[str] | None = None,
    run_config: dict | None = None,
) -> None:
    """Materialize ``selection`` in process (ephemeral instance) for the scratch ``settings``: one
    partition ``day`` or a single run over ``days`` (the assets' single-run backfill policy)."""
    import dagster as dg

    # Loaded on first use: the definitions read the environment and set the process scratch when imported.
    from omnisage_pipeline.definitions import build_resources, defs

    tags = {}
    if days:
        tags = {"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]}
    config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    if run_config:
        config["ops"] = {asset: {"config": cfg} for asset, cfg in run_config.items()}
    result = dg.materialize(
        list(defs.assets),
        selection=list(selection),
        partition_key=day,
        tags=tags,
        resources=build_resources(settings),
        run_config=config,
        raise_on_error=True,
    )
    if not result.success:  # pragma: no cover - raise_on_error raises first
        raise AblationError(f"materializing {selection} for {settings.home} failed")


def build_base_data(base: Settings, days: list[str], overrides: dict[str, dict] | None = None) -> None:
    """The default data of an ablation (every daily data asset of the training day, the window's logs and
    edges) in the scratch home of ``base``; ``overrides``: run config of the day's assets."""
    materialize(base, RANGE_ASSETS, days=days)
    materialize(base, DAY_ASSETS, day=days[-1], run_config=overrides or None)


def merge_overrides(base: dict[str, dict], variant: dict[str, dict]) -> dict[str, dict]:
    """The run's base overrides with the variant's on top (per asset, per config field)."""
    out = {asset: dict(cfg) for asset, cfg in base.items()}
    for asset, cfg in variant.items():
        out.setdefault(asset, {}).update(cfg)
    return out


def graph_entries(settings: Settings, day: str) -> int:
    """Rows of the day's published pruned_edges (one per kept directed adjacency entry)."""
    import pyarrow.dataset as pads

    path = require_published(settings.warehouse_dataset("pruned_edges"), day)
    return int(pads.dataset(path, format="parquet", exclude_invalid_files=True).count_rows())


def universe_sizes(settings: Settings, day: str) -> dict[str, int]:
    """Entities per type in the day's universe (training_examples' universe.parquet)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    examples = require_published(settings.warehouse_dataset("training_examples"), day)
    table = pq.read_table(examples / "universe.parquet", columns=["entity_type"])
    counts = pc.value_counts(table["entity_type"]).to_pylist()
    return {str(c["values"]): int(c["counts"]) for c in counts}


def build_variant_data(base: Settings, variant: Settings, day: str, overrides: dict[str, dict]) -> None:
    """Re-run the data assets a variant's config touches (and everything after them) in its own home."""
    unknown = [a for a in overrides if a not in VARIANT_ASSETS]
    if unknown:
        raise AblationError(f"data overrides for {unknown}: only {VARIANT_ASSETS} can vary")
    first = min(VARIANT_ASSETS.index(a) for a in overrides)
    rerun = VARIANT_ASSETS[first:]
    before = VARIANT_ASSETS[:first]
    warehouse_before = tuple(a for a in before if a in ("pruned_edges", "training_examples"))
    link_base_data(base, variant.home, UPSTREAM_DATASETS + warehouse_before)
    if "graph_snapshot" in before:
        _link(base.graph_dir, variant.graph_dir)
    if "feature_store" in before:
        _link(base.features_dir, variant.features_dir)
    materialize(variant, rerun, day=day, run_config=overrides)
