"""Synthetic input in the data contract's format, from a generative model with planted (known) structure.

The generator has two parts:

* a **universe** built once from ``(scale, seed)``: K topic centroids in a ``latent_dim`` space, each with
  S sub-topic centroids around it; every pin, board and user gets its own latent vector = a mixture of a
  primary (pins: sub-)topic centroid and a secondary topic centroid plus individual Gaussian variation (so
  no two entities tie); pins get a heavy-tailed popularity weight (so the graph has hubs for the paper's
  pruning, appendix A.1, to act on), a segment, an image embedding (a fixed random projection of the
  latent vector plus noise; some pins have none) and a title/description whose words come from the
  vocabularies of the pin's topics mixed with shared noise words; every user owns at least one board,
  created for one of the user's interest topics;
* **days**, each generated from its own RNG ``default_rng([seed, DAY_STREAM, day_index])`` so any day can be
  generated alone and the same seed always gives the same rows. Users' interests drift slowly: the latent
  vector of user u on day d is ``normalize(latent_u + drift_rate * d * centroid[drift_topic_u])``.

Engagement (all vectorised; no dense users x pins matrix at any scale): every event picks a user by
activity, a surface and a topic from the user's day-d topic affinity ``softmax(beta * u_d . centroids)``;
the engaged pin is the Gumbel-max (a sample from ``softmax(tau * affinity)``) of a few candidates drawn by
exposure weight from that topic's pin pool. Related-pins events take a user-affine query pin first and
engage a pin drawn from the query's sub-topic (or secondary topic) pool, scored by latent closeness to
the query, so related pairs are closer than same-topic pairs, which are closer than random pairs. Saves
go to the user's own board that matches the pin best (Gumbel-max over the user's boards by board . pin).
Action rates depend on the pin's segment and the surface.

The truth goes under ``DIR/_truth/`` (the pipeline never reads it): latent vectors and topics of pins,
boards and users plus ``meta.json`` (what ``user_latents_on_day`` needs to recompute the drift).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml.truth import Truth, load_truth, user_latents_on_day  # noqa: F401 (Truth, load_truth: reading back what generate() writes)
from omnisage_pipeline.contract.validation import BOARD_SCHEMA as BOARDS_SCHEMA
from omnisage_pipeline.contract.validation import LOG_SCHEMA as ENGAGEMENT_SCHEMA
from omnisage_pipeline.contract.validation import PIN_SCHEMA as PINS_SCHEMA

GENERATOR_VERSION = 1

ACTIONS = ("closeup", "click", "save")
SURFACES = ("homefeed", "related_pins", "search", "board")
SEGMENTS = ("organic", "promoted", "shopping", "video")

# RNG streams: the universe and each day have independent, reproducible streams.
UNIVERSE_STREAM = 0
DAY_STREAM = 1

# Contract schemas (README, "Data contract", "Input"). Every field is declared nullable, as a plain export would be:
# "required" is a validation rule of the ingest, not a Parquet repetition level.

# Id ranges: disjoint and offset so nothing downstream can assume dense ids that start at 0.
PIN_ID_BASE = 1_000_000_000
BOARD_ID_BASE = 2_000_000_000
USER_ID_BASE = 3_000_000_000


@dataclass(frozen=True)
class ScaleConfig:
    pins: int
    boards: int
    users: int
    events_per_day: int
    topics: int
    subtopics: int  # per topic: pins of one sub-topic are closer to each other than to the rest of the topic


SCALES: dict[str, ScaleConfig] = {
    "tiny": ScaleConfig(pins=500, boards=200, users=100, events_per_day=2_000, topics=8, subtopics=4),
    "small": ScaleConfig(
        pins=5_000, boards=2_000, users=1_000, events_per_day=20_000, topics=16, subtopics=8
    ),
    "medium": ScaleConfig(
        pins=50_000, boards=25_000, users=12_500, events_per_day=200_000, topics=32, subtopics=8
    ),
    "large": ScaleConfig(
        pins=200_000, boards=100_000, users=50_000, events_per_day=1_000_000, topics=64, subtopics=16
    ),
}


@dataclass(frozen=True)
class ModelParams:
    """Knobs of the generative model (the defaults are what `omnisage generate` uses)."""

    latent_dim: int = 32
    image_dim: int = 32
    images: bool = True  # False: a data set with no image vectors at all (column present, every value null)
    image_null_fraction: float = 0.08
    image_noise: float = 0.15
    subtopic_spread: float = 0.8  # sub-topic centroid = normalize(topic centroid + spread * N(0, I/D))
    pin_noise: float = 0.5  # individual variation around the topic mixture (norm of the noise ~ this)
    board_noise: float = 0.4
    user_noise: float = 0.5
    drift_rate: float = 0.03  # per day, towards the user's drift topic
    topic_beta: float = 10.0  # sharpness of the user's topic affinity softmax
    pin_tau: float = 8.0  # sharpness of the pin choice among candidates (homefeed/search/board)
    related_tau: float = 14.0  # sharpness of related-pin choice (latent closeness to the query pin)
    board_tau: float = 12.0  # sharpness of the board choice for a save
    candidates: int = 12  # candidates drawn from a topic pool per event
    segment_probs: tuple[float, ...] = (0.70, 0.10, 0.12, 0.075, 0.005)  # SEGMENTS + null
    surface_probs: tuple[float, ...] = (0.45, 0.25, 0.18, 0.12)  # SURFACES
    day_volume_jitter: float = 0.05


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
# Impression boost by segment: promoted pins are shown more often than their popularity alone says.
SEGMENT_EXPOSURE = np.array([1.0, 3.0, 1.3, 1.5, 1.0])

_CHUNK = 65_536  # events scored per block: bounds memory at large scale; fixed so output never depends on it


class GeneratorError(ValueError):
    """Bad arguments or an output directory holding another data set."""


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _gumbel(rng: np.random.Generator, shape, dtype=np.float64) -> np.ndarray:
    tiny = np.finfo(dtype).tiny
    return -np.log(-np.log(rng.random(shape, dtype=dtype) + tiny) + tiny)


# ---------------------------------------------------------------------------------------------- vocabulary
_ONSETS = ["b", "c", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "l", "x"]
# A share of words carry non-ASCII letters, CJK or emoji: the featurizer must treat text as Unicode.
_UNICODE_SYLLABLES = ["é", "ö", "ñ", "ß", "ç", "ø", "å", "ł", "猫", "花", "山", "海", "✨", "🌿", "ж", "λ"]


def _make_vocab(rng: np.random.Generator, n: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:  # vocabulary only (hundreds of words, once per universe), not a per-row loop
        k = int(rng.integers(2, 4))
        parts = [
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(k)
        ]
        if rng.random() < 0.1:
            parts.insert(
                int(rng.integers(0, k + 1)), _UNICODE_SYLLABLES[rng.integers(len(_UNICODE_SYLLABLES))]
            )
        word = "".join(parts)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class _Vocabulary:
    """The words texts are drawn from: per topic a block of ``words_per_topic`` words from
    ``topic_word_offset[k]``, then ``noise_words`` shared noise words from ``noise_offset``."""

    words: pa.Array
    topic_word_offset: np.ndarray  # [K] first vocab index of each topic's words
    words_per_topic: int
    noise_offset: int
    noise_words: int


@dataclass(frozen=True)
class _TextShape:
    """Length range of a text and the share of its words from the primary / secondary topic (rest: noise)."""

    min_len: int
    max_len: int
    p_primary: float
    p_secondary: float
    null_fraction: float


def _texts(
    rng: np.random.Generator,
    vocab: _Vocabulary,
    primary: np.ndarray,
    secondary: np.ndarray,
    shape: _TextShape,
) -> pa.Array:
    """One string per entity: words from its topics' vocabularies and shared noise words (vectorised)."""
    min_len, max_len, p_primary, p_secondary = (
        shape.min_len,
        shape.max_len,
        shape.p_primary,
        shape.p_secondary,
    )
    null_fraction = shape.null_fraction
    topic_word_offset, words_per_topic = vocab.topic_word_offset, vocab.words_per_topic
    noise_offset, noise_words = vocab.noise_offset, vocab.noise_words
    n = len(primary)
    lengths = rng.integers(min_len, max_len + 1, n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(np.arange(n), lengths)
    kind = rng.random(len(owner))
    topic_of_word = np.where(kind < p_primary, primary[owner], secondary[owner])
    topic_word = topic_word_offset[topic_of_word] + rng.integers(0, words_per_topic, len(owner))
    noise_word = noise_offset + rng.integers(0, noise_words, len(owner))
    word = np.where(kind < p_primary + p_secondary, topic_word, noise_word)
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), vocab.words.take(pa.array(word)))
    text = pc.binary_join(lists, " ")
    if null_fraction > 0:
        text = pc.if_else(pa.array(rng.random(n) < null_fraction), pa.nulls(n, pa.string()), text)
    return text


