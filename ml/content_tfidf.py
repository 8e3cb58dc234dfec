"""Content-only baseline: TF-IDF cosine over the entities' text (pins: title and description; boards: name and
description), no engagement at all - the one baseline that can score an item no training event touched
(the cold-start slice of the quality benchmark).

Tokens: the fields joined by a space, NFKC-normalised and lower-cased, split into words = maximal runs of
Unicode letters, marks, numbers and "_" (``graph_engine.tokenizer``'s word rule, without its n-grams and
hashing: a vocabulary of whole words is what TF-IDF weighs). Vectorised with Arrow compute, no Python loop
per text. One vocabulary for pins and boards, so a board query can score pins.

Weights: tf = the word's count in the entity's text, idf = ln((1 + N) / (1 + df)) + 1 over the N entities
(the smooth form: a word in every text keeps weight 1), rows L2-normalised, so s(q, c) = cos(q, c). A user's
history h scores c by the cosine of c with the sum of h's vectors. An entity without text or not in the
metadata scores 0 against everything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

__all__ = ["ContentTfidfScorer", "tokenize_words"]

_NON_WORD = r"[^\p{L}\p{M}\p{N}_]+"
METADATA_FIELDS = {
    "pin": ("pins", "pin_id", ("title", "description")),
    "board": ("boards", "board_id", ("name", "description")),
}


def tokenize_words(*fields: Sequence[str | None] | pa.Array) -> tuple[np.ndarray, pa.Array]:
    """CSR ``(offsets int64[n + 1], words)`` of n texts, each the ``fields`` joined by a space (module
    docstring); empty and null texts have no words."""
    columns = [
        pc.fill_null(
            pa.array(f, pa.string()) if not isinstance(f, pa.Array | pa.ChunkedArray) else f.cast(pa.string()),
            "",
        )
        for f in fields
    ]
    text = pc.binary_join_element_wise(*columns, " ") if len(columns) > 1 else columns[0]
    words = pc.split_pattern_regex(pc.utf8_lower(pc.utf8_normalize(text, "NFKC")), _NON_WORD)
    if isinstance(words, pa.ChunkedArray):
        words = words.combine_chunks()
    flat = words.flatten()
    owner = pc.list_parent_indices(words).to_numpy(zero_copy_only=False)
    keep = pc.not_equal(pc.utf8_length(flat), 0).to_numpy(zero_copy_only=False)
    counts = np.bincount(owner[keep], minlength=len(words))
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), flat.filter(pa.array(keep))


class ContentTfidfScorer:
    """TF-IDF cosine scorer (module docstring) of ``texts``: {entity type: (ids, [field columns])}."""

    def __init__(self, texts: Mapping[str, tuple[np.ndarray, Sequence]]):
        ids_of, offsets, words = {}, [np.zeros(1, np.int64)], []
        total = 0
        for t, (ids, fields) in texts.items():
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            uniq, counts = np.unique(ids, return_counts=True)
            if (counts > 1).any():
                raise ValueError(f"content_tfidf: duplicate {t} ids, e.g. {uniq[counts > 1][:3].tolist()}")
            off, w = tokenize_words(*fields)
            if off.size - 1 != ids.size:
                raise ValueError(f"content_tfidf: {ids.size} {t} ids but {off.size - 1} texts")
            ids_of[t] = (ids, total)
            offsets.append(off[1:] + offsets[-1][-1])
            words.append(w)
            total += ids.size
        offsets = np.concatenate(offsets)
        vocab = pc.dictionary_encode(pa.chunked_array(words, pa.string())).combine_chunks()
        term = vocab.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        doc = np.repeat(np.arange(total), np.diff(offsets))
        tf = sp.csr_matrix((np.ones(term.size), (doc, term)), shape=(total, len(vocab.dictionary)))
        tf.sum_duplicates()
        df = np.diff(tf.tocsc().indptr).astype(np.float64)
        idf = np.log((1.0 + total) / (1.0 + df)) + 1.0
        self.vectors = _unit_rows(tf @ sp.diags(idf))
        self.vocabulary = np.asarray(vocab.dictionary.to_pylist(), dtype=object)
        self.idf = idf
        self._index = {}
        for t, (ids, start) in ids_of.items():
            order = np.argsort(ids, kind="stable")
            self._index[t] = (ids[order], start + order)

    @classmethod
    def from_metadata(cls, data_root: str | Path, types: Sequence[str] = ("pin", "board")) -> ContentTfidfScorer:
        """From the contract input's ``pins/*.parquet`` and ``boards/*.parquet`` (a type without files is
        skipped; a folder whose tables lack a column is an error naming it)."""
        import pyarrow.parquet as pq

        texts = {}
        for t in types:
            folder, id_col, fields = METADATA_FIELDS[t]
            files = sorted((Path(data_root) / folder).glob("*.parquet"))
            if not files:
                continue
            table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
            missing = [c for c in (id_col, *fields) if c not in table.column_names]
            if missing:
                raise ValueError(f"content_tfidf: {Path(data_root) / folder} has no column(s) {missing}")
            texts[t] = (table[id_col].to_numpy(), [table[c] for c in fields])
        return cls(texts)

    def _rows(self, entity_type: str, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        known, where = self._index.get(entity_type, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        if known.size == 0:
            return np.full(ids.size, -1, dtype=np.int64)
        pos = np.clip(np.searchsorted(known, ids), 0, known.size - 1)
        return np.where(known[pos] == ids, where[pos], -1)

    def _select(self, rows: np.ndarray, owner: np.ndarray | None = None, n: int | None = None) -> sp.csr_matrix:
        """Sum of the vectors of ``rows`` per ``owner`` (default: one output row per input row)."""
        owner = np.arange(rows.size) if owner is None else owner
        found = rows >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum())), (owner[found], rows[found])),
            shape=(rows.size if n is None else n, self.vectors.shape[0]),
        )
        return (selector @ self.vectors).tocsr()

    def score(self, query_type, query_ids, cand_type, cand_ids) -> sp.csr_matrix:
        """[n_q, n_c] cosine of the TF-IDF vectors."""
        q = self._select(self._rows(query_type, query_ids))
        return (q @ self._select(self._rows(cand_type, cand_ids)).T).tocsr()

    def score_users(self, histories, cand_type, cand_ids, user_ids=None) -> sp.csr_matrix:
        """[n_u, n_c] cosine of each candidate with the sum of the history's vectors."""
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = np.concatenate([np.asarray(h, np.int64) for h in histories]) if len(histories) else np.zeros(0, np.int64)
        users = _unit_rows(
            self._select(self._rows("pin", flat), np.repeat(np.arange(len(histories)), lengths), len(histories))
        )
        return (users @ self._select(self._rows(cand_type, cand_ids)).T).tocsr()


def _unit_rows(m: sp.spmatrix) -> sp.csr_matrix:
    m = sp.csr_matrix(m, dtype=np.float64)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).reshape(-1))
    return (sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ m).tocsr()
