"""The universe of the synthetic generator: topics, entities and their latent vectors, built once per
``(scale, seed)`` (``omnisage_pipeline.tools.synthetic`` describes the generative model).

Besides the entities, the universe holds the samplers every day draws from: per sub-topic candidate pools
weighted by exposure (``_pin_pools``) and the boards of every user (CSR by owner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ml.truth import user_latents_on_day

ACTIONS = ("closeup", "click", "save")
SURFACES = ("homefeed", "related_pins", "search", "board")
SEGMENTS = ("organic", "promoted", "shopping", "video")

# RNG streams: the universe and each day have independent, reproducible streams.
UNIVERSE_STREAM = 0
DAY_STREAM = 1

# Id ranges: disjoint and offset so nothing downstream can assume dense ids that start at 0.
PIN_ID_BASE = 1_000_000_000
BOARD_ID_BASE = 2_000_000_000
USER_ID_BASE = 3_000_000_000


@dataclass(frozen=True)
class ScaleConfig:
    """Entity counts, daily volume and topic structure of one ``--scale``."""

    pins: int
    boards: int
    users: int
    events_per_day: int
    topics: int
    subtopics: int  # per topic: pins of one sub-topic are closer to each other than to the rest of the topic


SCALES: dict[str, ScaleConfig] = {
    "tiny": ScaleConfig(pins=500, boards=200, users=100, events_per_day=2_000, topics=8, subtopics=4),
    "small": ScaleConfig(pins=5_000, boards=2_000, users=1_000, events_per_day=20_000, topics=16, subtopics=8),
    "medium": ScaleConfig(pins=50_000, boards=25_000, users=12_500, events_per_day=200_000, topics=32, subtopics=8),
    "large": ScaleConfig(pins=200_000, boards=100_000, users=50_000, events_per_day=1_000_000, topics=64, subtopics=16),
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


# Impression boost by segment: promoted pins are shown more often than their popularity alone says.
SEGMENT_EXPOSURE = np.array([1.0, 3.0, 1.3, 1.5, 1.0])


class GeneratorError(ValueError):
    """Bad arguments or an output directory holding another data set."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with every row (last axis) scaled to unit length."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class Universe:
    """Everything fixed by ``(scale, seed, params)``: entities, latent vectors and the day samplers."""

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
    pool_tickets: np.ndarray = field(repr=False, default=None)  # pool positions, repeated by exposure (_pin_pools)
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
    x = (1 - w) * centroids[primary] + w * centroids[secondary] + noise / np.sqrt(d) * rng.standard_normal((n, d))
    return unit_rows(x)


def other_topic(rng, primary, k):
    """A topic different from ``primary`` (uniform over the others)."""
    return (primary + rng.integers(1, k, len(primary))) % k if k > 1 else primary.copy()


def build_universe(scale: str, seed: int, params: ModelParams | None = None) -> Universe:
    """The universe of ``(scale, seed)``: the same arguments always give the same entities and samplers."""
    if scale not in SCALES:
        raise GeneratorError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    if seed < 0:
        raise GeneratorError(f"--seed {seed}: must be >= 0")
    cfg, p = SCALES[scale], params or ModelParams()
    k, d = cfg.topics, p.latent_dim
    rng = np.random.default_rng([seed, UNIVERSE_STREAM])
    centroids = unit_rows(rng.standard_normal((k, d)))
    # Topic sizes are uneven (Zipf-like), as real interests are; every topic has at least one pin.
    topic_weight = 1.0 / np.arange(1, k + 1) ** 0.7
    topic_weight = rng.permutation(topic_weight / topic_weight.sum())

    def topics(n):
        t = rng.choice(k, size=n, p=topic_weight)
        t[: min(n, k)] = np.arange(min(n, k))
        return t

    # Sub-topics (clusters): finer structure inside a topic, what related-pins engagement follows.
    n_sub = cfg.subtopics
    subcentroids = unit_rows(
        np.repeat(centroids, n_sub, axis=0) + p.subtopic_spread / np.sqrt(d) * rng.standard_normal((k * n_sub, d))
    )
    pin_topic = topics(cfg.pins)
    pin_cluster = pin_topic * n_sub + rng.integers(0, n_sub, cfg.pins)
    pin_cluster[: min(cfg.pins, k * n_sub)] = np.arange(min(cfg.pins, k * n_sub))  # no empty cluster
    pin_topic = pin_cluster // n_sub
    pin_topic2 = other_topic(rng, pin_topic, k)
    # A pin's latent vector: its sub-topic centroid mixed with a secondary topic, plus individual variation.
    w = rng.beta(1.0, 4.0, cfg.pins)[:, None]
    pin_latent = unit_rows(
        (1 - w) * subcentroids[pin_cluster]
        + w * centroids[pin_topic2]
        + p.pin_noise / np.sqrt(d) * rng.standard_normal((cfg.pins, d))
    )
    pin_popularity = rng.lognormal(0.0, 1.2, cfg.pins)
    pin_segment = rng.choice(len(SEGMENTS) + 1, size=cfg.pins, p=np.asarray(p.segment_probs) / sum(p.segment_probs))

    user_topic = topics(cfg.users)
    user_topic2 = other_topic(rng, user_topic, k)
    user_drift_topic = other_topic(rng, user_topic, k)
    user_latent = _mixture_latents(rng, centroids, user_topic, user_topic2, 2.0, 3.0, p.user_noise)
    user_activity = rng.lognormal(0.0, 1.0, cfg.users)

    # Boards: every user owns one board of the primary topic; the rest go to users by activity, each created
    # for one of the owner's topics (primary / secondary / the topic the user drifts towards).
    if cfg.boards < cfg.users:
        raise GeneratorError(f"scale {scale}: needs at least one board per user")
    extra_owner = rng.choice(cfg.users, size=cfg.boards - cfg.users, p=user_activity / user_activity.sum())
    board_owner = np.concatenate([np.arange(cfg.users), extra_owner])
    which = np.concatenate([np.zeros(cfg.users, np.int64), rng.choice(3, size=len(extra_owner), p=[0.45, 0.35, 0.20])])
    board_topic = np.choose(which, [user_topic[board_owner], user_topic2[board_owner], user_drift_topic[board_owner]])
    board_topic2 = other_topic(rng, board_topic, k)
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
