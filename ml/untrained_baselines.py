"""The recall report's baselines with nothing to fit (``ml.baselines`` lists them all): random vectors, the
oracle's planted latents, graph popularity and graph item co-occurrence.

- ``random_baseline``: an independent Gaussian vector per entity and per user - the chance level,
  about k / (pool + 1).
- ``PopularityEmbedder``: every query ranks candidates by popularity, 1 + log(1 + degree) in the day's graph
  snapshot (the pruned graph keeps degree order: d_target = d^alpha is monotone, A.1). Scores are a product
  q.c = pop(q) * pop(c) with pop > 0, so for one query the ranking is by pop(c) alone.
- ``CooccurrenceEmbedder``: item co-occurrence on the same graph. Entity e is the sparse indicator of
  itself plus its neighbours, x_e = e + A_e, so x_q . x_c = |N(q) & N(c)| + [c in N(q)] + [q in N(c)] +
  [q = c]: the number of boards/pins both were engaged with (plus direct co-engagement). A user is the sum
  of the x of the pins in their history. ``exclude_neighbor_ids`` removes the evaluation pair's own edge.
  Vectors are ``scipy.sparse`` rows (the evaluator scores them exactly, ``ml.metrics.recall_at_k_sparse``).
- ``oracle_baseline``: the generator's planted latent vectors (``DIR/_truth``): pins and boards by their
  latent, users by their drifted interest on the evaluation day.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from graph_engine.batch import NODE_TYPE_CODE
from ml.evaluator import TableEmbedder, random_embedder


class RandomUserEmbedder:
    """A fresh Gaussian vector per user, seeded by the user id (mod 2**64: negative ids are ids too), so the
    same user gets the same vector."""

    def __init__(self, dim: int = 32, seed: int = 0):
        self.dim, self.seed = dim, seed

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        ids = np.arange(len(histories)) if user_ids is None else np.asarray(user_ids, dtype=np.int64)
        return (
            np.stack(
                [np.random.default_rng([self.seed, int(u) % 2**64]).standard_normal(self.dim) for u in ids]
            ).astype(np.float32)
            if len(ids)
            else np.zeros((0, self.dim), np.float32)
        )


def random_baseline(universe: dict[str, np.ndarray], dim: int = 32, seed: int = 0):
    """(EntityEmbedder, UserEmbedder) of independent random vectors."""
    return random_embedder(universe, dim=dim, seed=seed), RandomUserEmbedder(dim=dim, seed=seed + 1)


class TableUserEmbedder:
    """Users looked up by id in a table (the oracle's planted interests); unknown users get zeros."""

    def __init__(self, user_ids: np.ndarray, vectors: np.ndarray):
        self.table = TableEmbedder({"user": (user_ids, vectors)})

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        if user_ids is None:
            raise ValueError("TableUserEmbedder needs the evaluation users' ids")
        return self.table.embed("user", user_ids)


def oracle_baseline(truth, day: str):
    """(EntityEmbedder, UserEmbedder) of the planted latent vectors (``ml.truth.Truth``)."""
    entities = TableEmbedder({"pin": (truth.pin_id, truth.pin_latent), "board": (truth.board_id, truth.board_latent)})
    return entities, TableUserEmbedder(truth.user_id, truth.user_latents_on_day(day))


class PopularityEmbedder:
    """1-d vectors pop(e) = 1 + log(1 + degree(e)); users are the constant 1 (module docstring)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        self.pop = 1.0 + np.log1p(np.asarray(snapshot.degree(), dtype=np.float64))

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> np.ndarray:
        rows = self.snapshot.lookup(NODE_TYPE_CODE[entity_type], np.asarray(ids, dtype=np.int64))
        out = np.ones((rows.size, 1), dtype=np.float32)  # not in the graph: degree 0
        found = rows >= 0
        out[found, 0] = self.pop[rows[found]]
        return out

    def embed_users(self, histories, user_ids=None) -> np.ndarray:
        return np.ones((len(histories), 1), dtype=np.float32)


class CooccurrenceEmbedder:
    """Sparse x_e = e + A_e over the snapshot's nodes, all relation subsets merged (module docstring)."""

    def __init__(self, snapshot):
        self.snapshot = snapshot
        n = snapshot.num_nodes
        merged = None
        for subset in snapshot.subsets:
            indptr, indices, _ = snapshot.csr(subset)
            a = sp.csr_matrix(
                (
                    np.ones(len(indices), dtype=np.float32),
                    np.asarray(indices, dtype=np.int64),
                    np.asarray(indptr),
                ),
                shape=(n, n),
            )
            merged = a if merged is None else merged.maximum(a)
        adjacency = merged if merged is not None else sp.csr_matrix((n, n), dtype=np.float32)
        adjacency = adjacency.maximum(adjacency.T)  # co-engagement is symmetric
        self.x = (adjacency + sp.identity(n, dtype=np.float32, format="csr")).tocsr()
        self.x.data[:] = 1.0  # indicators: a pair counts once however many relation subsets hold it
        self.x.sort_indices()

    def _rows(self, entity_type: str, ids) -> np.ndarray:
        return self.snapshot.lookup(NODE_TYPE_CODE[entity_type], np.asarray(ids, dtype=np.int64).reshape(-1))

    def embed(self, entity_type, ids, exclude_neighbor_ids=None) -> sp.csr_matrix:
        rows = self._rows(entity_type, ids)
        found = rows >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum()), np.float32), (np.flatnonzero(found), rows[found])),
            shape=(rows.size, self.snapshot.num_nodes),
        )
        out = (selector @ self.x).tocsr()
        if exclude_neighbor_ids is not None:
            # The pair's own edge: drop the other end from this row (both ends are pins or boards; the
            # excluded id's type is whichever of the two holds it, so look it up under both).
            ex = np.asarray(exclude_neighbor_ids, dtype=np.int64).reshape(-1)
            drop = np.full(ex.size, -1, dtype=np.int64)
            for t in ("pin", "board"):
                hit = self._rows(t, ex)
                drop = np.where((drop < 0) & (hit >= 0), hit, drop)
            drop = np.where(drop == rows, -1, drop)  # never the entity itself
            entry_row = np.repeat(np.arange(rows.size), np.diff(out.indptr))
            out.data[out.indices == drop[entry_row]] = 0.0
            out.eliminate_zeros()
        return out

    def embed_users(self, histories, user_ids=None) -> sp.csr_matrix:
        lengths = np.array([len(h) for h in histories], dtype=np.int64)
        flat = (
            np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
            if len(histories)
            else np.zeros(0, np.int64)
        )
        rows = self._rows("pin", flat)
        owner = np.repeat(np.arange(len(histories)), lengths)
        found = rows >= 0
        selector = sp.csr_matrix(
            (np.ones(int(found.sum()), np.float32), (owner[found], rows[found])),
            shape=(len(histories), self.snapshot.num_nodes),
        )
        return (selector @ self.x).tocsr()
