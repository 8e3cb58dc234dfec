"""Per-day materializations of a single-run backfill, read back from the instance's event log.

A range run records each day as soon as it is published (so a failure on day k leaves days before k
recorded), and the newest materialization of every day holds that day's own figures, including the
standard ``dagster/row_count`` = the rows of the published day."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest

from omnisage_pipeline.storage.publish import published_path
from omnisage_pipeline.tools.synthetic import generate

DAYS = ["2026-03-01", "2026-03-02", "2026-03-03"]


@pytest.fixture
def range_env(omnisage_env, tmp_path, monkeypatch):
    data_root = tmp_path / "data"
    generate(data_root, start_date=DAYS[0], days=3, scale="tiny", seed=0)
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(data_root))
    return data_root


def _materialize_range(assets, instance, first=DAYS[0], last=DAYS[-1], **kwargs):
    from omnisage_pipeline.resources import StorageResource, lazy_pyspark
    from omnisage_pipeline.settings import Settings

    settings = Settings.from_env()
    return dg.materialize(
        assets,
        instance=instance,
        resources={"storage": StorageResource.from_settings(settings), "pyspark": lazy_pyspark(settings)},
        tags={"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last},
        **kwargs,
    )


def _newest(instance, asset: str, day: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day]), limit=1
    ).records
    return records[0].asset_materialization if records else None


def _rows(folder) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(folder.rglob("*.parquet")))


def test_each_day_of_a_range_holds_its_own_metadata(range_env):
    from assets.graph import daily_edges
    from assets.ingest import engagement_logs, entity_metadata
    from omnisage_pipeline.settings import Settings

    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_range([engagement_logs, entity_metadata, daily_edges], instance)
    assert result.success
    settings = Settings.from_env()
    for asset in ("engagement_logs", "entity_metadata", "daily_edges"):
        seen = set()
        for day in DAYS:
            mat = _newest(instance, asset, day)
            assert mat is not None, (asset, day)
            rows = _rows(published_path(settings.warehouse_dataset(asset), day))
            assert mat.metadata["dagster/row_count"].value == rows, (asset, day)
            assert "partitions" not in mat.metadata  # no JSON of every day copied onto each day
            assert mat.metadata["path"].value.endswith(f"dt={day}")
            seen.add(rows)
        if asset != "entity_metadata":  # the metadata snapshot is the same every day; the logs are not
            assert len(seen) > 1, asset  # so a figure copied from one day onto the others would be caught
    # Every day of every asset: one early record (published) and the step's own, with equal metadata.
    for asset in ("engagement_logs", "daily_edges"):
        for day in DAYS:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day]), limit=10
            ).records
            assert len(records) == 2
            first, last = (r.asset_materialization.metadata for r in records)
            assert first == last


def test_failure_mid_range_leaves_earlier_days_recorded(range_env):
    from assets.ingest import engagement_logs
    from omnisage_pipeline.settings import Settings

    bad = range_env / "engagement_logs" / f"dt={DAYS[1]}" / "zz-broken.parquet"
    bad.write_bytes(b"")  # a zero-byte file: the contract rejects the whole day
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize_range([engagement_logs], instance, raise_on_error=False)
    assert not result.success
    settings = Settings.from_env()
    first = _newest(instance, "engagement_logs", DAYS[0])
    assert first is not None
    assert first.metadata["dagster/row_count"].value == _rows(
        published_path(settings.warehouse_dataset("engagement_logs"), DAYS[0])
    )
    assert _newest(instance, "engagement_logs", DAYS[1]) is None
    assert _newest(instance, "engagement_logs", DAYS[2]) is None
    assert published_path(settings.warehouse_dataset("engagement_logs"), DAYS[1]) is None
    assert set(instance.get_materialized_partitions(dg.AssetKey("engagement_logs"))) == {DAYS[0]}
