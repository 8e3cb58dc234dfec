"""User-entity task (paper 3.3.3, eqs. 4-5; A.3.2-A.3.3).

A causal transformer T (4 layers, 4 heads, dim 512, GELU in the paper preset) reads the user's sequence
[P_1..P_t] with P_t = f_{t_u}(u_t) computed WITH gradients through the embedders (A.3.2: "with gradients
through the embedders producing the embedding"; the public code's no_grad would stop the sequence loss
from training f). Each entity of a batch is embedded once (``SequenceBatch.entities``) and gathered into
the sequences, so a pin repeated across users costs one embedder pass and receives all its gradients.

- next action (eq. 4): query U_t, positive P_{t+1}, for every t whose t+1 is not padding;
- future action (eq. 5): query U_t for every valid t, positive P_{t'} with t' drawn by the data path from
  (t_max, t_max + Delta] (``future_index``; -1 = none).

Candidates are the positives drawn for the batch plus the random negatives: for next action the P_{t+1}
of every query, for future action each user's P_{t'} ONCE (one draw per user, the target of all of that
user's queries U_t: T copies would give every other user T copies of it as negatives, and count T draws
in the logQ sketch). The loss keeps one column per distinct entity (``ml.losses``). Each loss is the
mean over its valid (user, t) positions - eq. 4's padding mask; PinnerFormer [26] averages the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from ml.batches import SequenceBatch
from ml.config import ModelConfig
from ml.encoders import l2_normalize


class UserEntityTask(nn.Module):
    name = "user_entity"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.sequence
        self.cfg = cfg
        self.max_len = s.max_len
        self.in_proj = nn.Linear(cfg.out_dim, s.d_model)
        self.pos_emb = nn.Embedding(s.max_len, s.d_model)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            s.d_model,
            s.n_heads,
            s.ffn_dim,
            dropout=s.dropout,
            activation=s.activation,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, s.n_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(s.d_model)
        self.out_proj = nn.Linear(s.d_model, cfg.out_dim)

    def user_states(self, seq_emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """[U, T, d] entity embeddings (zeros at padding) + valid [U, T] -> U_t, unit [U, T, d]."""
        t = valid.shape[1]
        if t > self.max_len:
            raise ValueError(
                f"SequenceBatch.sequence_index has {t} steps; SequenceConfig.max_len (t_max) is {self.max_len}"
            )
        h = self.in_proj(seq_emb) + self.pos_emb.weight[:t][None]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=valid.device), diagonal=1)
        # step 0 always visible: an all-padding row would otherwise give NaN through softmax (its outputs
        # are never used, but NaN * 0 would still poison the backward pass)
        pad = ~valid
        pad[:, 0] = False
        h = self.encoder(h, mask=causal, src_key_padding_mask=pad)
        return l2_normalize(self.out_proj(self.final_norm(h)))

    def forward(self, model, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        entities = [batch.entities] + ([batch.random_negatives] if batch.random_negatives is not None else [])
        embs, tensors = model.embed_many(entities, where="SequenceBatch")
        p = embs[0]  # [E, d] each entity once, with gradients
        n = embs[1] if len(embs) > 1 else None
        keys = model.keys(tensors[0])
        n_keys = None if n is None else model.keys(tensors[1])
        dev = p.device
        # positions and targets are computed where the indices live (the host, for loader batches), then
        # copied: boolean-mask indexing on the device would synchronise the host every step
        seq_host = torch.as_tensor(batch.sequence_index, dtype=torch.int64)
        fut_host = None if batch.future_index is None else torch.as_tensor(batch.future_index, dtype=torch.int64)
        pos = loss_positions(seq_host, fut_host, model.config.next_action, model.config.future_action)
        seq = seq_host.to(dev, non_blocking=True)
        valid = seq >= 0
        u, t = seq.shape
        seq_emb = p.index_select(0, seq.clamp_min(0).reshape(-1)).reshape(u, t, -1) * valid[..., None].to(p.dtype)
        states = self.user_states(seq_emb, valid).reshape(u * t, -1)  # [U * T, d]
        out: dict[str, torch.Tensor] = {}
        for part, (where, target, query_target) in pos.items():
            where, target = where.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
            if query_target is not None:
                query_target = query_target.to(dev, non_blocking=True)
            cands = model.candidates(
                f"{self.name}/{part}",
                positive_type=tensors[0].entity_type,
                positive=p.index_select(0, target),
                positive_keys=keys.index_select(0, target),
                negatives=n,
                negative_keys=n_keys,
                negative_log_q=batch.random_negative_log_q,
            )
            out[part] = model.softmax_loss(states.index_select(0, where), cands, targets=query_target)
        return out


def loss_positions(
    seq: torch.Tensor, fut: torch.Tensor | None, next_action: bool, future_action: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """{"next" | "future": (flat (u, t) positions u * T + t of the queries U_t, entity rows of the candidate
    positives, each query's candidate index or None for query i -> candidate i)}.

    next (eq. 4): every t whose t + 1 is valid, positive P_{t+1} (one per query); future (eq. 5): every
    valid t of a user with a future entity, positive P_{t'} - one candidate per such user, the target of all
    of the user's queries."""
    u, t = seq.shape
    valid = seq >= 0
    flat = torch.arange(u * t, dtype=torch.int64).reshape(u, t)
    out = {}
    if next_action and t > 1:
        m = valid[:, :-1] & valid[:, 1:]
        out["next"] = (flat[:, :-1][m], seq[:, 1:][m], None)
    if future_action and fut is not None:
        users = (fut >= 0) & valid.any(dim=1)
        candidate = torch.cumsum(users.to(torch.int64), 0) - 1  # user -> its candidate's index
        m = valid & users[:, None]
        out["future"] = (flat[m], fut[users], candidate[:, None].expand_as(seq)[m])
    return out
