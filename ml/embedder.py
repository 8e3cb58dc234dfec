"""Per-type embedder f_t (paper 3.2, A.3.1).

Sequence fed to the transformer, one row per node u:

    [CLS, text(u), image(u) (only when the data set has images), degree(u), v_1, ..., v_K]

- own feature tokens: each feature vector projected to d_model plus a learned token-kind embedding;
  a missing feature uses a learned "missing" vector (no record / no value, ml.encoders);
- neighbour tokens: each neighbour's features (text, image, degree, proximity score) through an MLP
  ("The neighbor features are then passed through an MLP"), plus learned embeddings of its block
  (relation subset x node type), its node type and its rank inside the block. Blocks arrive in descending
  proximity order (graph_engine.batch), so the rank embedding carries the paper's ordering Seq(u);
- a transformer encoder with ``src_key_padding_mask`` (padding neighbours are never attended to) and no
  causal mask (A.3.1: the CLS token must see everything); the CLS output -> MLP head -> L2 normalisation.

There is no absolute position embedding: a padding column (mask False) is invisible, and adding padding
columns after a block's real entries leaves every real token (and its rank) unchanged - so padding can
never change an embedding.

``aggregator="mean"`` replaces the transformer by a masked mean of the same own + neighbour tokens
(PinSage-like baseline / A.2.4 ablation).
"""

from __future__ import annotations

import torch
from torch import nn

from ml.config import ModelConfig
from ml.encoders import MLP, EntityFeatureEncoder, IdHashEncoder, l2_normalize, score_features
from ml.entity_tensors import EntityTensors
from ml.losses import entity_key

NUM_NODE_TYPES = 2


