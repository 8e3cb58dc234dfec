"""Entity-feature task (paper 3.3.2, eq. 3; A.3.2).

L_feat = E_{(u, N) ~ D_feat} [ 1/|X_u| sum_{x in X_u} L(g_x(u), f_{t_u}(u), f_{t_u}(N)) ]

For every feature type x (``text``; ``image`` when the data set has image vectors) an MLP g_x - 4 layers,
hidden 1024, ReLU, no normalisation in the paper preset - encodes the RAW x-features of ONE node. "We align
the input features of u and the sampled set of nodes v in N(u) with the node embedding" is read as separate
queries: g_x(u) and g_x(v) for every sampled neighbour v (of any type), each a query against f_{t_u}(u) with
the same candidates, and eq. 3's expectation averages their losses:

    L_feat(u) = 1/|X_u| sum_{x in X_u} 1/|S_x(u)| sum_{w in S_x(u)} L(g_x(w), f_{t_u}(u), f_{t_u}(N))

with S_x(u) = the nodes of {u} U N(u) (padding and masked neighbours excluded) that have x, and X_u = the
feature types with a non-empty S_x(u); a node with none contributes 0. A query g_x(w) never meets w itself
as a negative (its key is masked, as for entity-entity queries). Queries are L2-normalised (eq. 1 scores
unit vectors). g_text reads tokens through its own hash-embedding table (the raw side must not share
parameters with the embedder it is contrasted with, or the task could be solved by the shared table alone).

Evaluation (``queries``) uses the node's own query g_x(u), for the nodes that have x: the per-node reading
makes g_x a map from one node's features to its neighbourhood's entity, and u's own features are the query
that exists for a node whatever its neighbourhood.
"""

from __future__ import annotations

import torch
from torch import nn

from ml.batches import FeatureTaskBatch
from ml.config import ModelConfig
from ml.encoders import MLP, HashTextEncoder, l2_normalize
from ml.losses import entity_key


