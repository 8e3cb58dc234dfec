"""BatchBuilder: node ids -> ``EntityBatch`` (the node's own features plus its neighbourhood's, paper 3.2,
3.4.1 and 3.5).

For B nodes of one type: look the nodes up in the snapshot, take their sampled neighbourhoods (a
``NeighborhoodCache`` or an on-the-fly ``NeighborSampler``; blocks in ``NeighborhoodLayout`` order, each
score-descending), de-duplicate every entity the batch needs (the B nodes and all their neighbours) and
read them with ONE ``Featurizer.fetch`` (one RocksDB multi_get), then scatter the decoded rows back with
numpy indexing. A node outside the graph (pruned, or never engaged) keeps its own features from the store
and gets an all-padding neighbourhood: "for entities pruned from the graph or lacking edges, we impute
zeros for their neighbor features" (3.5).
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from graph_engine.batch import (
    NODE_TYPE_CODE,
    CompactEntityBatch,
    EntityBatch,
    FeatureArrays,
    NeighborhoodLayout,
)


class BatchBuilder:
    supports_compact = True  # build(..., compact=True) returns a CompactEntityBatch

    def __init__(self, snapshot, neighborhoods, featurizer, layout: NeighborhoodLayout | None = None):
        self.snapshot = snapshot
        self.neighborhoods = neighborhoods
        self.featurizer = featurizer
        self.layout = layout or getattr(neighborhoods, "layout", None) or NeighborhoodLayout.paper_default()
        nb_layout = getattr(neighborhoods, "layout", None)
        if nb_layout is not None and nb_layout != self.layout:
            raise ValueError(
                f"BatchBuilder: layout {self.layout} differs from the neighbourhood source's layout {nb_layout}"
            )
        self._get = getattr(neighborhoods, "get", None) or neighborhoods.sample
        self._column_type = self.layout.column_node_type()
        #: statistics of the last build (keys requested vs unique keys read), for benchmarks and logs
        self.last_stats: dict[str, int] = {}

    def build(self, entity_type: str, entity_ids, compact: bool = False) -> EntityBatch | CompactEntityBatch:
        """``compact``: a ``CompactEntityBatch`` (each distinct entity's features once, no B x K copy)."""
        if entity_type not in NODE_TYPE_CODE:
            raise ValueError(f"BatchBuilder.build: entity_type {entity_type!r} not in {list(NODE_TYPE_CODE)}")
        code = NODE_TYPE_CODE[entity_type]
        ids = np.asarray(entity_ids, dtype=np.int64).reshape(-1)
        b, k = ids.shape[0], self.layout.width

        dense = np.asarray(self.snapshot.lookup(np.int8(code), ids), dtype=np.int64)  # -1 = outside the graph
        nb = self._get(dense)
        index = np.asarray(nb.index, dtype=np.int64)
        if index.shape != (b, k):
            raise ValueError(
                f"BatchBuilder: neighbourhood index has shape {index.shape}, expected {(b, k)} for layout width {k}"
            )
        mask = np.asarray(nb.mask, dtype=bool) & (index >= 0) & (dense >= 0)[:, None]
        index = np.where(mask, index, -1)
        scores = np.where(mask, np.asarray(nb.scores, dtype=np.float32), np.float32(0))

        node_type = np.asarray(self.snapshot.node_type)
        node_id = np.asarray(self.snapshot.node_id)
        if mask.any():
            wrong = mask & (node_type[np.maximum(index, 0)] != self._column_type[None, :])
            if wrong.any():
                r, c = np.argwhere(wrong)[0]
                raise ValueError(
                    f"BatchBuilder: neighbour column {c} holds a node of type code {node_type[index[r, c]]}, "
                    f"but the layout's block there is of type code {self._column_type[c]}"
                )

        # De-duplicate: graph entities by dense index (own in-graph nodes + all neighbours, -1 = padding
        # row), entities outside the graph by id. One fetch for all of them.
        in_graph = dense >= 0
        graph_keys = np.concatenate([dense[in_graph], index.reshape(-1)])
        uniq, inv = np.unique(graph_keys, return_inverse=True)
        out_ids = ids[~in_graph]
        uniq_out, inv_out = np.unique(out_ids, return_inverse=True)
        feats = self._fetch(uniq, uniq_out, code, node_type, node_id)

        n_own_graph = int(in_graph.sum())
        own_row = np.empty(b, dtype=np.int64)
        own_row[in_graph] = inv[:n_own_graph]
        own_row[~in_graph] = uniq.size + inv_out
        nb_row = inv[n_own_graph:].reshape(b, k)

        safe_index = np.maximum(index, 0)
        neighbor_ids = np.where(mask, node_id[safe_index], -1).astype(np.int64)
        self.last_stats = {
            "nodes": b,
            "nodes_outside_graph": int((~in_graph).sum()),
            "neighbor_slots": int(mask.sum()),
            "keys_requested": b + int(mask.sum()),
            "keys_fetched": int((uniq >= 0).sum()) + int(uniq_out.size),
        }
        common = {
            "entity_type": entity_type,
            "entity_ids": ids,
            "neighbor_ids": neighbor_ids,
            "neighbor_scores": scores.astype(np.float32),
            "neighbor_mask": mask,
            "layout": self.layout,
        }
        if compact:
            safe = np.maximum(uniq, 0)
            keys = np.stack([np.where(uniq >= 0, node_type[safe], -1), np.where(uniq >= 0, node_id[safe], -1)], 1)
            out_keys = np.stack([np.full(uniq_out.size, code), uniq_out], 1)
            return CompactEntityBatch(
                table=feats,
                own_row=own_row,
                neighbor_row=np.where(mask, nb_row, -1),
                table_keys=np.concatenate([keys, out_keys]).astype(np.int64),
                table_nodes=np.concatenate([uniq, np.full(uniq_out.size, -1, np.int64)]),
                **common,
            )
        return EntityBatch(features=feats.take(own_row), neighbor_features=feats.take(nb_row), **common)

    def _fetch(self, uniq: np.ndarray, uniq_out: np.ndarray, code: int, node_type, node_id):
        """Features of the distinct graph nodes ``uniq`` (dense index, -1 = padding: a zero row) followed by
        the distinct ids ``uniq_out`` of type ``code`` outside the graph. An in-memory ``FeatureTable``
        indexed by the snapshot gathers graph nodes by dense index; otherwise one keyed fetch."""
        fetch_nodes = getattr(self.featurizer, "fetch_nodes", None)
        if fetch_nodes is not None and getattr(self.featurizer, "node_row", None) is not None:
            inside = fetch_nodes(uniq)
            if uniq_out.size == 0:
                return inside
            outside = self.featurizer.fetch(code, uniq_out)
            return FeatureArrays(
                **{
                    f.name: np.concatenate([getattr(inside, f.name), getattr(outside, f.name)])
                    for f in fields(FeatureArrays)
                }
            )
        safe = np.maximum(uniq, 0)
        fetch_codes = np.concatenate([node_type[safe].astype(np.int64), np.full(uniq_out.size, code, np.int64)])
        fetch_ids = np.concatenate([node_id[safe], uniq_out])
        fetch_valid = np.concatenate([uniq >= 0, np.ones(uniq_out.size, dtype=bool)])
        return self.featurizer.fetch(fetch_codes, fetch_ids, valid=fetch_valid)
