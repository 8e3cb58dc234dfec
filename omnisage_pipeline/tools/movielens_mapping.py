"""MovieLens-100k -> contract rows: movies as pins, per-genre boards, one engagement event per rating, and
the time line that compresses the ratings into daily partitions (``omnisage_pipeline.tools.movielens`` gives
the reasons for each choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pyarrow as pa

from omnisage_pipeline.contract.validation import BOARD_SCHEMA, LOG_SCHEMA, PIN_SCHEMA, TS_TYPE
from omnisage_pipeline.tools.movielens_sources import GENRES, MovieLensError, RawMovieLens
from omnisage_pipeline.tools.synthetic_universe import BOARD_ID_BASE, PIN_ID_BASE, USER_ID_BASE

BOARD_USER_STRIDE = 100  # board_id = BOARD_ID_BASE + 100 * user_id + genre index
SAVE_MIN_RATING = 4
DEFAULT_HELDOUT_DAYS = 28


def validate_raw(raw: RawMovieLens) -> None:
    """The checks a conversion relies on; a broken source is named, never converted into a wrong graph."""
    src = raw.source
    if raw.user.size == 0:
        raise MovieLensError(f"{src}: no ratings")
    if len(raw.title) != raw.movie_id.size or raw.genre_flags.shape != (raw.movie_id.size, len(GENRES)):
        raise MovieLensError(f"{src}: the item table's columns have different lengths")
    if raw.rating.min() < 1 or raw.rating.max() > 5:
        raise MovieLensError(f"{src}: ratings must be 1..5, found {raw.rating.min()}..{raw.rating.max()}")
    if raw.ts.min() <= 0:
        raise MovieLensError(f"{src}: timestamps must be positive unix seconds")
    # ids stay inside the generator's disjoint ranges (pins < boards < users), boards included
    if raw.user.min() < 0 or raw.user.max() >= (USER_ID_BASE - BOARD_ID_BASE) // BOARD_USER_STRIDE:
        raise MovieLensError(f"{src}: user ids must be in [0, {(USER_ID_BASE - BOARD_ID_BASE) // BOARD_USER_STRIDE})")
    if raw.movie_id.min() < 0 or raw.movie_id.max() >= BOARD_ID_BASE - PIN_ID_BASE:
        raise MovieLensError(f"{src}: item ids must be in [0, {BOARD_ID_BASE - PIN_ID_BASE})")
    if np.unique(raw.movie_id).size != raw.movie_id.size:
        raise MovieLensError(f"{src}: the item table repeats a movie id")
    unknown = np.setdiff1d(raw.movie, raw.movie_id)
    if unknown.size:
        raise MovieLensError(
            f"{src}: ratings of {unknown.size} movie(s) missing from the item table, e.g. {unknown[:5]}"
        )
    pairs = raw.user * (int(raw.movie.max()) + 1) + raw.movie
    if np.unique(pairs).size != pairs.size:
        raise MovieLensError(f"{src}: a user rates the same movie twice")


def board_genre(genre_flags: np.ndarray) -> np.ndarray:
    """Each movie's most specific genre: the one with the fewest movies in the catalogue (ties: GroupLens
    order); a movie without any genre flag goes on 'unknown' (index 0)."""
    counts = genre_flags.sum(axis=0)
    cost = np.where(genre_flags, counts[None, :], np.iinfo(np.int64).max)
    return np.where(genre_flags.any(axis=1), cost.argmin(axis=1), 0)


def board_id(user: np.ndarray, genre: np.ndarray) -> np.ndarray:
    """The board of (user, genre): deterministic and readable back (``BOARD_USER_STRIDE``)."""
    return BOARD_ID_BASE + BOARD_USER_STRIDE * np.asarray(user, np.int64) + np.asarray(genre, np.int64)


@dataclass
class Timeline:
    """Real unix seconds -> contract microseconds: linear (order-preserving) compression of [t_first, t_last]
    onto ``days`` days from ``start``, or the identity in real time (``days`` None)."""

    t_first: int
    t_last: int
    start: date
    days: int | None

    def to_us(self, ts: np.ndarray) -> np.ndarray:
        ts = np.asarray(ts, dtype=np.int64)
        if self.days is None:
            return ts * 1_000_000
        start_us = (
            int((datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)).timestamp()) * 1_000_000
        )
        scale = self.days * 86_400e6 / (self.t_last - self.t_first + 1)  # < 1 day per (span + 1 s): stays inside
        return start_us + np.floor((ts - self.t_first) * scale).astype(np.int64)

    def partitions(self) -> tuple[str, str, int]:
        """(first day, last day, days) of the written logs' partitions."""
        first, last = (day_of_us(int(x)) for x in self.to_us(np.array([self.t_first, self.t_last])))
        return first.isoformat(), last.isoformat(), (last - first).days + 1