class EntityFeatureTask(nn.Module):
    name = "entity_feature"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ft = cfg.feature_task
        self.text = HashTextEncoder(ft.text_hash)
        dims = lambda d_in: [d_in] + [ft.hidden] * (ft.layers - 1) + [cfg.out_dim]
        self.g = nn.ModuleDict({"text": MLP(dims(ft.text_hash.dim), "relu")})
        self.max_neighbor_queries = ft.max_neighbor_queries
        self.image_dim = cfg.image_dim
        if cfg.image_dim > 0:
            self.g["image"] = MLP(dims(cfg.image_dim), "relu")

    def slot_queries(self, x, rows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """g_x(w) of the table rows ``rows`` (any shape S, -1 = none) -> {x: (unit [*S, d], has_x(w) [*S])}."""
        t = x.table
        flat = rows.clamp_min(0).reshape(-1)
        live = (rows >= 0).reshape(-1)
        if flat.device.type == "cpu" and flat.numel() < len(t):
            # the step's shared table holds every entity of this type; encode only the rows queried here
            # (on the host: unique() would synchronise a device)
            needed, flat = torch.unique(flat, return_inverse=True)
            t = t.take(needed)
        out = {}
        # text of every distinct entity of the table in one EmbeddingBag call, then gathered per slot
        vec, has = self.text(t.token_ids, torch.where(t.present, t.token_lengths, 0))
        q = self._per_row("text", vec, flat)
        out["text"] = (q.reshape(*rows.shape, -1), (has.index_select(0, flat) & live).reshape(rows.shape))
        if self.image_dim > 0:
            has_img = t.image_mask & t.present
            q = self._per_row("image", torch.where(has_img[:, None], t.image, 0), flat)
            out["image"] = (
                q.reshape(*rows.shape, -1),
                (has_img.index_select(0, flat) & live).reshape(rows.shape),
            )
        return out

    def _per_row(self, kind: str, features: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Unit g_x of the table rows ``flat``: g_x depends on the row alone, so when the slots outnumber the
        table's distinct entities (training: B (1 + K) slots over one step table) it runs once per row."""
        if flat.numel() >= features.shape[0]:
            return l2_normalize(self.g[kind](features)).index_select(0, flat)
        return l2_normalize(self.g[kind](features.index_select(0, flat)))

    def query_columns(self, x) -> torch.Tensor:
        """Neighbour columns whose nodes get a query: the first (highest-proximity) columns of every block, in
        proportion to the block's k_t, at most ``max_neighbor_queries`` in all (all when None)."""
        cap, width = self.max_neighbor_queries, int(x.neighbor_mask.shape[1])
        if cap is None or cap >= width:
            return torch.arange(width)
        cols, start = [], 0
        for _, _, k in x.layout_key:
            take = min(k, max(1, round(cap * k / width)))
            cols.extend(range(start, start + take))
            start += k
        return torch.tensor(cols, dtype=torch.int64)

    def queries(self, x) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """EntityTensors -> {feature type x: (g_x(u) of u's own x-features, unit [B, d], u has x bool [B])}:
        the evaluation query (module docstring)."""
        return self.slot_queries(x, x.own_row)

    def forward(self, model, batch: FeatureTaskBatch) -> dict[str, torch.Tensor]:
        entities = [batch.nodes] + ([batch.random_negatives] if batch.random_negatives is not None else [])
        embs, tensors = model.embed_many(entities, where="FeatureTaskBatch")
        pos = embs[0]
        n = embs[1] if len(embs) > 1 else None
        x = tensors[0]
        own_keys = model.keys(x)
        cands = model.candidates(
            self.name,
            positive_type=x.entity_type,
            positive=pos,
            positive_keys=own_keys,
            negatives=n,
            negative_keys=None if n is None else model.keys(tensors[1]),
            negative_log_q=batch.random_negative_log_q,
        )
        cols = self.query_columns(x).to(x.neighbor_mask.device)
        mask, nb_rows = x.neighbor_mask.index_select(1, cols), x.neighbor_row.index_select(1, cols)
        b, k = mask.shape
        # slot 0 = u itself, slots 1..k = its sampled neighbours v (masked ones get no query)
        rows = torch.cat([x.own_row[:, None], torch.where(mask, nb_rows, -1)], dim=1)
        nb_keys = entity_key(
            x.column_node_type.index_select(0, cols)[None, :].expand(b, k),
            x.neighbor_ids.index_select(1, cols),
        )
        slot_keys = torch.cat([own_keys.to(nb_keys.device)[:, None], nb_keys], dim=1).reshape(-1)
        targets = torch.arange(b, device=pos.device).repeat_interleave(k + 1)  # every slot's positive: f(u)
        qs = self.slot_queries(x, rows)
        has = torch.stack([h for _, h in qs.values()]).to(torch.float32)  # [|X|, B, 1 + K]
        n_nodes = has.sum(-1, keepdim=True)  # |S_x(u)|
        n_x = (n_nodes > 0).sum(0, keepdim=True).clamp_min(1)  # |X_u|
        # weight of query g_x(w): 1/|X_u| * 1/|S_x(u)| for w in S_x(u), else 0; the softmax averages over
        # its B (1 + K) queries, so (1 + K) brings the mean back to one per node u (eq. 3's expectation)
        w = has / n_nodes.clamp_min(1) / n_x * (k + 1)
        loss = pos.new_zeros(())
        for i, (q, _) in enumerate(qs.values()):
            q, wi, keys, tg = q.reshape(b * (k + 1), -1), w[i].reshape(-1), slot_keys, targets
            if q.device.type == "cpu":
                # padding slots weigh 0: on the host, drop them (no device sync to avoid here) and rescale, as
                # the loss divides by its number of queries
                keep = torch.nonzero(wi > 0).squeeze(1)
                scale = keep.numel() / max(1, wi.numel())
                q, wi, keys, tg = (
                    q.index_select(0, keep),
                    wi.index_select(0, keep) * scale,
                    keys.index_select(0, keep),
                    tg.index_select(0, keep),
                )
                if keep.numel() == 0:
                    continue
            loss = loss + model.softmax_loss(q, cands, weights=wi, query_keys=keys, targets=tg)
        return {"": loss}