# ---------------------------------------------------------------------------------------------- universe
@dataclass
class Universe:
    scale: str
    seed: int
    config: ScaleConfig
    params: ModelParams
    centroids: np.ndarray  # [K, D] float64 unit vectors
    pin_topic: np.ndarray
    pin_topic2: np.ndarray
    pin_cluster: np.ndarray  # topic * subtopics + sub-topic
    subcentroids: np.ndarray  # [K * S, D]
    pin_latent: np.ndarray  # [P, D] float32 unit
    pin_popularity: np.ndarray
    pin_segment: np.ndarray  # int8 index into SEGMENTS, len(SEGMENTS) = null
    board_topic: np.ndarray
    board_owner: np.ndarray  # user index
    board_latent: np.ndarray
    user_topic: np.ndarray
    user_topic2: np.ndarray
    user_drift_topic: np.ndarray
    user_latent: np.ndarray  # day-0 latent, [U, D] float32 unit
    user_activity: np.ndarray
    image_projection: np.ndarray  # [D, image_dim]
    # derived samplers
    pool_tickets: np.ndarray = field(
        repr=False, default=None
    )  # pool positions, repeated by exposure (_pin_pools)
    ticket_start: np.ndarray = field(repr=False, default=None)  # [K*S] first ticket of each cluster
    ticket_count: np.ndarray = field(repr=False, default=None)  # [K*S]
    pool_order: np.ndarray = field(repr=False, default=None)  # pool position -> pin index
    pool_end: np.ndarray = field(repr=False, default=None)  # [K*S] exclusive end position of each cluster
    pool_latent: np.ndarray = field(repr=False, default=None)  # pin_latent in pool order
    pin_pool_pos: np.ndarray = field(repr=False, default=None)  # pin index -> pool position
    user_board_start: np.ndarray = field(repr=False, default=None)  # CSR of boards by owner
    user_board_count: np.ndarray = field(repr=False, default=None)
    boards_by_owner: np.ndarray = field(repr=False, default=None)

    @property
    def pin_ids(self) -> np.ndarray:
        return PIN_ID_BASE + np.arange(self.config.pins, dtype=np.int64)

    @property
    def board_ids(self) -> np.ndarray:
        return BOARD_ID_BASE + np.arange(self.config.boards, dtype=np.int64)

    @property
    def user_ids(self) -> np.ndarray:
        return USER_ID_BASE + np.arange(self.config.users, dtype=np.int64)

    def user_latents_on_day(self, day_index: int) -> np.ndarray:
        return user_latents_on_day(
            self.user_latent, self.centroids[self.user_drift_topic], self.params.drift_rate, day_index
        )


