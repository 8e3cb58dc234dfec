"""Entity-feature task (paper 3.3.2, eq. 3; A.3.2).

L_feat = E_{(u, N) ~ D_feat} [ 1/|X_u| sum_{x in X_u} L(g_x(u), f_{t_u}(u), f_{t_u}(N)) ]

For every feature type x (``text``; ``image`` when the data set has image vectors) an MLP g_x - 4 layers,
hidden 1024, ReLU, no normalisation in the paper preset - encodes the RAW features of u and of its sampled
neighbours N(u) ("we align the input features of u and the sampled set of nodes v in N(u) with the node
embedding"): its input is [x-features of u, masked mean of the x-features of u's neighbours, has_x(u),
share of neighbours with x]. The query g_x(u) is L2-normalised (eq. 1 scores unit vectors).

X_u = the feature types that u or at least one of its neighbours has; a node with none contributes 0.
g_text reads tokens through its own hash-embedding table (the raw side must not share parameters with
the embedder it is contrasted with, or the task could be solved by the shared table alone).
"""

from __future__ import annotations

import torch
from torch import nn

from ml.config import ModelConfig
from ml.data import FeatureTaskBatch
from ml.encoders import MLP, HashTextEncoder, l2_normalize


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.to(x.dtype)[..., None]
    cnt = w.sum(-2)
    return (x * w).sum(-2) / cnt.clamp_min(1), cnt


class EntityFeatureTask(nn.Module):
    name = "entity_feature"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ft = cfg.feature_task
        self.text = HashTextEncoder(ft.text_hash)
        dims = lambda d_in: [d_in] + [ft.hidden] * (ft.layers - 1) + [cfg.out_dim]
        self.g = nn.ModuleDict({"text": MLP(dims(2 * ft.text_hash.dim + 2), "relu")})
        self.image_dim = cfg.image_dim
        if cfg.image_dim > 0:
            self.g["image"] = MLP(dims(2 * cfg.image_dim + 2), "relu")

    def queries(self, x) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """EntityTensors -> {feature type: (g_x(u) unit [B, d], x in X_u bool [B])}."""
        out = {}
        t, mask = x.table, x.neighbor_mask
        b, k = mask.shape
        slot = x.neighbor_row.clamp_min(0).reshape(-1)
        # text of every distinct entity of the batch in one EmbeddingBag call, then gathered per slot
        vec, has = self.text(t.token_ids, torch.where(t.present, t.token_lengths, 0))
        own_t, own_has = vec.index_select(0, x.own_row), has.index_select(0, x.own_row)
        nb_t = vec.index_select(0, slot).reshape(b, k, vec.shape[-1])  # k may be 0
        nb_has = has.index_select(0, slot).reshape(b, k) & mask
        out["text"] = self._encode("text", own_t, own_has, nb_t, nb_has, mask)
        if self.image_dim > 0:
            has_img = t.image_mask & t.present
            img = torch.where(has_img[:, None], t.image, 0)
            own_has = has_img.index_select(0, x.own_row)
            nb_has = has_img.index_select(0, slot).reshape(b, k) & mask
            own_i = img.index_select(0, x.own_row)
            nb_i = img.index_select(0, slot).reshape(b, k, img.shape[-1])
            out["image"] = self._encode("image", own_i, own_has, nb_i, nb_has, mask)
        return out

    def _encode(self, kind, own, own_has, nb, nb_has, mask):
        own = own * own_has[:, None].to(own.dtype)
        nb_mean, cnt = _masked_mean(nb, nb_has)
        share = cnt / mask.sum(-1, keepdim=True).clamp_min(1).to(cnt.dtype)
        inp = torch.cat([own, nb_mean, own_has[:, None].to(own.dtype), share.to(own.dtype)], dim=-1)
        available = own_has | nb_has.any(-1)
        return l2_normalize(self.g[kind](inp)), available

    def forward(self, model, batch: FeatureTaskBatch) -> dict[str, torch.Tensor]:
        entities = [batch.nodes] + ([batch.random_negatives] if batch.random_negatives is not None else [])
        embs, tensors = model.embed_many(entities, where="FeatureTaskBatch")
        pos = embs[0]
        n = embs[1] if len(embs) > 1 else None
        cands = model.candidates(
            self.name,
            positive=pos,
            positive_keys=model.keys(tensors[0]),
            negatives=n,
            negative_keys=None if n is None else model.keys(tensors[1]),
            negative_log_q=batch.random_negative_log_q,
        )
        qs = self.queries(tensors[0])
        avail = torch.stack([a for _, a in qs.values()], dim=0).to(torch.float32)  # [|X|, B]
        n_x = avail.sum(0).clamp_min(1)  # |X_u|
        loss = pos.new_zeros(())
        for i, (q, _) in enumerate(qs.values()):
            # weight 1/|X_u| for x in X_u, 0 otherwise: the batch mean is eq. 3's expectation
            loss = loss + model.softmax_loss(q, cands, weights=avail[i] / n_x)
        return {"": loss}
