"""One day of synthetic engagement: the events of a UTC day drawn from a universe, all vectorised (no dense
users x pins matrix at any scale); ``omnisage_pipeline.tools.synthetic`` describes the model.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa

from omnisage_pipeline.contract.validation import LOG_SCHEMA as ENGAGEMENT_SCHEMA
from omnisage_pipeline.tools.synthetic_universe import (
    ACTIONS,
    BOARD_ID_BASE,
    DAY_STREAM,
    PIN_ID_BASE,
    SURFACES,
    USER_ID_BASE,
    GeneratorError,
    Universe,
    unit_rows,
)

# Action rates (closeup, click, save) by segment (SEGMENTS order, then null segment) ...
SEGMENT_ACTION = np.array(
    [
        [0.55, 0.20, 0.25],  # organic: saved most
        [0.62, 0.30, 0.08],  # promoted: clicked, rarely saved
        [0.45, 0.40, 0.15],  # shopping: clicked most
        [0.75, 0.13, 0.12],  # video: watched (closeup)
        [0.55, 0.20, 0.25],  # no segment
    ]
)
# ... times a surface multiplier (SURFACES order), renormalised.
SURFACE_ACTION = np.array(
    [
        [1.0, 1.0, 1.0],  # homefeed
        [1.0, 1.3, 1.0],  # related_pins: more clicks
        [0.9, 1.5, 0.8],  # search: intent, clicks
        [1.1, 0.7, 1.2],  # board: browsing a board, saves
    ]
)

_CHUNK = 65_536  # events scored per block: bounds memory at large scale; fixed so output never depends on it


def _gumbel(rng: np.random.Generator, shape, dtype=np.float64) -> np.ndarray:
    tiny = np.finfo(dtype).tiny
    return -np.log(-np.log(rng.random(shape, dtype=dtype) + tiny) + tiny)


def _draw_positions(u: Universe, rng, lo: np.ndarray, width: np.ndarray | int) -> np.ndarray:
    """Pool positions drawn by exposure weight from a uniform cluster of [lo, lo + width) (shape of ``lo``).

    Callers pass rows sorted by ``lo``, so the ticket and latent gathers stay within one topic's memory.
    """
    x = (width * rng.random(lo.shape)).ravel()
    k = x.astype(np.int64)
    cluster = np.broadcast_to(lo, lo.shape).ravel() + k
    # ndarray.take, not fancy indexing: several times faster for these 1-D gathers of 10^7 elements.
    idx = u.ticket_start.take(cluster) + ((x - k) * u.ticket_count.take(cluster)).astype(np.int64)
    return u.pool_tickets.take(idx).astype(np.int64).reshape(lo.shape)


def _gumbel_choice(
    rng,
    query: np.ndarray,
    pos: np.ndarray,
    pool_latent: np.ndarray,
    tau: float,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Per row, a pool position sampled from softmax(tau * query . latent[pos]) over its candidates
    (Gumbel-max), in fixed-size blocks. Latents are gathered from the topic-sorted copy (locality)."""
    out = np.empty(len(pos), dtype=np.int64)
    n_c, dim = pos.shape[1], pool_latent.shape[1]
    for s in range(0, len(pos), _CHUNK):
        c = pos[s : s + _CHUNK]
        lat = pool_latent.take(c.ravel(), axis=0).reshape(len(c), n_c, dim)
        score = np.matmul(lat, query[s : s + _CHUNK, :, None])[:, :, 0] * np.float32(tau)
        score += _gumbel(rng, c.shape, np.float32)
        if exclude is not None:
            score[c == exclude[s : s + _CHUNK, None]] = -np.inf
        out[s : s + _CHUNK] = np.take_along_axis(c, np.argmax(score, axis=1)[:, None], axis=1)[:, 0]
    return out


def _categorical_rows(rng, probs: np.ndarray) -> np.ndarray:
    """One category per row of a [n, m] probability matrix (inverse CDF)."""
    cdf = np.cumsum(probs, axis=1)
    r = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= r).sum(axis=1), probs.shape[1] - 1)