def _mixture_latents(rng, centroids, primary, secondary, mix_a, mix_b, noise):
    n, d = len(primary), centroids.shape[1]
    w = rng.beta(mix_a, mix_b, n)[:, None]
    x = (
        (1 - w) * centroids[primary]
        + w * centroids[secondary]
        + noise / np.sqrt(d) * rng.standard_normal((n, d))
    )
    return _unit(x)


def _other_topic(rng, primary, k):
    """A topic different from ``primary`` (uniform over the others)."""
    return (primary + rng.integers(1, k, len(primary))) % k if k > 1 else primary.copy()


def build_universe(scale: str, seed: int, params: ModelParams | None = None) -> Universe:
    if scale not in SCALES:
        raise GeneratorError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    if seed < 0:
        raise GeneratorError(f"--seed {seed}: must be >= 0")
    cfg, p = SCALES[scale], params or ModelParams()
    k, d = cfg.topics, p.latent_dim
    rng = np.random.default_rng([seed, UNIVERSE_STREAM])
    centroids = _unit(rng.standard_normal((k, d)))
    # Topic sizes are uneven (Zipf-like), as real interests are; every topic has at least one pin.
    topic_weight = 1.0 / np.arange(1, k + 1) ** 0.7
    topic_weight = rng.permutation(topic_weight / topic_weight.sum())

    def topics(n):
        t = rng.choice(k, size=n, p=topic_weight)
        t[: min(n, k)] = np.arange(min(n, k))
        return t

    # Sub-topics (clusters): finer structure inside a topic, what related-pins engagement follows.
    n_sub = cfg.subtopics
    subcentroids = _unit(
        np.repeat(centroids, n_sub, axis=0)
        + p.subtopic_spread / np.sqrt(d) * rng.standard_normal((k * n_sub, d))
    )
    pin_topic = topics(cfg.pins)
    pin_cluster = pin_topic * n_sub + rng.integers(0, n_sub, cfg.pins)
    pin_cluster[: min(cfg.pins, k * n_sub)] = np.arange(min(cfg.pins, k * n_sub))  # no empty cluster
    pin_topic = pin_cluster // n_sub
    pin_topic2 = _other_topic(rng, pin_topic, k)
    # A pin's latent vector: its sub-topic centroid mixed with a secondary topic, plus individual variation.
    w = rng.beta(1.0, 4.0, cfg.pins)[:, None]
    pin_latent = _unit(
        (1 - w) * subcentroids[pin_cluster]
        + w * centroids[pin_topic2]
        + p.pin_noise / np.sqrt(d) * rng.standard_normal((cfg.pins, d))
    )
    pin_popularity = rng.lognormal(0.0, 1.2, cfg.pins)
    pin_segment = rng.choice(
        len(SEGMENTS) + 1, size=cfg.pins, p=np.asarray(p.segment_probs) / sum(p.segment_probs)
    )

    user_topic = topics(cfg.users)
    user_topic2 = _other_topic(rng, user_topic, k)
    user_drift_topic = _other_topic(rng, user_topic, k)
    user_latent = _mixture_latents(rng, centroids, user_topic, user_topic2, 2.0, 3.0, p.user_noise)
    user_activity = rng.lognormal(0.0, 1.0, cfg.users)

    # Boards: every user owns one board of the primary topic; the rest go to users by activity, each created
    # for one of the owner's topics (primary / secondary / the topic the user drifts towards).
    if cfg.boards < cfg.users:
        raise GeneratorError(f"scale {scale}: needs at least one board per user")
    extra_owner = rng.choice(cfg.users, size=cfg.boards - cfg.users, p=user_activity / user_activity.sum())
    board_owner = np.concatenate([np.arange(cfg.users), extra_owner])
    which = np.concatenate(
        [np.zeros(cfg.users, np.int64), rng.choice(3, size=len(extra_owner), p=[0.45, 0.35, 0.20])]
    )
    board_topic = np.choose(
        which, [user_topic[board_owner], user_topic2[board_owner], user_drift_topic[board_owner]]
    )
    board_topic2 = _other_topic(rng, board_topic, k)
    board_latent = _mixture_latents(rng, centroids, board_topic, board_topic2, 1.0, 6.0, p.board_noise)
    # Shuffle board rows so board ids do not reveal the owner order.
    perm = rng.permutation(cfg.boards)
    board_owner, board_topic, board_latent = board_owner[perm], board_topic[perm], board_latent[perm]

    image_projection = rng.standard_normal((d, p.image_dim)) / np.sqrt(d)

    u = Universe(
        scale=scale,
        seed=seed,
        config=cfg,
        params=p,
        centroids=centroids,
        pin_topic=pin_topic,
        pin_topic2=pin_topic2,
        pin_cluster=pin_cluster,
        subcentroids=subcentroids,
        pin_latent=pin_latent.astype(np.float32),
        pin_popularity=pin_popularity,
        pin_segment=pin_segment.astype(np.int8),
        board_topic=board_topic,
        board_owner=board_owner,
        board_latent=board_latent.astype(np.float32),
        user_topic=user_topic,
        user_topic2=user_topic2,
        user_drift_topic=user_drift_topic,
        user_latent=user_latent.astype(np.float32),
        user_activity=user_activity,
        image_projection=image_projection,
    )
    _pin_pools(u)
    order = np.argsort(u.board_owner, kind="stable")
    u.boards_by_owner = order
    u.user_board_count = np.bincount(u.board_owner, minlength=cfg.users)
    u.user_board_start = np.concatenate([[0], np.cumsum(u.user_board_count)[:-1]])
    return u


