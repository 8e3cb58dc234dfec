"""Ingest: the data contract's rules (omnisage_pipeline.contract.validation) and the two ingest assets.

Every bad-row kind of the contract must end in the quarantine with its reason and exact counts; every
structurally unreadable input must fail with a message naming file (and column).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.ingest import engagement_logs, entity_metadata
from omnisage_pipeline.contract import validation as C
from omnisage_pipeline.contract.validation import ContractError
from omnisage_pipeline.partitions import daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import published_path

DAY = daily_partitions.get_first_partition_key()
D0 = datetime.fromisoformat(DAY).replace(tzinfo=UTC)
NEXT_DAY = (D0 + timedelta(days=1)).date().isoformat()


# ------------------------------------------------------------------------------------------- helpers


def log_rows(n: int = 6, start: int = 0) -> dict[str, list]:
    """n valid events (one of each action/surface mix), as python lists keyed by column."""
    actions = ["save", "click", "closeup"]
    surfaces = ["homefeed", "related_pins", "search", "board"]
    rows: dict[str, list] = {c: [] for c in C.LOG_SCHEMA.names}
    for i in range(start, start + n):
        action = actions[i % 3]
        surface = surfaces[i % 4]
        rows["event_ts"].append(D0 + timedelta(minutes=10 * i))
        rows["user_id"].append(100 + i)
        rows["action"].append(action)
        rows["surface"].append(surface)
        rows["pin_id"].append(1000 + i)
        rows["board_id"].append(500 + i if action == "save" else None)
        rows["query_pin_id"].append(2000 + i if surface == "related_pins" else None)
    return rows


def log_table(rows: dict[str, list]) -> pa.Table:
    return pa.table({c: pa.array(rows[c], type=C.LOG_SCHEMA.field(c).type) for c in C.LOG_SCHEMA.names})


def day_dir(root: Path, day: str = DAY) -> Path:
    d = root / "engagement_logs" / f"dt={day}"
    d.mkdir(parents=True, exist_ok=True)
    return d


F32_LIST = pa.list_(pa.float32())


def pin_table(ids, vectors=None, titles=None, vec_type=F32_LIST) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "pin_id": pa.array(ids, pa.int64()),
            "title": pa.array(titles if titles is not None else [f"title {i}" for i in range(n)], pa.string()),
            "description": pa.array([f"desc {i}" for i in range(n)], pa.string()),
            "image_embedding": pa.array(vectors if vectors is not None else [[0.5, 1.5, 2.5]] * n, vec_type),
            "segment": pa.array(["organic"] * n, pa.string()),
        }
    )


def board_table(ids, names=None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "board_id": pa.array(ids, pa.int64()),
            "name": pa.array(names if names is not None else [f"board {i}" for i in range(n)], pa.string()),
            "description": pa.array([f"about {i}" for i in range(n)], pa.string()),
        }
    )


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def run_assets(assets, partition_key: str = DAY, raise_on_error: bool = True, config: dict | None = None):
    """Materialize in-process; ``config``: asset name -> its run config."""
    return dg.materialize(
        assets,
        partition_key=partition_key,
        resources={"storage": StorageResource.from_settings(Settings.from_env())},
        raise_on_error=raise_on_error,
        run_config={"ops": {name: {"config": c} for name, c in config.items()}} if config else None,
    )


def materialization_metadata(result, asset: str) -> dict:
    for event in result.get_asset_materialization_events():
        if event.asset_key == dg.AssetKey(asset):
            return {k: v.value for k, v in event.materialization.metadata.items()}
    raise AssertionError(f"no materialization of {asset}")


def failure_message(result) -> str:
    """The error text of a failed in-process run (message plus causes)."""
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            while err is not None:
                texts.append(err.message)
                err = err.cause
    return "\n".join(texts)


def validate_logs_table(tmp_path: Path, table: pa.Table, name: str = "part-0.parquet") -> C.ValidationResult:
    d = day_dir(tmp_path / "root")
    pq.write_table(table, d / name)
    return C.validate_engagement_logs(C.list_parquet_files(d), DAY, tmp_path / "root")


# ------------------------------------------------------------------------------- log bad-row kinds


def _break(rows: dict[str, list], i: int, kind: str) -> None:
    if kind.startswith("null_"):
        rows[kind[len("null_") :]][i] = None
    elif kind == "unknown_action":
        rows["action"][i] = "like"
    elif kind == "unknown_surface":
        rows["surface"][i] = "notifications"
    elif kind == "save_without_board_id":
        rows["action"][i] = "save"
        rows["board_id"][i] = None
    elif kind == "event_ts_outside_day:next_midnight":
        rows["event_ts"][i] = D0 + timedelta(days=1)  # the day is [D 00:00, D+1 00:00)
    elif kind == "event_ts_outside_day:just_before":
        rows["event_ts"][i] = D0 - timedelta(microseconds=1)
    elif kind == "event_ts_outside_day:far_future":
        rows["event_ts"][i] = datetime(2999, 1, 1, tzinfo=UTC)
    else:
        raise AssertionError(kind)


LOG_KINDS = [
    "null_event_ts",
    "null_user_id",
    "null_action",
    "null_surface",
    "null_pin_id",
    "unknown_action",
    "unknown_surface",
    "save_without_board_id",
    "event_ts_outside_day:next_midnight",
    "event_ts_outside_day:just_before",
    "event_ts_outside_day:far_future",
]


@pytest.mark.parametrize("kind", LOG_KINDS)
def test_each_bad_log_row_kind_is_quarantined_with_its_reason(tmp_path, kind):
    rows = log_rows(8)
    _break(rows, 3, kind)
    result = validate_logs_table(tmp_path, log_table(rows))
    reason = kind.split(":")[0]
    assert result.rows_read == 8
    assert result.rows_kept == 7
    assert result.rows_quarantined == 1
    assert result.reason_counts[reason] == 1
    assert sum(result.reason_counts.values()) == 1
    q = result.quarantine.to_pylist()[0]
    assert q["reason"] == reason
    assert q["source_row"] == 3
    assert q["source_file"] == f"engagement_logs/dt={DAY}/part-0.parquet"
    assert q["user_id"] == rows["user_id"][3]
    assert 103 not in result.valid.column("user_id").to_pylist() or kind == "null_user_id"
    assert result.valid.schema == C.LOG_SCHEMA


def test_boundaries_of_the_day_are_kept(tmp_path):
    rows = log_rows(2)
    rows["event_ts"][0] = D0
    rows["event_ts"][1] = D0 + timedelta(days=1) - timedelta(microseconds=1)
    result = validate_logs_table(tmp_path, log_table(rows))
    assert result.rows_kept == 2 and result.rows_quarantined == 0


def test_board_id_of_non_save_rows_is_ignored(tmp_path):
    rows = log_rows(3)  # rows 1, 2 are click/closeup with a null board_id
    rows["board_id"][1] = 77  # and a board_id on a click is not an error either
    result = validate_logs_table(tmp_path, log_table(rows))
    assert result.rows_kept == 3


def test_reason_precedence_is_the_first_failing_rule(tmp_path):
    rows = log_rows(4)
    rows["user_id"][0] = None
    rows["action"][0] = "like"  # null_user_id wins over unknown_action
    rows["action"][1] = "like"
    rows["event_ts"][1] = D0 - timedelta(days=3)  # unknown_action wins over event_ts_outside_day
    rows["surface"][2] = "nowhere"
    rows["action"][2] = "save"
    rows["board_id"][2] = None  # unknown_surface wins over save_without_board_id
    rows["event_ts"][3] = None
    rows["pin_id"][3] = None  # null_event_ts wins over null_pin_id (column order)
    result = validate_logs_table(tmp_path, log_table(rows))
    reasons = dict(
        zip(result.quarantine.column("source_row").to_pylist(), result.quarantine.column("reason").to_pylist())
    )
    assert reasons == {0: "null_user_id", 1: "unknown_action", 2: "unknown_surface", 3: "null_event_ts"}
    assert list(C.LOG_REASONS[:5]) == [f"null_{c}" for c in C.LOG_REQUIRED]


def test_accounting_is_exact_across_files_and_reasons(tmp_path):
    d = day_dir(tmp_path / "root")
    a = log_rows(50)
    for i, kind in enumerate(["null_user_id", "unknown_action", "unknown_action", "save_without_board_id"]):
        _break(a, 10 + i, kind)
    b = log_rows(31, start=50)
    _break(b, 30, "event_ts_outside_day:just_before")  # the very last row of the last file
    _break(b, 0, "null_pin_id")  # the very first row of a later file
    pq.write_table(log_table(a), d / "a.parquet")
    pq.write_table(log_table(b), d / "b.parquet")
    pq.write_table(log_table(log_rows(0)), d / "c.parquet")  # a zero-row file is valid
    result = C.validate_engagement_logs(C.list_parquet_files(d), DAY, tmp_path / "root")
    assert result.rows_read == 81
    assert (result.rows_kept, result.rows_quarantined) == (75, 6)
    assert {r: c for r, c in result.reason_counts.items() if c} == {
        "null_user_id": 1,
        "unknown_action": 2,
        "save_without_board_id": 1,
        "event_ts_outside_day": 1,
        "null_pin_id": 1,
    }
    q = result.quarantine
    assert q.column("source_file").to_pylist()[-2:] == [f"engagement_logs/dt={DAY}/b.parquet"] * 2
    assert q.column("source_row").to_pylist() == [10, 11, 12, 13, 0, 30]
    assert len(result.files) == 3
    # kept rows keep file-then-row order
    assert result.valid.column("user_id").to_pylist()[:10] == list(range(100, 110))


def test_accounting_error_is_raised_when_counts_disagree():
    schema = C.LOG_SCHEMA
    bad = C.ValidationResult(
        name="x",
        valid=schema.empty_table(),
        quarantine=C.LOG_QUARANTINE_SCHEMA.empty_table(),
        rows_read=1,
        files=[],
        reasons=C.LOG_REASONS,
        reason_counts={r: 0 for r in C.LOG_REASONS},
    )
    with pytest.raises(C.AccountingError):
        C.check_accounting(bad)


# -------------------------------------------------------------------------------- widenings


def test_accepted_widenings_are_normalised_to_the_warehouse_schema(tmp_path):
    d = day_dir(tmp_path / "root")
    base = D0 + timedelta(hours=1)
    # file a: int32/int16/uint32 ids, ns timestamps (floored to us), large_string and dictionary strings
    ns = int(base.timestamp()) * 1_000_000_000 + 1_999  # 1.999 us past the hour
    pq.write_table(
        pa.table(
            {
                "event_ts": pa.array([ns, ns], pa.timestamp("ns", tz="UTC")),
                "user_id": pa.array([1, 2], pa.int32()),
                "action": pa.array(["save", "click"], pa.large_string()),
                "surface": pa.array(["board", "related_pins"]).dictionary_encode(),
                "pin_id": pa.array([3, 4], pa.int16()),
                "board_id": pa.array([5, None], pa.uint32()),
                "query_pin_id": pa.array([None, 9], pa.int32()),
                "extra_column": pa.array(["ignored", "ignored"]),
            }
        ),
        d / "a.parquet",
    )
    # file b: tz-naive ms timestamps (read as UTC: 23:30 is inside the day), a zoned timestamp whose local
    # date is the next day but whose instant is inside D, no query_pin_id column, string_view text.
    late = int((D0 + timedelta(hours=23, minutes=30)).timestamp() * 1000)
    zoned = int((D0 + timedelta(hours=22)).timestamp())  # = D+1 03:00 at +05:00
    pq.write_table(
        pa.table(
            {
                "event_ts": pa.array([late], pa.timestamp("ms")),
                "user_id": pa.array([6], pa.int64()),
                "action": pa.array(["closeup"], pa.string_view()),
                "surface": pa.array(["search"]),
                "pin_id": pa.array([7], pa.uint8()),
                "board_id": pa.array([None], pa.null()),
            }
        ),
        d / "b.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "event_ts": pa.array([zoned], pa.timestamp("s", tz="+05:00")),
                "user_id": [8],
                "action": ["click"],
                "surface": ["homefeed"],
                "pin_id": [9],
            }
        ),
        d / "c.parquet",
    )
    result = C.validate_engagement_logs(C.list_parquet_files(d), DAY, tmp_path / "root")
    assert result.rows_quarantined == 0, result.quarantine.to_pylist()
    v = result.valid
    assert v.schema == C.LOG_SCHEMA
    assert v.column("user_id").to_pylist() == [1, 2, 6, 8]
    assert v.column("pin_id").to_pylist() == [3, 4, 7, 9]
    assert v.column("board_id").to_pylist() == [5, None, None, None]
    assert v.column("query_pin_id").to_pylist() == [None, 9, None, None]
    assert v.column("surface").to_pylist() == ["board", "related_pins", "search", "homefeed"]
    ts = v.column("event_ts").cast(pa.int64()).to_pylist()
    assert ts[0] == int(base.timestamp()) * 1_000_000 + 1
    assert ts[2] == late * 1000
    assert ts[3] == zoned * 1_000_000


def test_timestamp_too_large_for_microseconds_is_quarantined_not_a_crash(tmp_path):
    rows = log_rows(2)
    t = log_table(rows)
    secs = pa.array([int(D0.timestamp()) * 1000, 2**62], pa.timestamp("ms"))  # Parquet has no s unit
    t = t.set_column(0, "event_ts", secs)
    result = validate_logs_table(tmp_path, t)
    assert result.rows_kept == 1
    assert result.quarantine.column("reason").to_pylist() == ["event_ts_outside_day"]
    assert result.quarantine.column("event_ts").to_pylist() == [None]


@pytest.mark.parametrize(
    "column,array,type_text",
    [
        ("user_id", pa.array(["1"] * 2), "string"),
        ("pin_id", pa.array([1.0, 2.0]), "double"),
        ("pin_id", pa.array([1, 2], pa.uint64()), "uint64"),
        ("event_ts", pa.array(["2026-01-01T00:00:00"] * 2), "string"),
        ("event_ts", pa.array([1, 2], pa.int64()), "int64"),
        ("action", pa.array([b"save", b"click"], pa.binary()), "binary"),
        ("board_id", pa.array(["x", "y"]), "string"),
    ],
)
def test_type_that_is_not_an_accepted_widening_names_file_and_column(tmp_path, column, array, type_text):
    t = log_table(log_rows(2))
    t = t.set_column(t.schema.get_field_index(column), column, array)
    with pytest.raises(ContractError) as err:
        validate_logs_table(tmp_path, t, name="wrong-type.parquet")
    msg = str(err.value)
    assert "wrong-type.parquet" in msg and f"'{column}'" in msg and type_text in msg
    assert err.value.column == column


@pytest.mark.parametrize("column", C.LOG_REQUIRED)
def test_missing_required_log_column_names_file_and_column(tmp_path, column):
    t = log_table(log_rows(2)).drop_columns([column])
    with pytest.raises(ContractError) as err:
        validate_logs_table(tmp_path, t, name="no-col.parquet")
    assert "no-col.parquet" in str(err.value) and f"'{column}'" in str(err.value)
    assert "missing" in str(err.value)


def test_optional_board_id_column_absent_quarantines_the_saves(tmp_path):
    t = log_table(log_rows(6)).drop_columns(["board_id", "query_pin_id"])
    result = validate_logs_table(tmp_path, t)
    assert result.reason_counts["save_without_board_id"] == 2  # rows 0 and 3 are saves
    assert result.rows_kept == 4


# ------------------------------------------------------------------------ structurally unreadable


def _valid_file_bytes(tmp_path: Path) -> bytes:
    p = tmp_path / "scratch.parquet"
    pq.write_table(log_table(log_rows(200)), p)
    return p.read_bytes()


@pytest.mark.parametrize("kind", ["zero_bytes", "not_parquet", "truncated", "footer_only_cut"])
def test_unreadable_file_error_names_the_file(tmp_path, kind):
    d = day_dir(tmp_path / "root")
    pq.write_table(log_table(log_rows(3)), d / "a-good.parquet")
    bad = d / "b-broken.parquet"
    raw = _valid_file_bytes(tmp_path)
    bad.write_bytes(
        {
            "zero_bytes": b"",
            "not_parquet": b"event_ts,user_id\n2026-01-01,1\n",
            "truncated": raw[: len(raw) // 2],
            "footer_only_cut": raw[:-3],
        }[kind]
    )
    with pytest.raises(ContractError) as err:
        C.validate_engagement_logs(C.list_parquet_files(d), DAY, tmp_path / "root")
    assert str(bad) in str(err.value)
    if kind == "zero_bytes":
        assert "zero bytes" in str(err.value)


def test_corrupt_column_data_names_file_and_column(tmp_path):
    d = day_dir(tmp_path / "root")
    path = d / "corrupt.parquet"
    pq.write_table(log_table(log_rows(500)), path, compression="snappy")
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)  # user_id
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start + 20 : start + chunk.total_compressed_size - 4] = b"\xab" * (chunk.total_compressed_size - 24)
    path.write_bytes(bytes(raw))
    with pytest.raises(ContractError) as err:
        C.validate_engagement_logs([path], DAY, tmp_path / "root")
    assert str(path) in str(err.value) and "'user_id'" in str(err.value)


def test_asset_fails_naming_the_unreadable_file(data_root):
    d = day_dir(data_root)
    pq.write_table(log_table(log_rows(3)), d / "a.parquet")
    (d / "zero.parquet").write_bytes(b"")
    result = run_assets([engagement_logs], raise_on_error=False)
    assert not result.success
    msg = failure_message(result)
    assert "ContractError" in msg and str(d / "zero.parquet") in msg
    assert published_path(Settings.from_env().warehouse_dataset("engagement_logs"), DAY) is None


def test_asset_fails_naming_file_and_missing_column(data_root):
    d = day_dir(data_root)
    pq.write_table(log_table(log_rows(3)).drop_columns(["surface"]), d / "nosurface.parquet")
    result = run_assets([engagement_logs], raise_on_error=False)
    assert not result.success
    msg = failure_message(result)
    assert "nosurface.parquet" in msg and "'surface'" in msg


def test_missing_data_root_is_an_error_not_an_empty_partition(omnisage_env, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(tmp_path / "does-not-exist"))
    for asset in (engagement_logs, entity_metadata):
        result = run_assets([asset], raise_on_error=False)
        assert not result.success
        assert "does-not-exist" in failure_message(result)
    settings = Settings.from_env()
    assert published_path(settings.warehouse_dataset("engagement_logs"), DAY) is None
    assert published_path(settings.warehouse_dataset("entity_metadata"), DAY) is None


# ------------------------------------------------------------------------------ engagement_logs asset


def test_missing_day_folder_with_allow_missing_day_publishes_an_empty_typed_partition(data_root):
    (data_root / "engagement_logs").mkdir()
    result = run_assets(
        [engagement_logs], partition_key=NEXT_DAY, config={"engagement_logs": {"allow_missing_day": True}}
    )
    meta = materialization_metadata(result, "engagement_logs")
    assert (meta["rows_read"], meta["rows_kept"], meta["rows_quarantined"], meta["files_read"]) == (
        0,
        0,
        0,
        0,
    )
    assert meta["day_folder_present"] is False
    settings = Settings.from_env()
    valid = pq.read_table(published_path(settings.warehouse_dataset("engagement_logs"), NEXT_DAY))
    quarantine = pq.read_table(published_path(settings.quarantine_dataset("engagement_logs"), NEXT_DAY))
    assert valid.num_rows == 0 and valid.schema == C.LOG_SCHEMA
    assert quarantine.num_rows == 0 and quarantine.schema == C.LOG_QUARANTINE_SCHEMA


def test_engagement_logs_asset_publishes_valid_and_quarantine_with_exact_counts(data_root):
    d = day_dir(data_root)
    a = log_rows(20)
    _break(a, 5, "unknown_surface")
    _break(a, 19, "null_action")
    pq.write_table(log_table(a), d / "part-1.parquet")
    b = log_rows(10, start=20)
    _break(b, 0, "event_ts_outside_day:next_midnight")
    pq.write_table(log_table(b), d / "part-0.parquet")
    (d / "_SUCCESS").write_bytes(b"")  # writer's marker files are not data
    (d / ".part-0.parquet.crc").write_bytes(b"junk")
    result = run_assets([engagement_logs])
    meta = materialization_metadata(result, "engagement_logs")
    assert meta["rows_read"] == 30
    assert meta["rows_kept"] == 27
    assert meta["rows_quarantined"] == 3
    assert meta["rows_read"] == meta["rows_kept"] + meta["rows_quarantined"]
    assert meta["quarantined.unknown_surface"] == 1
    assert meta["quarantined.null_action"] == 1
    assert meta["quarantined.event_ts_outside_day"] == 1
    assert meta["quarantined.null_user_id"] == 0
    assert meta["files"] == [
        f"engagement_logs/dt={DAY}/part-0.parquet",
        f"engagement_logs/dt={DAY}/part-1.parquet",
    ]
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    check = checks["rows_accounted"]
    assert check.passed and check.metadata["rows_published"].value == 30
    assert checks["quarantine_share"].passed  # 3 of 30 quarantined: 0.1 <= 0.2
    settings = Settings.from_env()
    valid = pq.read_table(published_path(settings.warehouse_dataset("engagement_logs"), DAY))
    quarantine = pq.read_table(published_path(settings.quarantine_dataset("engagement_logs"), DAY))
    assert valid.schema == C.LOG_SCHEMA and valid.num_rows == 27
    assert quarantine.num_rows == 3
    assert sorted(quarantine.column("reason").to_pylist()) == [
        "event_ts_outside_day",
        "null_action",
        "unknown_surface",
    ]
    # part-0 is read first (file-name order)
    assert valid.column("user_id").to_pylist()[:3] == [121, 122, 123]
    # a re-run of the same input gives the same rows
    run_assets([engagement_logs])
    assert pq.read_table(published_path(settings.warehouse_dataset("engagement_logs"), DAY)).equals(valid)


# ------------------------------------------------------------------------------- entity metadata


def validate_pins_tables(tmp_path: Path, tables: dict[str, pa.Table]) -> C.ValidationResult:
    d = tmp_path / "root" / "pins"
    d.mkdir(parents=True, exist_ok=True)
    for name, t in tables.items():
        pq.write_table(t, d / name)
    return C.validate_pins(C.list_parquet_files(d), tmp_path / "root")


NAN, INF = float("nan"), float("inf")
PIN_KINDS = {
    "null_pin_id": {"ids": [None]},
    "nan": {"vectors": [[0.1, NAN, 0.3]]},
    "pos_inf": {"vectors": [[INF, 0.2, 0.3]]},
    "neg_inf": {"vectors": [[0.1, 0.2, -INF]]},
    "null_element": {"vectors": [[0.1, None, 0.3]]},
    "float64_overflows_float32": {"vectors": [[1e300, 0.2, 0.3]], "f64": True},
    "too_short": {"vectors": [[0.1, 0.2]]},
    "too_long": {"vectors": [[0.1, 0.2, 0.3, 0.4]]},
    "empty_vector": {"vectors": [[]]},
    "invalid_utf8_title": {"titles": [b"caf\xe9 au lait"]},
    "text_too_long_title": {"titles": ["x" * (C.MAX_TEXT_BYTES + 1)]},
}
PIN_REASON = {
    "null_pin_id": "null_pin_id",
    "too_short": "wrong_length_image_embedding",
    "too_long": "wrong_length_image_embedding",
    "empty_vector": "wrong_length_image_embedding",
    "invalid_utf8_title": "invalid_utf8_title",
    "text_too_long_title": "text_too_long_title",
}


@pytest.mark.parametrize("kind", list(PIN_KINDS))
def test_each_bad_pin_kind_is_quarantined_with_its_reason(tmp_path, kind):
    spec = PIN_KINDS[kind]
    vec_type = pa.list_(pa.float64()) if spec.get("f64") else pa.list_(pa.float32())
    good = pin_table([1, 2, 3, 4], vec_type=vec_type)
    ids = spec.get("ids", [99])
    vectors = spec.get("vectors", [[0.5, 1.5, 2.5]])
    if "titles" in spec:
        raw = spec["titles"][0]
        title = pa.array([raw], pa.binary()).view(pa.string()) if isinstance(raw, bytes) else pa.array([raw])
    else:
        title = pa.array(["t"])
    bad = pin_table(ids, vectors=vectors, vec_type=vec_type).set_column(1, "title", title)
    result = validate_pins_tables(tmp_path, {"a.parquet": pa.concat_tables([good.slice(0, 2), bad, good.slice(2)])})
    reason = PIN_REASON.get(kind, "nonfinite_image_embedding")
    assert (result.rows_read, result.rows_kept, result.rows_quarantined) == (5, 4, 1)
    assert result.reason_counts[reason] == 1
    (q,) = result.quarantine.to_pylist()
    assert q["reason"] == reason and q["source_row"] == 2 and q["source_file"] == "pins/a.parquet"
    assert result.valid.column("pin_id").to_pylist() == [1, 2, 3, 4]
    assert result.valid.schema == C.PIN_SCHEMA
    assert result.extra["image_dim"] == 3
    if kind == "invalid_utf8_title":
        assert q["title"] == "caf\ufffd au lait"  # stored readable in the quarantine


def test_duplicate_ids_keep_the_last_row_in_file_name_then_row_order(tmp_path):
    # written in the opposite order of their names: the name decides, not the write time
    b = pin_table([7, 8, 7], titles=["b0", "b1", "b2"])
    a = pin_table([7, 9, 7], titles=["a0", "a1", "a2"])
    result = validate_pins_tables(tmp_path, {"b.parquet": b, "a.parquet": a})
    kept = dict(zip(result.valid.column("pin_id").to_pylist(), result.valid.column("title").to_pylist()))
    assert kept == {7: "b2", 8: "b1", 9: "a1"}
    q = result.quarantine
    assert q.column("reason").to_pylist() == ["duplicate_pin_id"] * 3
    assert list(zip(q.column("source_file").to_pylist(), q.column("source_row").to_pylist())) == [
        ("pins/a.parquet", 0),
        ("pins/a.parquet", 2),
        ("pins/b.parquet", 0),
    ]
    assert result.rows_read == result.rows_kept + result.rows_quarantined == 6


def test_a_bad_last_duplicate_does_not_erase_the_valid_earlier_row(tmp_path):
    t = pin_table([5, 5], vectors=[[1.0, 2.0, 3.0], [NAN, 2.0, 3.0]], titles=["good", "corrupt"])
    result = validate_pins_tables(tmp_path, {"a.parquet": t, "b.parquet": pin_table([6])})
    assert result.valid.column("title").to_pylist()[0] == "good"
    assert result.quarantine.column("reason").to_pylist() == ["nonfinite_image_embedding"]


def test_vector_length_is_the_most_common_length():
    vectors = pa.array([[1.0] * 4, [1.0] * 4, [1.0] * 2, None, [], [1.0] * 2, [1.0] * 4], pa.list_(pa.float32()))
    assert C.vector_length(vectors) == 4
    assert C.vector_length(pa.array([[1.0] * 3, [1.0] * 2], pa.list_(pa.float32()))) == 2  # tie: shorter
    assert C.vector_length(pa.array([None, []], pa.list_(pa.float32()))) == 0


def test_float64_and_fixed_size_vectors_are_stored_as_float32(tmp_path):
    a = pin_table([1, 2], vectors=[[0.25, 0.5], [1.0, 2.0]], vec_type=pa.list_(pa.float64(), 2))
    result = validate_pins_tables(tmp_path, {"a.parquet": a})
    assert result.valid.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert result.valid.column("image_embedding").to_pylist() == [[0.25, 0.5], [1.0, 2.0]]
    assert result.extra["image_dim"] == 2


def test_data_set_without_image_vectors_is_valid(tmp_path):
    absent = pin_table([1, 2]).drop_columns(["image_embedding", "segment"])
    all_null = pin_table([3, 4], vectors=[None, None])
    null_typed = pin_table([5]).set_column(3, "image_embedding", pa.nulls(1))
    result = validate_pins_tables(tmp_path, {"a.parquet": absent, "b.parquet": all_null, "c.parquet": null_typed})
    assert result.rows_kept == 5 and result.rows_quarantined == 0
    assert result.extra["image_dim"] == 0
    assert result.valid.schema == C.PIN_SCHEMA
    assert result.valid.column("image_embedding").null_count == 5


def test_bad_board_rows_are_quarantined(tmp_path):
    d = tmp_path / "root" / "boards"
    d.mkdir(parents=True)
    names = pa.array([b"ok", b"\xff\xfe", b"fine", b"dup", b"last"], pa.binary()).view(pa.string())
    t = board_table([1, 2, None, 4, 4]).set_column(1, "name", names)
    pq.write_table(t, d / "b.parquet")
    result = C.validate_boards(C.list_parquet_files(d), tmp_path / "root")
    assert result.valid.column("board_id").to_pylist() == [1, 4]
    assert result.valid.column("name").to_pylist() == ["ok", "last"]
    assert result.quarantine.column("reason").to_pylist() == [
        "invalid_utf8_name",
        "null_board_id",
        "duplicate_board_id",
    ]
    assert result.valid.schema == C.BOARD_SCHEMA


def test_missing_pin_id_column_names_file_and_column(tmp_path):
    with pytest.raises(ContractError) as err:
        validate_pins_tables(tmp_path, {"p.parquet": pin_table([1]).drop_columns(["pin_id"])})
    assert "p.parquet" in str(err.value) and "'pin_id'" in str(err.value)


def test_wrong_vector_type_names_file_and_column(tmp_path):
    t = pin_table([1]).set_column(3, "image_embedding", pa.array([["a", "b"]]))
    with pytest.raises(ContractError) as err:
        validate_pins_tables(tmp_path, {"p.parquet": t})
    assert "p.parquet" in str(err.value) and "'image_embedding'" in str(err.value)


def test_entity_metadata_asset_layout_counts_and_check(data_root):
    (data_root / "pins").mkdir()
    (data_root / "boards").mkdir()
    pq.write_table(
        pin_table([1, 2, 2, None], vectors=[[1.0, 2.0, 3.0]] * 4, vec_type=pa.list_(pa.float64())),
        data_root / "pins" / "p0.parquet",
    )
    pq.write_table(pin_table([3], vectors=[[INF, 0.0, 0.0]]), data_root / "pins" / "p1.parquet")
    pq.write_table(board_table([10, 11, 10]), data_root / "boards" / "b0.parquet")
    result = run_assets([entity_metadata])
    meta = materialization_metadata(result, "entity_metadata")
    assert (meta["pins.rows_read"], meta["pins.rows_kept"], meta["pins.rows_quarantined"]) == (5, 2, 3)
    assert meta["pins.quarantined.duplicate_pin_id"] == 1
    assert meta["pins.quarantined.null_pin_id"] == 1
    assert meta["pins.quarantined.nonfinite_image_embedding"] == 1
    assert (meta["boards.rows_read"], meta["boards.rows_kept"], meta["boards.rows_quarantined"]) == (3, 2, 1)
    assert meta["rows_read"] == meta["rows_kept"] + meta["rows_quarantined"] == 8
    assert meta["image_dim"] == 3
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert set(checks) == {"rows_accounted", "no_empty_replacement"}
    check = checks["rows_accounted"]
    assert check.passed and check.metadata["rows_published"].value == 8 and checks["no_empty_replacement"].passed
    settings = Settings.from_env()
    out = published_path(settings.warehouse_dataset("entity_metadata"), DAY)
    pins = pq.read_table(out / "pins")
    assert pins.schema == C.PIN_SCHEMA and pins.column("pin_id").to_pylist() == [1, 2]
    assert pq.read_table(out / "boards").schema == C.BOARD_SCHEMA
    qdir = published_path(settings.quarantine_dataset("entity_metadata"), DAY)
    assert pq.read_table(qdir / "pins").num_rows == 3
    assert pq.read_table(qdir / "boards").column("reason").to_pylist() == ["duplicate_board_id"]


# ----------------------------------------------------------------------------------- UTF-8 checker


def test_utf8_checker_agrees_with_python_decoder():
    rng = np.random.default_rng(7)
    # ASCII, continuation bytes, every lead-byte class and the boundary bytes of the special second-byte ranges
    alphabet = np.frombuffer(b"\x41\x7f\x80\xbf\xc0\xc2\xdf\xe0\xa0\xed\x9f\xef\xf0\x90\xf4\x8f\xf5\xff", np.uint8)
    values = [bytes(rng.choice(alphabet, size=rng.integers(0, 6))) for _ in range(4000)]
    values += [
        "é".encode(),
        "€".encode(),
        "😀".encode(),
        b"\xed\xa0\x80",
        b"\xe0\x80\x80",
        b"\xf4\x90\x80\x80",
        b"\xc3",
    ]
    values.append(None)
    expected = []
    for v in values:
        try:
            v is None or v.decode("utf-8")
            expected.append(False)
        except UnicodeDecodeError:
            expected.append(True)
    arr = pa.array(values, pa.binary()).view(pa.string())
    assert sum(expected) > 500
    assert C.invalid_utf8_rows(arr).tolist() == expected
    # a sliced chunk and a multi-chunk column give the same answer
    chunked = pa.chunked_array([arr.slice(0, 1000), arr.slice(1000)])
    assert C.invalid_utf8_rows(chunked).tolist() == expected
    assert C.invalid_utf8_rows(arr.slice(3, 50)).tolist() == expected[3:53]


def test_log_with_non_utf8_or_huge_action_is_unknown_action(tmp_path):
    rows = log_rows(4)
    t = log_table(rows)
    action = pa.array([b"save", b"cl\xffick", b"x" * (2 * C.MAX_TEXT_BYTES), b"closeup"], pa.binary()).view(pa.string())
    t = t.set_column(2, "action", action)
    result = validate_logs_table(tmp_path, t)
    assert result.quarantine.column("reason").to_pylist() == ["unknown_action", "unknown_action"]
    assert result.quarantine.column("action").to_pylist()[0] == "cl\ufffdick"