def generate_day(u: Universe, day_index: int, day: date) -> pa.Table:
    """The engagement log of one UTC day (day_index = days since the data set's start date)."""
    if day_index < 0:
        raise GeneratorError(f"day_index {day_index} must be >= 0")
    p, cfg = u.params, u.config
    rng = np.random.default_rng([u.seed, DAY_STREAM, day_index])
    n = round(cfg.events_per_day * (1 + p.day_volume_jitter * (2 * rng.random() - 1)))

    user = rng.choice(cfg.users, size=n, p=u.user_activity / u.user_activity.sum())
    surface = rng.choice(len(SURFACES), size=n, p=np.asarray(p.surface_probs) / sum(p.surface_probs))
    user_lat = u.user_latents_on_day(day_index)  # [U, D] drifted interest of this day

    # The topic each event is about: from the user's day-d affinity softmax(beta * u_d . centroids).
    logits = p.topic_beta * (user_lat.astype(np.float64) @ u.centroids.T)
    logits -= logits.max(axis=1, keepdims=True)
    user_topic_cdf = np.cumsum(np.exp(logits), axis=1)
    user_topic_cdf /= user_topic_cdf[:, -1:]
    topic = np.empty(n, dtype=np.int64)
    r = rng.random(n)
    for s in range(0, n, _CHUNK):
        block = user_topic_cdf.take(user[s : s + _CHUNK], axis=0)
        topic[s : s + _CHUNK] = (block <= r[s : s + _CHUNK, None]).sum(axis=1)
    topic = np.minimum(topic, cfg.topics - 1)

    # Board surface: the user browses one of their own boards; its topic and latent vector drive the pin.
    is_board = surface == SURFACES.index("board")
    browsed = u.boards_by_owner[
        u.user_board_start[user[is_board]]
        + (rng.random(is_board.sum()) * u.user_board_count[user[is_board]]).astype(np.int64)
    ]
    topic[is_board] = u.board_topic[browsed]

    # Query vector per event: the user (homefeed, related query), topic + user (search), the board (board).
    query = user_lat.take(user, axis=0)  # ndarray.take: much faster than fancy indexing here
    is_search = surface == SURFACES.index("search")
    query[is_search] = unit_rows(0.6 * u.centroids[topic[is_search]] + 0.4 * query[is_search]).astype(np.float32)
    query[is_board] = u.board_latent[browsed]

    # Rows are processed in topic order (locality of the pool searches and latent gathers, see
    # _draw_positions); results go back to event order.
    by_topic = np.argsort(topic, kind="stable")
    n_sub = cfg.subtopics
    cand = _draw_positions(u, rng, np.repeat(topic[by_topic, None] * n_sub, p.candidates, axis=1), n_sub)
    pin = np.empty(n, dtype=np.int64)
    chosen = _gumbel_choice(rng, query.take(by_topic, axis=0), cand, u.pool_latent, p.pin_tau)
    pin[by_topic] = u.pool_order.take(chosen)

    # Related pins: the pin chosen above is the query pin; the engaged pin is drawn from the query's own
    # sub-topic (70% of candidates) or its secondary topic (30%) and chosen by latent closeness to the query
    # pin (never itself).
    rel = np.flatnonzero(surface == SURFACES.index("related_pins"))
    rel = rel[np.argsort(u.pin_cluster[pin[rel]], kind="stable")]
    qpin = pin[rel]
    own = rng.random((len(rel), p.candidates)) < 0.7
    rel_lo = np.where(own, u.pin_cluster[qpin][:, None], u.pin_topic2[qpin][:, None] * n_sub)
    rel_cand = _draw_positions(u, rng, rel_lo, np.where(own, 1, n_sub))
    query_pin = np.full(n, -1, dtype=np.int64)
    query_pin[rel] = qpin
    chosen = _gumbel_choice(
        rng,
        u.pin_latent.take(qpin, axis=0),
        rel_cand,
        u.pool_latent,
        p.related_tau,
        exclude=u.pin_pool_pos[qpin],
    )
    pin[rel] = u.pool_order.take(chosen)

    # Action: segment rate x surface multiplier.
    probs = SEGMENT_ACTION.take(u.pin_segment.take(pin), axis=0) * SURFACE_ACTION.take(surface, axis=0)
    action = _categorical_rows(rng, probs)

    # Saves go to the user's board that matches the pin best: Gumbel-max over ALL the user's boards
    # (CSR expansion: sum over saves of the user's board count, no padding).
    board = np.full(n, -1, dtype=np.int64)
    is_save = np.flatnonzero(action == ACTIONS.index("save"))
    if len(is_save):
        su, sp = user[is_save], pin[is_save]
        counts = u.user_board_count[su]
        row = np.repeat(np.arange(len(is_save)), counts)
        seg_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        within = np.arange(len(row)) - np.repeat(seg_start, counts)
        cb = u.boards_by_owner[np.repeat(u.user_board_start[su], counts) + within]
        score = p.board_tau * np.einsum(
            "nd,nd->n", u.board_latent.take(cb, axis=0), u.pin_latent.take(sp[row], axis=0), dtype=np.float64
        ) + _gumbel(rng, len(row))
        best = np.maximum.reduceat(score, seg_start)
        hit = np.flatnonzero(score == np.repeat(best, counts))
        _, first = np.unique(row[hit], return_index=True)
        board[is_save] = cb[hit[first]]

    ts = np.datetime64(day.isoformat(), "us").astype(np.int64) + rng.integers(0, 86_400_000_000, n)
    order = np.argsort(ts, kind="stable")  # a log is in time order; stable sort keeps it reproducible

    def ids(base, idx):
        idx = idx[order]
        return pa.array(base + idx, pa.int64(), mask=idx < 0)

    def names(values, codes):
        return pa.DictionaryArray.from_arrays(pa.array(codes[order].astype(np.int32)), pa.array(values)).cast(
            pa.string()
        )

    return pa.Table.from_arrays(
        [
            pa.array(ts[order], pa.int64()).view(pa.timestamp("us", tz="UTC")),  # (no pandas import)
            pa.array(USER_ID_BASE + user[order], pa.int64()),
            names(ACTIONS, action),
            names(SURFACES, surface),
            ids(PIN_ID_BASE, pin),
            ids(BOARD_ID_BASE, board),
            ids(PIN_ID_BASE, query_pin),
        ],
        schema=ENGAGEMENT_SCHEMA,
    )
