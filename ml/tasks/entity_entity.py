"""Entity-entity task (paper 3.3.1, eq. 2).

L_pair = sum_i E_{(q, p, N) ~ D_pair^(i)} [ w_i L(f_{t_q}(q), f_{t_p}(p), f_{t_p}(N)) ]

A ``PairBatch`` mixes pairs of all sources of one (t_q, t_p) type pair; the per-pair weight ``weights[j]``
is w_i of pair j's source, so the batch mean of w_i * L is a sample of the weighted sum of eq. 2. There is
no task-specific architecture (A.3.2): the similarities go straight into the sampled softmax, whose
candidates are the batch's positives (in-batch negatives, logQ from the count-min sketch) and random
negatives of type t_p (logQ from their sampler). The query entity q itself is never a negative.
"""

from __future__ import annotations

import torch
from torch import nn

from ml.batches import PairBatch


class EntityEntityTask(nn.Module):
    name = "entity_entity"

    def forward(self, model, batch: PairBatch) -> dict[str, torch.Tensor]:
        entities = [batch.query, batch.positive] + (
            [batch.random_negatives] if batch.random_negatives is not None else []
        )
        embs, tensors = model.embed_many(entities, where="PairBatch")
        q, p = embs[0], embs[1]
        n = embs[2] if len(embs) > 2 else None
        cands = model.candidates(
            self.name,
            positive_type=tensors[1].entity_type,
            positive=p,
            positive_keys=model.keys(tensors[1]),
            negatives=n,
            negative_keys=None if n is None else model.keys(tensors[2]),
            negative_log_q=batch.random_negative_log_q,
        )
        w = None
        if batch.weights is not None:
            w = torch.as_tensor(batch.weights, dtype=torch.float32, device=q.device)
        # the query entity is masked as a candidate: for t_q == t_p it can be another pair's positive or a
        # random negative, scored lambda * 1 against itself (keys carry the type, so t_q != t_p never hits)
        return {"": model.softmax_loss(q, cands, weights=w, query_keys=model.keys(tensors[0]))}