TICKETS_PER_PIN = 16  # exposure weights are quantised to 1/16 of the mean weight (every pin >= 1 ticket)


def _pin_pools(u: Universe) -> None:
    """Per-cluster candidate pools, sampled by exposure weight in O(1) per draw.

    Pins are sorted by cluster (= topic * S + sub-topic, so also by topic): a pin's *pool position*. Each pin
    gets ``max(1, rint(weight / quantum))`` tickets (quantum = mean weight / TICKETS_PER_PIN) laid out in
    pool order, so cluster c owns the ticket range [ticket_start[c], ticket_start[c] + ticket_count[c]). A
    uniform ticket of that range is a pin drawn with probability ~ its exposure weight: one gather, no
    binary search (which cost ~0.4 us per draw at large scale), and no users x pins matrix.
    """
    n_clusters = u.config.topics * u.config.subtopics
    order = np.argsort(u.pin_cluster, kind="stable")
    c_sorted = u.pin_cluster[order]
    w = (u.pin_popularity * SEGMENT_EXPOSURE[u.pin_segment])[order]
    quantum = w.sum() / (TICKETS_PER_PIN * len(w))
    tickets = np.maximum(1, np.rint(w / quantum)).astype(np.int64)
    u.pool_tickets = np.repeat(np.arange(len(order), dtype=np.int32), tickets)
    u.ticket_count = np.bincount(c_sorted, weights=tickets, minlength=n_clusters).astype(np.int64)
    u.ticket_start = np.concatenate([[0], np.cumsum(u.ticket_count)[:-1]])
    u.pool_order = order
    u.pool_end = np.cumsum(np.bincount(c_sorted, minlength=n_clusters))
    u.pool_latent = np.ascontiguousarray(u.pin_latent[order])
    u.pin_pool_pos = np.empty_like(order)
    u.pin_pool_pos[order] = np.arange(len(order))


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


