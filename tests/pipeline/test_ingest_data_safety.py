"""Data safety of ingest: a lost input never replaces a published day, and a hostile file costs a bounded
amount of memory (an over-long text value is cut in the quarantine; a compression bomb is refused, naming
file and column)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_ingest import (
    DAY,
    NEXT_DAY,
    _break,
    board_table,
    day_dir,
    failure_message,
    log_rows,
    log_table,
    materialization_metadata,
    pin_table,
    run_assets,
)

from assets.ingest import engagement_logs, entity_metadata
from omnisage_pipeline.contract import reading
from omnisage_pipeline.contract import validation as C
from omnisage_pipeline.contract.text import CUT_TEXT_BYTES, MAX_TEXT_BYTES, utf8_prefix
from omnisage_pipeline.contract.validation import ContractError
from omnisage_pipeline.settings import Settings
from omnisage_pipeline.storage.publish import published_path

MiB = 1 << 20


@pytest.fixture
def data_root(omnisage_env, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("OMNISAGE_DATA_ROOT", str(root))
    return root


def _checks(result) -> dict:
    return {c.check_name: c for c in result.get_asset_check_evaluations()}


# ------------------------------------------------------------------------------ a lost day folder


def test_missing_day_folder_fails_naming_the_path_and_publishes_nothing(data_root):
    (data_root / "engagement_logs").mkdir()
    result = run_assets([engagement_logs], partition_key=NEXT_DAY, raise_on_error=False)
    assert not result.success
    missing = data_root / "engagement_logs" / f"dt={NEXT_DAY}"
    assert f"{missing} does not exist" in failure_message(result)
    settings = Settings.from_env()
    assert published_path(settings.warehouse_dataset("engagement_logs"), NEXT_DAY) is None
    assert published_path(settings.quarantine_dataset("engagement_logs"), NEXT_DAY) is None


def _published_logs(settings) -> tuple[Path, Path, pa.Table]:
    valid_dir = published_path(settings.warehouse_dataset("engagement_logs"), DAY)
    quarantine_dir = published_path(settings.quarantine_dataset("engagement_logs"), DAY)
    return valid_dir, quarantine_dir, pq.read_table(valid_dir)


def test_a_lost_day_folder_never_replaces_the_published_day(data_root):
    d = day_dir(data_root)
    rows = log_rows(12)
    _break(rows, 4, "unknown_surface")
    pq.write_table(log_table(rows), d / "part-0.parquet")
    run_assets([engagement_logs])
    settings = Settings.from_env()
    valid_dir, quarantine_dir, valid = _published_logs(settings)
    assert valid.num_rows == 11

    for p in d.iterdir():
        p.unlink()
    d.rmdir()  # the day is not delivered this time
    for _ in range(2):  # one previous version is kept: a second bad run must not delete the good one either
        result = run_assets([engagement_logs], raise_on_error=False)
        assert not result.success
        assert f"{d} does not exist" in failure_message(result)
        assert _published_logs(settings)[:2] == (valid_dir, quarantine_dir)
        assert pq.read_table(valid_dir).equals(valid) and pq.read_table(quarantine_dir).num_rows == 1
    # allow_missing_day publishes an empty day, but never over one that has rows
    result = run_assets(
        [engagement_logs], raise_on_error=False, config={"engagement_logs": {"allow_missing_day": True}}
    )
    assert not result.success and not _checks(result)["no_empty_replacement"].passed
    assert _published_logs(settings)[:2] == (valid_dir, quarantine_dir)


def test_an_empty_day_folder_does_not_replace_a_published_day_unless_allowed(data_root):
    d = day_dir(data_root)
    pq.write_table(log_table(log_rows(6)), d / "part-0.parquet")
    run_assets([engagement_logs])
    settings = Settings.from_env()
    before = _published_logs(settings)
    (d / "part-0.parquet").unlink()  # the folder exists and is empty
    for config in (None, {"engagement_logs": {"allow_missing_day": True}}):
        result = run_assets([engagement_logs], raise_on_error=False, config=config)
        assert not result.success
        (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "no_empty_replacement"]
        assert not check.passed and check.metadata["published_rows"].value == {"": 6}
        assert "no_empty_replacement failed" in failure_message(result)
        after = _published_logs(settings)
        assert after[:2] == before[:2] and after[2].equals(before[2])  # valid and quarantine both kept

    result = run_assets([engagement_logs], config={"engagement_logs": {"allow_empty_replacement": True}})
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()}["no_empty_replacement"]
    assert pq.read_table(published_path(settings.warehouse_dataset("engagement_logs"), DAY)).num_rows == 0


def _published_metadata(settings) -> tuple[Path, Path, pa.Table]:
    valid_dir = published_path(settings.warehouse_dataset("entity_metadata"), DAY)
    quarantine_dir = published_path(settings.quarantine_dataset("entity_metadata"), DAY)
    return valid_dir, quarantine_dir, pq.read_table(valid_dir / "pins")


def test_a_lost_pins_folder_does_not_empty_the_published_catalogue_unless_allowed(data_root):
    (data_root / "pins").mkdir()
    (data_root / "boards").mkdir()
    pq.write_table(pin_table([1, 2, 3]), data_root / "pins" / "p0.parquet")
    pq.write_table(board_table([10, 11]), data_root / "boards" / "b0.parquet")
    run_assets([entity_metadata])
    settings = Settings.from_env()
    before = _published_metadata(settings)

    for p in (data_root / "pins").iterdir():
        p.unlink()
    (data_root / "pins").rmdir()  # a missing pins/ folder is still an empty pins table (contract) ...
    for reuse in (True, False):
        config = {"entity_metadata": {"reuse_identical_versions": reuse}}
        result = run_assets([entity_metadata], raise_on_error=False, config=config)
        assert not result.success  # ... but it does not replace a published day whose pins have rows
        check = _checks(result)["no_empty_replacement"]
        assert not check.passed and check.metadata["emptied_tables"].value == ["pins"]
        assert "no_empty_replacement failed" in failure_message(result)
        after = _published_metadata(settings)
        assert after[:2] == before[:2] and after[2].equals(before[2])

    result = run_assets([entity_metadata], config={"entity_metadata": {"allow_empty_replacement": True}})
    meta = materialization_metadata(result, "entity_metadata")
    assert meta["pins_folder_present"] is False and meta["pins.rows_read"] == 0 and meta["boards.rows_kept"] == 2
    assert pq.read_table(published_path(settings.warehouse_dataset("entity_metadata"), DAY) / "pins").num_rows == 0


def test_an_empty_day_is_published_when_nothing_was_published_before(data_root):
    day_dir(data_root, NEXT_DAY)  # delivered, and empty
    result = run_assets([engagement_logs], partition_key=NEXT_DAY)
    assert all(c.passed for c in result.get_asset_check_evaluations())
    assert materialization_metadata(result, "engagement_logs")["day_folder_present"] is True
    valid_ds = Settings.from_env().warehouse_dataset("engagement_logs")
    assert pq.read_table(published_path(valid_ds, NEXT_DAY)).num_rows == 0


# --------------------------------------------------------------------- bounded memory on bad input


def _repeated_titles(n: int, nbytes: int) -> pa.Table:
    """n pins sharing one title of nbytes bytes: dictionary-encoded, the file holds it once."""
    title = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array(["t" * nbytes]))
    return pin_table(list(range(n))).set_column(1, "title", title)


def _write_pins(tmp_path: Path, table: pa.Table, **kw) -> Path:
    d = tmp_path / "root" / "pins"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, d / "p.parquet", compression="zstd", **kw)
    return d / "p.parquet"


def test_100_titles_of_2_mib_give_a_small_quarantine_with_their_lengths(tmp_path):
    path = _write_pins(tmp_path, _repeated_titles(100, 2 * MiB))
    assert path.stat().st_size < 64 * 1024  # a tiny file that decodes to 200 MiB
    result = C.validate_pins([path], tmp_path / "root")
    q = result.quarantine
    assert (result.rows_kept, result.rows_quarantined) == (0, 100)
    assert set(q.column("reason").to_pylist()) == {"text_too_long_title"}
    assert q.nbytes < 2 * MiB and result.valid.nbytes < MiB
    assert q.column("original_bytes").to_pylist() == [[("title", 2 * MiB)]] * 100
    assert {len(t) for t in q.column("title").to_pylist()} == {CUT_TEXT_BYTES}
    assert q.column("description").to_pylist()[0] == "desc 0"  # the rest of the row is kept as it was


def test_a_cut_value_is_judged_whole_and_cut_at_a_character_boundary(tmp_path):
    titles = pa.array(
        [
            ("a" + "é" * MAX_TEXT_BYTES).encode(),  # valid, too long: cut inside an é -> before it
            b"x" * MAX_TEXT_BYTES + b"\xff",  # invalid only after the first KiB: still invalid_utf8
            "é".encode() * (MAX_TEXT_BYTES // 2),  # exactly MAX_TEXT_BYTES: kept whole
        ],
        pa.binary(),
    ).view(pa.string())
    path = _write_pins(tmp_path, pin_table([1, 2, 3]).set_column(1, "title", titles), use_dictionary=False)
    result = C.validate_pins([path], tmp_path / "root")
    assert result.valid.column("pin_id").to_pylist() == [3]
    assert len(result.valid.column("title")[0].as_py().encode()) == MAX_TEXT_BYTES
    q = {r["pin_id"]: r for r in result.quarantine.to_pylist()}
    assert q[1]["reason"] == "text_too_long_title" and q[1]["title"] == "a" + "é" * ((CUT_TEXT_BYTES - 1) // 2)
    assert q[1]["original_bytes"] == [("title", 1 + 2 * MAX_TEXT_BYTES)]
    assert q[2]["reason"] == "invalid_utf8_title" and q[2]["title"] == "x" * CUT_TEXT_BYTES
    assert q[2]["original_bytes"] == [("title", MAX_TEXT_BYTES + 1)]
    assert result.quarantine.column("original_bytes").null_count == 0


def test_utf8_prefix_never_splits_a_character():
    for text in ("a" * 2000, "é" * 2000, "a€" * 700, "😀" * 600, "a😀" * 500):
        for limit in range(1016, 1025):
            head = utf8_prefix(text.encode(), limit)
            assert len(head) <= limit and text.encode().startswith(head) and len(head) > limit - 4
            head.decode("utf-8")  # whole characters only
    assert utf8_prefix(b"\xff" * 10, 4) == b"\xff" * 4  # invalid bytes stay as they are


@pytest.fixture
def small_budget(monkeypatch):
    monkeypatch.setattr(reading, "MIN_DECODED_BYTES", 4 * MiB)
    monkeypatch.setattr(reading, "DECODED_BYTES_PER_FILE_BYTE", 2)


def test_a_text_compression_bomb_is_refused_naming_file_and_column(tmp_path, small_budget):
    # 100 KiB titles are valid; 400 of them from one dictionary entry decode to 40 MiB > the 4 MiB budget.
    path = _write_pins(tmp_path, _repeated_titles(400, 100 * 1024))
    with pytest.raises(ContractError) as err:
        C.validate_pins([path], tmp_path / "root")
    assert str(path) in str(err.value) and err.value.column == "title" and "decodes to more than" in str(err.value)
    # within the budget the same kind of file is read as usual
    C.validate_pins([_write_pins(tmp_path, _repeated_titles(20, 100 * 1024))], tmp_path / "root")


def test_a_row_count_bomb_is_refused_from_the_footer(tmp_path, small_budget):
    # 1M equal ids: a few KiB on disk, 8 MiB decoded -> refused before any page is decoded.
    path = _write_pins(tmp_path, pa.table({"pin_id": pa.array(np.full(1 << 20, 7, np.int64))}))
    with pytest.raises(ContractError) as err:
        C.validate_pins([path], tmp_path / "root")
    assert str(path) in str(err.value) and err.value.column == "pin_id"


def test_huge_log_text_is_cut_in_the_published_quarantine(data_root):
    rows = log_rows(4)
    t = log_table(rows)
    surface = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0, 0], pa.int32()), pa.array(["search", "s" * 3 * MiB]))
    pq.write_table(t.set_column(3, "surface", surface), day_dir(data_root) / "a.parquet")
    result = run_assets([engagement_logs], config={"engagement_logs": {"max_quarantine_fraction": 1.0}})
    assert result.success
    qdir = published_path(Settings.from_env().quarantine_dataset("engagement_logs"), DAY)
    q = pq.read_table(qdir)
    assert q.column("reason").to_pylist() == ["unknown_surface"]
    assert q.column("original_bytes").to_pylist() == [[("surface", 3 * MiB)]]
    assert len(q.column("surface")[0].as_py()) == CUT_TEXT_BYTES
