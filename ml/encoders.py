"""Feature encoders (paper 3.2): hashed text, image vectors, degree, neighbour proximity score.

Text - hash embeddings (ref [34], Svenstrup et al. 2017). A token id (a uint32 n-gram hash from
``graph_engine.tokenizer``) is mapped by k hash functions h_1..h_k to k rows of ONE shared table E; the token
vector is sum_j p_j(token) * E[h_j(token)] with learned importance weights p(token) in R^k looked up by a
further hash. A text's vector is the mean over its tokens. Everything is one ``nn.EmbeddingBag`` call
(``per_sample_weights`` = importance / length, ``offsets`` = row starts): no Python loop over rows or tokens.

Token ids past ``token_lengths`` are never read (they are padding by position, not by value), so garbage
there cannot change an embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ml.config import TextHashConfig

# Universal hashing ((a * x + b) mod P) mod m with the Mersenne prime P = 2^31 - 1: x mod P < 2^31 and
# a < 2^31, so a * x + b < 2^62 stays inside int64 on every device.
_P = (1 << 31) - 1


class HashTextEncoder(nn.Module):
    """token_ids int64 [R, L] + lengths [R] -> (text vector float [R, dim], has_text bool [R])."""

    dedupe_tokens = True  # the CPU path below; the same values and gradients either way

    def __init__(self, cfg: TextHashConfig):
        super().__init__()
        self.cfg = cfg
        self.table = nn.EmbeddingBag(cfg.num_buckets, cfg.dim, mode="sum")
        nn.init.normal_(self.table.weight, std=cfg.dim**-0.5)
        # importance weights p(token) in R^k; start at 1/k (an unweighted mean of the k rows)
        self.importance = nn.Embedding(cfg.importance_buckets, cfg.num_hashes)
        nn.init.constant_(self.importance.weight, 1.0 / cfg.num_hashes)
        g = torch.Generator().manual_seed(cfg.seed)
        # k hash functions for the table + 1 for the importance table
        self.register_buffer(
            "hash_a",
            torch.randint(1, _P, (cfg.num_hashes + 1,), generator=g, dtype=torch.int64),
            persistent=True,
        )
        self.register_buffer(
            "hash_b",
            torch.randint(0, _P, (cfg.num_hashes + 1,), generator=g, dtype=torch.int64),
            persistent=True,
        )

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def _hash(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.remainder(tokens, _P)[:, None]  # [N, 1]; remainder is non-negative for any int64
        h = torch.remainder(x * self.hash_a + self.hash_b, _P)  # [N, k+1]
        rows = torch.remainder(h[:, :-1], self.cfg.num_buckets)
        imp = torch.remainder(h[:, -1], self.cfg.importance_buckets)
        return rows, imp

    def forward(self, token_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, ell = token_ids.shape
        k = self.cfg.num_hashes
        lengths = lengths.clamp(0, ell)
        keep = torch.arange(ell, device=token_ids.device)[None, :] < lengths[:, None]  # [R, L]
        tokens = token_ids[keep]  # row-major: tokens of row 0, then row 1, ...
        inv_len = 1.0 / lengths.clamp_min(1).to(self.table.weight.dtype)
        offsets = torch.cumsum(lengths, 0) - lengths
        if self.dedupe_tokens and tokens.device.type == "cpu":
            # Token vectors once per DISTINCT token (n-grams repeat across a batch's texts, Zipf), then each
            # text is the mean of its tokens' vectors: the hashed-table backward (sort + scatter of N * k
            # rows) shrinks to the distinct tokens. On CUDA the direct path avoids unique()'s host sync.
            uniq, inverse = torch.unique(tokens, return_inverse=True)
            tok_vec = self.token_vectors(uniq)
            row_of_token = torch.repeat_interleave(torch.arange(r, device=token_ids.device), lengths)
            vec = F.embedding_bag(inverse, tok_vec, offsets, mode="sum", per_sample_weights=inv_len[row_of_token])
            return vec, lengths > 0
        rows, imp_rows = self._hash(tokens)  # [N, k], [N]
        row_of_token = torch.repeat_interleave(torch.arange(r, device=token_ids.device), lengths)
        psw = self.importance(imp_rows) * inv_len[row_of_token][:, None]  # [N, k] mean over tokens
        vec = self.table(rows.reshape(-1), offsets * k, per_sample_weights=psw.reshape(-1).to(self.table.weight.dtype))
        return vec, lengths > 0

    def token_vectors(self, tokens: torch.Tensor) -> torch.Tensor:
        """sum_j p_j(token) E[h_j(token)] for each token id -> [N, dim]."""
        rows, imp_rows = self._hash(tokens)
        k = self.cfg.num_hashes
        starts = torch.arange(0, rows.numel(), k, device=tokens.device)
        psw = self.importance(imp_rows).reshape(-1).to(self.table.weight.dtype)
        return self.table(rows.reshape(-1), starts, per_sample_weights=psw)


class IdHashEncoder(nn.Module):
    """Entity key (``ml.losses.entity_key``) int64 [...] -> learned identity vector [..., dim].

    The hash embeddings of ref [34] applied to the entity key instead of a token: ``num_hashes`` universal
    hashes pick rows of one table of ``num_buckets`` rows, summed. Content features alone cannot tell
    apart entities whose text is nearly the same (MovieLens titles + genres: the mean over 32 n-grams is
    dominated by the shared genre n-grams); this token lets f_t learn an identity for every entity that
    training sees, and a neighbour's identity inside N(u). Rows start at zero scale (std 0.02), so an entity
    never seen in training adds little beyond hash collisions: the content tokens still carry it."""

    def __init__(self, num_buckets: int, dim: int, num_hashes: int = 2, seed: int = 1):
        super().__init__()
        self.num_buckets = num_buckets
        self.table = nn.Embedding(num_buckets, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("hash_a", torch.randint(1, _P, (num_hashes,), generator=g, dtype=torch.int64))
        self.register_buffer("hash_b", torch.randint(0, _P, (num_hashes,), generator=g, dtype=torch.int64))

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        x = torch.remainder(keys, _P)[..., None]
        rows = torch.remainder(torch.remainder(x * self.hash_a + self.hash_b, _P), self.num_buckets)
        return self.table(rows).sum(-2)


class MLP(nn.Sequential):
    """Linear layers with an activation between them (none after the last); no normalisation."""

    def __init__(self, dims: list[int], activation: str = "relu"):
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.ReLU() if activation == "relu" else nn.GELU())
        super().__init__(*layers)


# why a feature is missing: row 0 = the feature store has no record for the entity, row 1 = the record has
# no text / no image vector. Both are learned vectors (a node outside the store is not "an empty text").
NO_RECORD, NO_VALUE = 0, 1


def missing_vector(missing: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """missing[NO_VALUE] where the record is present, else missing[NO_RECORD] -> [..., dim]."""
    return torch.where(present[..., None], missing[NO_VALUE], missing[NO_RECORD])


class EntityFeatureEncoder(nn.Module):
    """Raw ``FeatureTensors`` of any leading shape -> per-feature vectors with learned "missing" vectors.

    Returns ``text`` [..., text_dim], ``image`` [..., image_out] (absent when image_dim == 0),
    ``degree`` [..., 2] = (log1p(degree), present) and the availability masks."""

    def __init__(self, text_cfg: TextHashConfig, image_dim: int, image_hidden: int, image_out: int):
        super().__init__()
        self.text = HashTextEncoder(text_cfg)
        self.missing_text = nn.Parameter(torch.randn(2, text_cfg.dim) * text_cfg.dim**-0.5)
        self.image_dim = image_dim
        if image_dim > 0:
            self.image = MLP([image_dim, image_hidden, image_out])
            self.missing_image = nn.Parameter(torch.randn(2, image_out) * image_out**-0.5)
        self.image_out = image_out if image_dim > 0 else 0

    @property
    def text_dim(self) -> int:
        return self.text.dim

    def forward(self, f, valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``valid`` (bool, leading shape): False marks padding slots; their inputs are ignored entirely."""
        lead = f.token_lengths.shape
        present = f.present if valid is None else f.present & valid
        lengths = torch.where(present, f.token_lengths, torch.zeros_like(f.token_lengths))
        ell = f.token_ids.shape[-1]
        vec, has_text = self.text(f.token_ids.reshape(-1, ell), lengths.reshape(-1))
        vec = vec.reshape(*lead, vec.shape[-1])  # explicit width: lead may hold 0 entities
        has_text = has_text.reshape(lead)
        # where over the two rows, not missing[reason]: an index with B x K duplicates of two values makes
        # the indexing backward serialise on the GPU
        no_text = missing_vector(self.missing_text, present).to(vec.dtype)
        text = torch.where(has_text[..., None], vec, no_text)
        out = {"text": text, "has_text": has_text, "present": present}
        if self.image_dim > 0:
            if f.image.shape[-1] != self.image_dim:
                raise ValueError(
                    f"EntityBatch features.image has {f.image.shape[-1]} dims, the model was built for image_dim="
                    f"{self.image_dim}"
                )
            has_image = f.image_mask & present
            img_in = torch.where(has_image[..., None], f.image, torch.zeros_like(f.image))  # NaN-safe for padding
            img = self.image(img_in)
            no_image = missing_vector(self.missing_image, present).to(img.dtype)
            out["image"] = torch.where(has_image[..., None], img, no_image)
            out["has_image"] = has_image
        deg = torch.where(valid, f.degree, torch.zeros_like(f.degree)) if valid is not None else f.degree
        out["degree"] = torch.stack([torch.log1p(deg.clamp_min(0)), present.to(deg.dtype)], dim=-1)
        return out


def score_features(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Proximity score s(u, v) (3.1.1) -> (s, log s / 10): RWR visit probabilities span orders of magnitude,
    the log keeps small scores distinguishable. Zero for padding."""
    s = torch.where(mask, scores, torch.zeros_like(scores)).clamp_min(0)
    return torch.stack([s, torch.log(s.clamp_min(1e-8)) / 10.0 * mask.to(s.dtype)], dim=-1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