# ---------------------------------------------------------------------------------------------- one day
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
    query[is_search] = _unit(0.6 * u.centroids[topic[is_search]] + 0.4 * query[is_search]).astype(np.float32)
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


# ---------------------------------------------------------------------------------------------- metadata
def metadata_tables(u: Universe) -> tuple[pa.Table, pa.Table]:
    """(pins, boards) metadata in the contract schema."""
    p, cfg = u.params, u.config
    rng = np.random.default_rng([u.seed, UNIVERSE_STREAM, 1])
    words_per_topic, noise_words = 30, 200
    vocab_list = _make_vocab(rng, cfg.topics * words_per_topic + noise_words)
    vocab = pa.array(vocab_list, pa.string())
    topic_off = np.arange(cfg.topics) * words_per_topic
    noise_off = cfg.topics * words_per_topic

    words = _Vocabulary(vocab, topic_off, words_per_topic, noise_off, noise_words)

    def text(primary, secondary, lo, hi, pp, ps, null):
        return _texts(rng, words, primary, secondary, _TextShape(lo, hi, pp, ps, null))

    title = text(u.pin_topic, u.pin_topic2, 3, 7, 0.55, 0.15, 0.0)
    desc = text(u.pin_topic, u.pin_topic2, 6, 20, 0.40, 0.15, 0.05)
    # Image embedding: fixed random projection of the latent vector + noise (computed in float64 so the
    # float32 bytes do not depend on the BLAS kernel).
    if p.images:
        img = u.pin_latent.astype(np.float64) @ u.image_projection + p.image_noise / np.sqrt(
            p.image_dim
        ) * rng.standard_normal((cfg.pins, p.image_dim))
        img_null = rng.random(cfg.pins) < p.image_null_fraction
        flat = pa.array(img.astype(np.float32).ravel(), pa.float32())
        offsets = pa.array(np.arange(cfg.pins + 1, dtype=np.int32) * p.image_dim, pa.int32())
        image = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(img_null))
    else:
        image = pa.nulls(cfg.pins, pa.list_(pa.float32()))
    seg_codes = u.pin_segment.astype(np.int32)
    segment = pa.DictionaryArray.from_arrays(
        pa.array(seg_codes, mask=seg_codes == len(SEGMENTS)), pa.array(SEGMENTS)
    ).cast(pa.string())
    pins = pa.Table.from_arrays([pa.array(u.pin_ids), title, desc, image, segment], schema=PINS_SCHEMA)

    b2 = _other_topic(rng, u.board_topic, cfg.topics)
    name = text(u.board_topic, b2, 1, 3, 0.85, 0.0, 0.0)
    bdesc = text(u.board_topic, b2, 0, 10, 0.5, 0.1, 0.10)
    boards = pa.Table.from_arrays([pa.array(u.board_ids), name, bdesc], schema=BOARDS_SCHEMA)
    return pins, boards