def day_of_us(us: int) -> date:
    """The UTC day of a contract timestamp (microseconds since the epoch)."""
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).date()


def time_order(raw: RawMovieLens) -> np.ndarray:
    """Rating indices grouped by user, each user's in time order; equal times keep the source row order."""
    return np.lexsort((np.arange(raw.user.size), raw.ts, raw.user))


@dataclass
class Events:
    """Every rating as one engagement, in ``time_order``: ids already in the contract's id spaces."""

    user: np.ndarray
    pin: np.ndarray
    query_pin: np.ndarray  # -1: the user's first rating
    rating: np.ndarray
    ts: np.ndarray  # real unix seconds
    board: np.ndarray  # -1: not a save
    test: np.ndarray  # bool: in the held-out last weeks


def build_events(raw: RawMovieLens, heldout_days: int = DEFAULT_HELDOUT_DAYS) -> Events:
    """The mapping of the module docstring, before any time compression."""
    order = time_order(raw)
    user, movie, rating, ts = raw.user[order], raw.movie[order], raw.rating[order], raw.ts[order]
    first = np.ones(user.size, dtype=bool)
    first[1:] = user[1:] != user[:-1]
    prev = np.roll(movie, 1)
    genre_of = dict(zip(raw.movie_id.tolist(), board_genre(raw.genre_flags).tolist()))
    genre = np.fromiter((genre_of[m] for m in movie.tolist()), dtype=np.int64, count=movie.size)
    save = rating >= SAVE_MIN_RATING
    cutoff = int(ts.max()) - heldout_days * 86_400
    return Events(
        user=USER_ID_BASE + user,
        pin=PIN_ID_BASE + movie,
        query_pin=np.where(first, -1, PIN_ID_BASE + prev),
        rating=rating,
        ts=ts,
        board=np.where(save, board_id(user, genre), -1),
        test=ts > cutoff,
    )


def log_table(ev: Events, rows: np.ndarray, timeline: Timeline, unlinked: np.ndarray | None = None) -> pa.Table:
    """Contract log rows (LOG_SCHEMA) for ``ev[rows]``, sorted by event time (stable: the time order of
    ``build_events`` breaks ties). ``unlinked`` rows lose their related-pins context."""
    us = timeline.to_us(ev.ts[rows])
    query = ev.query_pin[rows].copy()
    if unlinked is not None:
        query[unlinked[rows]] = -1
    order = np.argsort(us, kind="stable")
    query, board = query[order], ev.board[rows][order]
    surface = np.where(query >= 0, "related_pins", "homefeed")
    return pa.Table.from_arrays(
        [
            pa.array(us[order], pa.int64()).view(TS_TYPE),
            pa.array(ev.user[rows][order], pa.int64()),
            pa.array(np.where(board >= 0, "save", "click").tolist(), pa.string()),
            pa.array(surface.tolist(), pa.string()),
            pa.array(ev.pin[rows][order], pa.int64()),
            pa.array(board, pa.int64(), mask=board < 0),
            pa.array(query, pa.int64(), mask=query < 0),
        ],
        schema=LOG_SCHEMA,
    )


def metadata(raw: RawMovieLens, boards: np.ndarray) -> tuple[pa.Table, pa.Table]:
    """(pins, boards) in the contract schemas: every movie; the given boards (ids of ``board_id``)."""
    names = np.asarray(GENRES, dtype=object)
    desc = []
    for flags, year in zip(raw.genre_flags, raw.year):
        genres = ", ".join(names[flags]) or "unknown"
        desc.append(f"{genres}; {year}" if year else genres)
    n = raw.movie_id.size
    pins = pa.Table.from_arrays(
        [
            pa.array(PIN_ID_BASE + raw.movie_id, pa.int64()),
            pa.array(raw.title, pa.string()),
            pa.array(desc, pa.string()),
            pa.nulls(n, PIN_SCHEMA.field("image_embedding").type),
            pa.nulls(n, pa.string()),
        ],
        schema=PIN_SCHEMA,
    )
    boards = np.unique(boards)
    rel = boards - BOARD_ID_BASE
    owner, genre = rel // BOARD_USER_STRIDE, rel % BOARD_USER_STRIDE
    board_desc = []
    for u, g in zip(owner.tolist(), genre.tolist()):
        age, occupation = raw.users.get(u, ("", ""))
        who = f" by a {age}-year-old {occupation}" if occupation else ""
        board_desc.append(f"{GENRES[g]} movies rated 4 or 5{who}")
    table = pa.Table.from_arrays(
        [
            pa.array(boards, pa.int64()),
            pa.array([GENRES[g] for g in genre.tolist()], pa.string()),
            pa.array(board_desc, pa.string()),
        ],
        schema=BOARD_SCHEMA,
    )
    return pins, table