def cls_only_layer(layer: nn.TransformerEncoderLayer, seq: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The last (pre-norm) encoder layer evaluated for the CLS position only -> [B, d].

    Only f_t's CLS output is read (A.3.1), and in the last layer no other position feeds it except through
    keys and values, so the queries, the attention rows and the feed-forward of the 1 + n_own + K - 1 other
    positions are skipped: the same function as ``layer(seq)[:, 0]`` at about 1/T of the query-side cost."""
    h = layer.norm1(seq)
    attn = layer.self_attn(h[:, :1], h, h, key_padding_mask=pad, need_weights=False)[0]
    y = seq[:, :1] + layer.dropout1(attn)
    z = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(y)))))
    return (y + layer.dropout2(z))[:, 0]


class EntityEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig, entity_type: str):
        super().__init__()
        e = cfg.embedder
        d = e.d_model
        self.entity_type = entity_type
        self.cfg = cfg
        self.aggregator = e.aggregator
        self.features = EntityFeatureEncoder(cfg.text, cfg.image_dim, e.image_hidden, e.image_hidden)
        self.has_image = cfg.image_dim > 0
        # own tokens
        self.text_proj = nn.Linear(self.features.text_dim, d)
        self.image_proj = nn.Linear(e.image_hidden, d) if self.has_image else None
        self.degree_proj = nn.Linear(2, d)
        self.identity = IdHashEncoder(e.id_buckets, d, e.id_hashes) if e.id_buckets > 0 else None
        self.num_own = (3 if self.has_image else 2) + (self.identity is not None)
        # the identity also goes straight to the output (a skip past the aggregator): f_t(u) can then be as
        # free per entity as an ID embedding where training supports it, and falls back to the aggregated
        # content + neighbourhood elsewhere
        self.identity_out = nn.Linear(d, cfg.out_dim, bias=False) if self.identity is not None else None
        self.own_kind = nn.Parameter(torch.randn(self.num_own, d) * 0.02)
        # neighbour tokens
        nb_in = self.features.text_dim + (e.image_hidden if self.has_image else 0) + 2 + 2
        self.neighbor_mlp = MLP([nb_in, e.neighbor_hidden, d])
        self.block_emb = nn.Embedding(e.max_blocks, d)
        self.type_emb = nn.Embedding(NUM_NODE_TYPES, d)
        self.rank_emb = nn.Embedding(e.max_rank, d)
        for emb in (self.block_emb, self.type_emb, self.rank_emb):
            nn.init.normal_(emb.weight, std=0.02)
        if self.aggregator == "transformer":
            self.cls = nn.Parameter(torch.randn(d) * 0.02)
            layer = nn.TransformerEncoderLayer(
                d,
                e.n_heads,
                e.ffn_dim,
                dropout=e.dropout,
                activation=e.activation,
                batch_first=True,
                norm_first=True,
            )
            # nested tensors off: the same kernels whatever the padding, and training == eval numerics
            self.encoder = nn.TransformerEncoder(layer, e.n_layers, enable_nested_tensor=False)
            self.final_norm = nn.LayerNorm(d)
        else:
            self.final_norm = nn.LayerNorm(d)
        self.head = MLP([d, e.head_hidden, cfg.out_dim])

    def tokens(self, x: EntityTensors, encoded=None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [B, num_own + K, d], valid [B, num_own + K]). ``encoded``: ``self.features(x.table)``
        when the caller already has it (inference's ``ml.inference.EncodedFeatureCache``)."""
        if x.entity_type != self.entity_type:
            raise ValueError(f"embedder for {self.entity_type!r} got a batch of {x.entity_type!r}")
        nb = x.num_blocks
        if nb > self.cfg.embedder.max_blocks:
            raise ValueError(
                f"EntityBatch.layout has {nb} neighbour blocks; EmbedderConfig.max_blocks is {self.cfg.embedder.max_blocks}"
            )
        # raw features are encoded once per distinct entity of the batch (the table), then gathered per slot
        enc = self.features(x.table) if encoded is None else encoded
        own = {name: enc[name].index_select(0, x.own_row) for name in ("text", "image", "degree") if name in enc}
        toks = [self.text_proj(own["text"])]
        if self.has_image:
            toks.append(self.image_proj(own["image"]))
        toks.append(self.degree_proj(own["degree"]))
        mask = x.neighbor_mask
        if self.identity is not None:  # last own token: read by forward
            toks.append(
                self.identity(entity_key(x.type_code, x.entity_ids)) * self.identity_kept(own["degree"][:, 0] > 0)
            )
        own_tok = torch.stack(toks, dim=1) + self.own_kind  # [B, n_own, d]

        b, k = mask.shape
        slot = x.neighbor_row.clamp_min(0).reshape(-1)
        nf = {
            name: enc[name].index_select(0, slot).reshape(b, k, enc[name].shape[-1])
            for name in ("text", "image", "degree")
            if name in enc
        }
        parts = (
            [nf["text"]]
            + ([nf["image"]] if self.has_image else [])
            + [nf["degree"] * mask[..., None].to(nf["degree"].dtype), score_features(x.neighbor_scores, mask)]
        )
        nb_in = torch.cat([p.to(parts[0].dtype) for p in parts], dim=-1)
        rank = x.column_rank.clamp_max(self.cfg.embedder.max_rank - 1)
        nb_tok = (
            self.neighbor_mlp(nb_in)
            + self.block_emb(x.column_block)[None]
            + self.type_emb(x.column_node_type)[None]
            + self.rank_emb(rank)[None]
        )  # [B, K, d]
        if self.identity is not None:
            nb_id = self.identity(entity_key(x.column_node_type[None], x.neighbor_ids.clamp_min(0)))
            nb_tok = nb_tok + nb_id * self.identity_kept(mask)
        # zero padding tokens: with the key-padding mask they are unseen anyway; zeros keep the mean path exact
        nb_tok = nb_tok * mask[..., None].to(nb_tok.dtype)
        tokens = torch.cat([own_tok, nb_tok.to(own_tok.dtype)], dim=1)
        valid = torch.cat([torch.ones(own_tok.shape[:2], dtype=torch.bool, device=mask.device), mask], dim=1)
        return tokens, valid

    def identity_kept(self, present: torch.Tensor) -> torch.Tensor:
        """Float [..., 1]: 1 where an identity token is used. An entity of degree 0 in the day's graph (never
        engaged in the window: cold) gets none - its ID row was only ever pushed away as a random
        negative - and in training ``id_dropout`` of the rest lose theirs, so that the content + graph path
        learns to stand alone (the paper's content-only f_t for the entities training never saw)."""
        keep = present
        p = self.cfg.embedder.id_dropout
        if self.training and p > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= p)
        return keep[..., None].to(self.identity.table.weight.dtype)

    def forward(self, x: EntityTensors, encoded=None) -> torch.Tensor:
        """-> f_t(u): float32 [B, out_dim], unit L2 norm (``encoded``: as in ``tokens``)."""
        tokens, valid = self.tokens(x, encoded)
        if self.aggregator == "transformer":
            b = tokens.shape[0]
            seq = torch.cat([self.cls.to(tokens.dtype).expand(b, 1, -1), tokens], dim=1)
            pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=valid.device), ~valid], dim=1)
            for layer in self.encoder.layers[:-1]:
                seq = layer(seq, src_key_padding_mask=pad)
            h = cls_only_layer(self.encoder.layers[-1], seq, pad)
        else:
            w = valid.to(tokens.dtype)[..., None]
            h = (tokens * w).sum(1) / w.sum(1)
        out = self.head(self.final_norm(h))
        if self.identity_out is not None:
            out = out + self.identity_out(tokens[:, self.num_own - 1])
        return l2_normalize(out)
