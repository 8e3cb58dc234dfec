"""The synthetic metadata and truth tables: pin and board texts from per-topic vocabularies, image vectors,
segments (the contract's pins and boards) and the planted truth written under ``_truth/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from omnisage_pipeline.contract.validation import BOARD_SCHEMA as BOARDS_SCHEMA
from omnisage_pipeline.contract.validation import PIN_SCHEMA as PINS_SCHEMA
from omnisage_pipeline.tools.synthetic_universe import (
    SEGMENTS,
    UNIVERSE_STREAM,
    USER_ID_BASE,
    Universe,
    other_topic,
)

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
            parts.insert(int(rng.integers(0, k + 1)), _UNICODE_SYLLABLES[rng.integers(len(_UNICODE_SYLLABLES))])
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

    b2 = other_topic(rng, u.board_topic, cfg.topics)
    name = text(u.board_topic, b2, 1, 3, 0.85, 0.0, 0.0)
    bdesc = text(u.board_topic, b2, 0, 10, 0.5, 0.1, 0.10)
    boards = pa.Table.from_arrays([pa.array(u.board_ids), name, bdesc], schema=BOARDS_SCHEMA)
    return pins, boards


def truth_tables(u: Universe) -> dict[str, pa.Table]:
    """The planted truth (``_truth/<name>.parquet``): topics and latent vectors of pins, boards and users."""
    d = u.params.latent_dim

    def vecs(x):
        return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), d).cast(pa.list_(pa.float32()))

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
