"""OmniSageModel: per-type embedders f_t, the three tasks and eq. 6's total loss (paper 3.2-3.4.2).

    L = lambda_p L_pair + lambda_f L_feat + lambda_s (L_next + L_fut)            (eq. 6)

Every loss is ``ml.losses.sampled_softmax_loss`` (eq. 1, chunked per Algorithm 1 when
``LossConfig.chunk_size`` is set) with score s(q, v) = lambda * q.v - log Q(v):

- lambda is an inverse temperature on cosines (q, v unit vectors), ~20; optionally learned, clamped;
- log Q of in-batch candidates (the positives of the batch) comes from a count-min sketch per loss and
  positive type t_p (``"{loss}/{t_p}"``, e.g. ``entity_entity/board``): est / total is then the share of
  this sub-batch's positive stream, the probability its B draws are taken from (a sketch shared by pin and
  board positives would divide by the total of both and be off by log(share of t_p)). Keys are (entity
  type, entity id) via ``ml.losses.entity_key`` so counts survive daily re-indexing; the sketch is updated
  with the batch's positives before the estimate, and only in training mode;
- the query entity is masked as a candidate (``query_keys``) where it has one, besides accidental hits;
- log Q of random negatives is their sampler's (``*.random_negative_log_q``; 0 when not given); under
  torch.distributed, that of the pooled draw of every rank (+ log(global / local count)).

Distributed (3.4.2 "we aggregate in-batch and random negatives from each device"): under
torch.distributed every rank all-gathers the positives and random negatives of every task. The gather
is an autograd function whose backward all-reduces (sums) the gradient and returns this rank's slice, so
rank r's candidates receive the gradient of every rank's loss: the averaged DDP gradient is exactly the
gradient of the mean loss over the global batch. Every rank must run the same tasks in the same order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ml.batches import FeatureTaskBatch, PairBatch, SequenceBatch
from ml.config import ModelConfig
from ml.count_min_sketch import CountMinSketch
from ml.embedder import EntityEmbedder
from ml.entity_tensors import EntityTensors, as_entity_tensors, cat_entity_tensors
from ml.losses import entity_key, sampled_softmax_loss
from ml.tasks import EntityEntityTask, EntityFeatureTask, UserEntityTask

TASK_OF_BATCH = {PairBatch: "entity_entity", FeatureTaskBatch: "entity_feature", SequenceBatch: "user_entity"}


# ----------------------------------------------------------------------------------------------------------
# cross-rank gathering
# ----------------------------------------------------------------------------------------------------------
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device: torch.device, group) -> list[int]:
    world = dist.get_world_size(group)
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return [int(x.item()) for x in out]


def _gather_padded(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """all_gather of tensors whose first dims differ by rank (padded to the max, then trimmed)."""
    m = max(sizes)
    padded = x.new_zeros((m,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: concatenation of every rank's rows. Backward: the gradient w.r.t. the concatenation is
    summed over ranks (each rank's loss saw every rank's rows) and this rank's slice is returned."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_with_grad(x: torch.Tensor, group=None) -> tuple[torch.Tensor, int, int]:
    """-> (all ranks' rows, start of this rank's rows, number of this rank's rows)."""
    sizes = _gather_sizes(x.shape[0], x.device, group)
    rank = dist.get_rank(group)
    return _GatherWithGrad.apply(x, sizes, rank, group), sum(sizes[:rank]), sizes[rank]


def gather_no_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    return _gather_padded(x, _gather_sizes(x.shape[0], x.device, group), group)


# ----------------------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """Softmax candidates of one loss: this rank's positives (aligned with its queries) + the rest."""

    positive: torch.Tensor  # [B, d]
    positive_keys: torch.Tensor  # [B]
    positive_log_q: torch.Tensor | None  # [B]
    negatives: torch.Tensor | None  # [M, d]: other ranks' positives + every rank's random negatives
    negative_keys: torch.Tensor | None  # [M]
    negative_log_q: torch.Tensor | None  # [M]

    @property
    def num_candidates(self) -> int:
        return self.positive.shape[0] + (0 if self.negatives is None else self.negatives.shape[0])


@dataclass
class ModelOutput:
    loss: torch.Tensor  # eq. 6 total
    losses: dict[str, torch.Tensor]  # per-component (detached), e.g. "entity_entity", "user_entity/next"
    examples: int  # queries-level examples in the step (pairs + nodes + sequences)
    stats: dict[str, float] = field(default_factory=dict)


class OmniSageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedders = nn.ModuleDict({t: EntityEmbedder(config, t) for t in config.node_types})
        tasks: dict[str, nn.Module] = {}
        if "entity_entity" in config.tasks:
            tasks["entity_entity"] = EntityEntityTask()
        if "entity_feature" in config.tasks:
            tasks["entity_feature"] = EntityFeatureTask(config)
        if "user_entity" in config.tasks:
            tasks["user_entity"] = UserEntityTask(config)
        self.tasks = nn.ModuleDict(tasks)
        lc = config.loss
        if lc.learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(lc.scale)))
        else:
            self.register_buffer("log_scale", torch.tensor(math.log(lc.scale)), persistent=False)
        self.sketches: dict[str, CountMinSketch] = {}
        self.last_stats: dict[str, float] = {}
        self.gather_group = None  # a process group for the negatives gather (set by the trainer under DDP)
        self._step_memo: dict | None = None  # embeddings of the current forward's batch objects, by id

    # -------------------------------------------------------------------------------------------- embedding
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def embed(self, x, where: str = "batch", feature_cache=None) -> torch.Tensor:
        """EntityBatch | EntityTensors -> f_t(u), float32 [B, out_dim], unit norm. ``feature_cache``: an
        ``ml.inference.EncodedFeatureCache`` reusing graph nodes' encoded features across batches."""
        t = as_entity_tensors(x, self.device, where)
        if t.entity_type not in self.embedders:
            raise ValueError(
                f"{where}: entity type {t.entity_type!r} has no embedder (node_types={self.config.node_types})"
            )
        embedder = self.embedders[t.entity_type]
        if feature_cache is None:
            return embedder(t)
        return embedder(t, feature_cache.encode(t.entity_type, embedder.features, t))

    def embed_many(self, xs: list, where: str = "batch") -> tuple[list[torch.Tensor], list[EntityTensors]]:
        """Embeds several batches; batches of one type and one shape go through their embedder in one call.
        Inside ``forward`` a batch object already embedded in this step is not embedded again."""
        ts = [as_entity_tensors(x, self.device, where) for x in xs]
        memo = self._step_memo if self._step_memo is not None else {}
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(ts):
            if id(t) in memo:
                continue
            sig = (
                t.entity_type,
                tuple(t.neighbor_mask.shape[1:]),
                tuple(t.table.token_ids.shape[1:]),
                tuple(t.table.image.shape[1:]),
                t.layout_key,
            )
            groups.setdefault(sig, [])
            if all(ts[j] is not t for j in groups[sig]):
                groups[sig].append(i)
        for idx in groups.values():
            parts = [ts[i] for i in idx]
            emb = self.embed(parts[0] if len(parts) == 1 else cat_entity_tensors(parts), where)
            for t, e in zip(parts, torch.split(emb, [len(t) for t in parts])):
                memo[id(t)] = (t, e)  # the tensors object is kept alive so its id stays unique
        return [memo[id(t)][1] for t in ts], ts

    def keys(self, t: EntityTensors) -> torch.Tensor:
        return entity_key(t.type_code, t.entity_ids)

    # --------------------------------------------------------------------------------------- softmax parts
    def scale(self) -> torch.Tensor | float:
        lc = self.config.loss
        if lc.learn_scale:
            return self.log_scale.exp().clamp(lc.scale_min, lc.scale_max)
        return float(lc.scale)

    def sketch(self, name: str) -> CountMinSketch:
        """The count-min sketch of one loss, on the model's device (updates and estimates stay there)."""
        if name not in self.sketches:
            lc = self.config.loss
            self.sketches[name] = CountMinSketch(
                width=lc.sketch_width, depth=lc.sketch_depth, seed=lc.sketch_seed, device=self.device
            )
        elif self.sketches[name].device != self.device:
            self.sketches[name].to(self.device)
        return self.sketches[name]

    def sketch_state_dict(self) -> dict[str, dict]:
        return {name: s.state_dict() for name, s in self.sketches.items()}

    def load_sketch_state_dict(self, state: Mapping[str, dict]) -> None:
        """Loads every ``"{loss}/{t_p}"`` sketch. Sketches of older checkpoints, one per loss over all
        positive types (no type suffix), cannot be split by type: they are dropped with a warning and the
        per-type sketches start empty (log Q = 0, no correction, until they have counts)."""
        dropped = []
        for name, s in state.items():
            if name.rsplit("/", 1)[-1] in self.config.node_types:
                self.sketch(name).load_state_dict(s)
            else:
                dropped.append(name)
        if dropped:
            warnings.warn(f"count-min sketches {sorted(dropped)} are not per positive type; not loaded", stacklevel=2)

    def candidates(
        self,
        name,
        *,
        positive_type: str,
        positive,
        positive_keys,
        negatives=None,
        negative_keys=None,
        negative_log_q=None,
    ) -> Candidates:
        """Builds one loss's candidates: gathers across ranks, updates the sketch ``"{name}/{positive_type}"``
        (one per loss and t_p: see the module docstring), attaches log Q."""
        dev = positive.device
        b = positive.shape[0]
        positive_keys = positive_keys.to(dev)
        rnd_lq = None
        if negatives is not None:
            m = negatives.shape[0]
            rnd_lq = (
                torch.zeros(m, device=dev)
                if negative_log_q is None
                else torch.as_tensor(negative_log_q, dtype=torch.float32, device=dev).expand(m).clone()
            )
            negative_keys = negative_keys.to(dev)
        if _dist_on():
            g = self.gather_group
            all_pos, start, _ = gather_with_grad(positive, g)
            all_pos_keys = gather_no_grad(positive_keys, g)
            others = torch.cat([all_pos[:start], all_pos[start + b :]])
            others_keys = torch.cat([all_pos_keys[:start], all_pos_keys[start + b :]])
            if negatives is not None:
                all_neg, _, _ = gather_with_grad(negatives, g)
                all_neg_keys, all_neg_lq = gather_no_grad(negative_keys, g), gather_no_grad(rnd_lq, g)
                # Each rank's sampler gave log(M_r / N); the pooled draw holds sum_r M_r of them, so an
                # entity's expected count in it is (sum_r M_r) / N: add log(sum_r M_r / M_r) (log world
                # when every rank draws M).
                if m:
                    all_neg_lq = all_neg_lq + math.log(all_neg.shape[0] / m)
            else:
                all_neg = all_neg_keys = all_neg_lq = None
        else:
            all_pos_keys, start, others, others_keys = positive_keys, 0, None, None
            all_neg, all_neg_keys, all_neg_lq = negatives, negative_keys, rnd_lq

        pos_lq = others_lq = None
        if self.config.loss.logq_correction:
            sk = self.sketch(f"{name}/{positive_type}")
            pos_keys = all_pos_keys.detach()
            if self.training:
                sk.update(pos_keys)
            lq = sk.in_batch_log_q(pos_keys, pos_keys.shape[0]).to(dev, torch.float32)
            pos_lq = lq[start : start + b]
            if others is not None:
                others_lq = torch.cat([lq[:start], lq[start + b :]])
        else:
            all_neg_lq = None if all_neg_lq is None else torch.zeros_like(all_neg_lq)

        neg_parts = [x for x in (others, all_neg) if x is not None and x.shape[0] > 0]
        if neg_parts:
            negs = torch.cat(neg_parts)
            key_parts = [
                x for x, y in ((others_keys, others), (all_neg_keys, all_neg)) if y is not None and y.shape[0] > 0
            ]
            neg_keys = torch.cat(key_parts)
            if self.config.loss.logq_correction:
                lq_parts = [
                    x for x, y in ((others_lq, others), (all_neg_lq, all_neg)) if y is not None and y.shape[0] > 0
                ]
                neg_lq = torch.cat(lq_parts)
            else:
                neg_lq = None
        else:
            negs = neg_keys = neg_lq = None
        return Candidates(positive, positive_keys, pos_lq, negs, neg_keys, neg_lq)

    def softmax_loss(
        self,
        query: torch.Tensor,
        c: Candidates,
        weights: torch.Tensor | None = None,
        *,
        query_keys: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Eq. 1 over ``c``. query_keys: the query entities' keys, masked as candidates (a pin query must
        not meet itself as a negative); targets: each query's row of ``c.positive`` when several queries
        share one positive (default query i -> positive i)."""
        if query.shape[0] == 0:  # no valid position on this rank: a zero that keeps the graph connected
            return query.sum() * 0.0 + c.positive.sum() * 0.0
        self.last_stats["num_candidates"] = float(c.num_candidates)
        return sampled_softmax_loss(
            query.float(),
            c.positive.float(),
            None if c.negatives is None else c.negatives.float(),
            scale=self.scale(),
            positive_log_q=c.positive_log_q,
            negative_log_q=c.negative_log_q,
            positive_keys=c.positive_keys,
            negative_keys=c.negative_keys,
            weights=weights,
            chunk_size=self.config.loss.chunk_size,
            query_keys=None if query_keys is None else query_keys.to(query.device),
            targets=None if targets is None else targets.to(query.device),
        )

    # ----------------------------------------------------------------------------------------------- eq. 6
    def forward(self, batches: Mapping[str, object]) -> ModelOutput:
        """``batches``: {name: PairBatch | FeatureTaskBatch | SequenceBatch}; the batch's class picks its
        task (several PairBatches, e.g. one per (t_q, t_p), are summed into L_pair). Batches of switched-off
        tasks are skipped without being embedded."""
        self._step_memo = {}
        try:
            self._embed_step(batches)
            return self._losses(batches)
        finally:
            self._step_memo = None

    def _embed_step(self, batches: Mapping[str, object]) -> None:
        """Every entity batch of the enabled tasks, one embedder call per type: the batches of a step share
        one feature table per type (``ml.step_sampler.share_step_tables``) and random negatives, so each
        entity is encoded once and each shared batch embedded once; the tasks then read the results."""
        entities = []
        for batch in batches.values():
            if TASK_OF_BATCH.get(type(batch)) in self.tasks:
                for f in ("query", "positive", "nodes", "entities", "random_negatives"):
                    v = getattr(batch, f, None)
                    if v is not None:
                        entities.append(v)
        if entities:
            self.embed_many(entities, where="batch")

    def _losses(self, batches: Mapping[str, object]) -> ModelOutput:
        cfg = self.config
        lam = {"entity_entity": cfg.lambda_p, "entity_feature": cfg.lambda_f, "user_entity": cfg.lambda_s}
        total = None
        losses: dict[str, torch.Tensor] = {}
        examples = 0
        stats: dict[str, float] = {}
        for name, batch in batches.items():
            task = TASK_OF_BATCH.get(type(batch))
            if task is None:
                raise TypeError(
                    f"batch {name!r}: expected PairBatch, FeatureTaskBatch or SequenceBatch, got {type(batch).__name__}"
                )
            if task not in self.tasks:
                continue
            parts = self.tasks[task](self, batch)
            examples += len(batch)
            stats[f"{name}/num_candidates"] = self.last_stats.get("num_candidates", 0.0)
            for suffix, value in parts.items():
                losses[f"{name}/{suffix}" if suffix else name] = value.detach()
                term = lam[task] * value
                total = term if total is None else total + term
        if total is None:
            raise ValueError(f"no batch for an enabled task (tasks={cfg.tasks}, batches={list(batches)})")
        s = self.scale()
        stats["scale"] = float(s.detach()) if isinstance(s, torch.Tensor) else float(s)
        return ModelOutput(total, losses, examples, stats)

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def user_embeddings(self, batch: SequenceBatch) -> torch.Tensor:
        """U_t at each user's last valid step (3.3.3): unit [U, d]."""
        if "user_entity" not in self.tasks:
            raise ValueError("user embeddings need the user_entity task")
        p = self.embed(batch.entities, "SequenceBatch.entities")
        seq = torch.as_tensor(batch.sequence_index, dtype=torch.int64, device=p.device)
        valid = seq >= 0
        rows = p.index_select(0, seq.clamp_min(0).reshape(-1)).reshape(*seq.shape, p.shape[-1])
        return self.user_embeddings_from_items(rows, valid)

    @torch.no_grad()
    def user_embeddings_from_items(self, items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """U_t at each user's last valid step from the history items' f_t vectors ``items`` [U, T, d] and
        their mask ``valid`` [U, T] (3.3.3): what ``user_embeddings`` computes after embedding the items, for
        a caller that already holds them (daily inference embeds every pin once)."""
        if "user_entity" not in self.tasks:
            raise ValueError("user embeddings need the user_entity task")
        states = self.tasks["user_entity"].user_states(items * valid[..., None], valid)
        last = (valid.sum(1) - 1).clamp_min(0)
        return states[torch.arange(items.shape[0], device=items.device), last]