def truth_tables(u: Universe) -> dict[str, pa.Table]:
    d = u.params.latent_dim

    def vecs(x):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), d).cast(
            pa.list_(pa.float32())
        )

    return {
        "pins": pa.table(
            {
                "pin_id": pa.array(u.pin_ids),
                "topic": pa.array(u.pin_topic.astype(np.int32)),
                "secondary_topic": pa.array(u.pin_topic2.astype(np.int32)),
                "subtopic": pa.array(u.pin_cluster.astype(np.int32)),  # cluster id = topic * S + sub-topic
                "latent": vecs(u.pin_latent),
                "popularity": pa.array(u.pin_popularity),
            }
        ),
        "boards": pa.table(
            {
                "board_id": pa.array(u.board_ids),
                "topic": pa.array(u.board_topic.astype(np.int32)),
                "owner_user_id": pa.array(USER_ID_BASE + u.board_owner),
                "latent": vecs(u.board_latent),
            }
        ),
        "users": pa.table(
            {
                "user_id": pa.array(u.user_ids),
                "topic": pa.array(u.user_topic.astype(np.int32)),
                "secondary_topic": pa.array(u.user_topic2.astype(np.int32)),
                "drift_topic": pa.array(u.user_drift_topic.astype(np.int32)),
                "latent": vecs(u.user_latent),  # day 0; day d: user_latents_on_day (see meta.json drift_rate)
                "activity": pa.array(u.user_activity),
            }
        ),
        "topics": pa.table(
            {"topic": pa.array(np.arange(u.config.topics, dtype=np.int32)), "centroid": vecs(u.centroids)}
        ),
    }


# ---------------------------------------------------------------------------------------------- writing
def write_parquet(table: pa.Table, path: Path) -> None:
    """Deterministic bytes (fixed row order, fixed row groups, no timestamps) and atomic (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=131_072, write_statistics=True)
    os.replace(tmp, path)


def _meta(u: Universe, start_date: str, days: list[str]) -> dict:
    p, cfg = u.params, u.config
    return {
        "generator_version": GENERATOR_VERSION,
        "scale": u.scale,
        "seed": u.seed,
        "start_date": start_date,
        "days": days,
        "K": cfg.topics,
        "subtopics_per_topic": cfg.subtopics,
        "latent_dim": p.latent_dim,
        "image_dim": p.image_dim if p.images else None,
        "images": p.images,
        "drift_rate": p.drift_rate,
        "params": json.loads(json.dumps(asdict(p))),  # every knob of the generative model (ModelParams)
        "counts": {"pins": cfg.pins, "boards": cfg.boards, "users": cfg.users},
        "id_bases": {"pin": PIN_ID_BASE, "board": BOARD_ID_BASE, "user": USER_ID_BASE},
        "day_index": "days since start_date; user latent on day d = "
        "normalize(latent + drift_rate * d * centroid[drift_topic])",
    }


def _write_meta(meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


_IDENTITY_KEYS = (
    "generator_version",
    "scale",
    "seed",
    "start_date",
    "K",
    "latent_dim",
    "image_dim",
    "images",
    "params",
)


def generate(
    out_dir: str | Path,
    start_date: str,
    days: int,
    scale: str = "small",
    seed: int = 0,
    *,
    images: bool = True,
    force: bool = False,
    params: ModelParams | None = None,
) -> dict:
    """Write ``days`` days of synthetic input (contract layout) plus ``_truth/`` under ``out_dir``.

    Re-running with the same arguments rewrites identical bytes; adding days to a data set generated with
    the same (scale, seed, start_date, images, params) extends it. A directory holding a different synthetic data
    set is an error unless ``force`` (then the generator's own folders are removed first).
    Returns a summary: rows per written file and seconds.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    try:
        first = date.fromisoformat(start_date)
    except (TypeError, ValueError) as exc:
        raise GeneratorError(f"--start-date {start_date!r} is not YYYY-MM-DD") from exc
    if days < 1:
        raise GeneratorError(f"--days {days}: must be >= 1")
    params = params or ModelParams()
    if not images:
        params = replace(params, images=False)
    u = build_universe(scale, seed, params)
    day_keys = [(first + timedelta(days=i)).isoformat() for i in range(days)]
    meta = _meta(u, start_date, day_keys)

    meta_path = out / "_truth" / "meta.json"
    if not meta_path.exists() and any((out / sub).exists() for sub in ("engagement_logs", "pins", "boards")):
        # Never overwrite input that the generator did not write (a real export, a converted data set).
        raise GeneratorError(
            f"{out} already holds input that is not a synthetic data set (no _truth/meta.json);"
            " choose another --out"
        )
    done_days: list[str] = []
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        clash = {k: (old.get(k), meta[k]) for k in _IDENTITY_KEYS if old.get(k) != meta[k]}
        if clash and not force:
            detail = ", ".join(f"{k}: {a!r} there vs {b!r} asked" for k, (a, b) in clash.items())
            raise GeneratorError(
                f"{out} holds another synthetic data set ({detail}); pass --force to replace it"
            )
        if clash:
            for sub in ("engagement_logs", "pins", "boards", "_truth"):
                shutil.rmtree(out / sub, ignore_errors=True)
        else:
            done_days = list(old.get("days", []))
    meta["days"] = sorted(set(done_days) | set(day_keys))
    # Mark the folder as this synthetic data set before writing any data, so that a run killed half-way can
    # be re-run into it; a day is listed in meta.json once it is complete.
    _write_meta({**meta, "days": done_days}, meta_path)

    rows: dict[str, int] = {}
    t_meta = time.perf_counter()
    pins, boards = metadata_tables(u)
    write_parquet(pins, out / "pins" / "part-00000.parquet")
    write_parquet(boards, out / "boards" / "part-00000.parquet")
    rows["pins/part-00000.parquet"], rows["boards/part-00000.parquet"] = pins.num_rows, boards.num_rows
    for name, table in truth_tables(u).items():
        write_parquet(table, out / "_truth" / f"{name}.parquet")
        rows[f"_truth/{name}.parquet"] = table.num_rows
    metadata_seconds = time.perf_counter() - t_meta

    day_seconds = []
    for i, key in enumerate(day_keys):
        t0 = time.perf_counter()
        table = generate_day(u, i, first + timedelta(days=i))
        rel = f"engagement_logs/dt={key}/part-00000.parquet"
        write_parquet(table, out / rel)
        rows[rel] = table.num_rows
        day_seconds.append(time.perf_counter() - t0)
        done_days = sorted(set(done_days) | {key})
        _write_meta({**meta, "days": done_days}, meta_path)

    _write_meta(meta, meta_path)
    return {
        "out_dir": str(out),
        "scale": scale,
        "seed": seed,
        "start_date": start_date,
        "days": day_keys,
        "rows": rows,
        "events": sum(v for k, v in rows.items() if k.startswith("engagement_logs/")),
        "metadata_seconds": metadata_seconds,
        "day_seconds": day_seconds,
        "seconds": time.perf_counter() - t_start,
    }
