"""Sampled softmax with logQ correction (paper section 3.3, eq. 1) and the shared entity key space.

Score (eq. 1):  s(q, v) = lambda * q.v - log Q(v)

* ``lambda`` (``scale``) is an inverse temperature. q and v are unit vectors, so q.v is a cosine in [-1, 1] and
  lambda must be of order 10-30 for the softmax to be peaked enough to learn (0.07 as a *multiplier* would
  flatten every logit). It may be a float or a tensor (e.g. a learned parameter that the caller clamps);
  gradients flow into it in the naive and the chunked path alike.

Candidates and the target
-------------------------
For a batch of B (query, positive) pairs and M random negatives the candidate list shared by all queries is

    C = [P_0 .. P_{B-1}, N_0 .. N_{M-1}]          (in-batch positives, then random negatives)

and the target of query i is candidate i (its own positive). Every other query's positive is an in-batch
negative for query i.

logQ correction - the option taken: ONE softmax with a per-sampler log Q
------------------------------------------------------------------------
Following ref [6] (Yi et al., "Sampling-bias-corrected neural modeling", RecSys'19) each candidate's log Q is
the log-probability with which *its own sampler* put it into the candidate list:

* in-batch candidates (the positives, including the query's own target) are B draws from the training-label
  distribution; a streaming count-min sketch of the entities seen as positives estimates one draw's
  probability of being v as p(v) = est(v) / N (N = the sketch's total). After deduplication (below) v has
  one column iff at least one of the B draws is v, so its log Q is the log of the inclusion probability

      Q(v) = P(v in batch) = 1 - (1 - p(v))^B        (~ B p(v) for B p(v) << 1, -> 1 for popular v)

  ``CountMinSketch.in_batch_log_q(keys, B)`` (``ml/count_min_sketch.py``) -> ``positive_log_q`` of shape [B].
  Why this Q: sum over the DISTINCT in-batch candidates v of exp(lambda q.v) / Q(v) is a Horvitz-Thompson
  estimate of sum over ALL v of exp(lambda q.v), eq. 1's full denominator (each term is present with
  probability Q(v)). The expected count B p(v), capped at 1, with every copy kept would instead let a
  popular v enter ~B p(v) times with log Q = 0: over-penalised by ~log(B p(v)).
* random negatives were drawn by the random sampler; their log Q is that sampler's, e.g. ``log(M / N_t)``
  for M uniform draws with replacement among the N_t entities of the type -> ``negative_log_q`` (a float,
  or a tensor [M]). Same scale: M / N_t is v's expected number of columns, so their sum over the M
  columns is again an unbiased estimate of the full denominator; it is also v's inclusion probability
  1 - (1 - 1 / N_t)^M up to a factor 1 - O(M / N_t), the same for every entity.

All B + M corrected logits then go through a single softmax (eq. 1 with N = in-batch + random negatives).
The alternative NOT taken is Pinterest OmniSearchSage's ``MIXED_SUM``: two separate softmaxes (one over the
in-batch candidates with the sketch correction, one over the random negatives without it) whose losses are
summed. We keep one softmax because it is literally eq. 1 (one denominator over all of N) and because the
chunked Algorithm 1 (section 3.4.2) is written for one cross-entropy per query.

Accidental hits and duplicate candidates
----------------------------------------
Every row keeps ONE column per distinct entity key (keys needed: ``positive_keys``, and ``negative_keys``
for the random negatives; masked columns get logit -inf):

* the query's target keeps its own column; every other column with the key of ``positive_keys[target]``
  (the same entity, e.g. a popular pin that is also another query's positive, or a random negative that
  happens to be the positive) is an accidental hit, not a negative;
* with ``query_keys`` the query's own entity is masked too: when q and the candidates share a type (a pin
  query against pin positives), q can come back as another pair's positive or as a random negative, and
  s(q, q) = lambda * 1 - log Q(q) would be a "negative" the model can never beat;
* any other entity keeps only its LAST column. Copies within the in-batch part are exact duplicates (same
  vector, same log Q): one column, as Q(v) above assumes. An entity drawn by both samplers keeps its
  random column (the random draws come last): the uniform sampler's probability does not depend on the
  entity, so every entity's expected weight in the denominator stays the same (~1 per sampler), whereas
  keeping the in-batch column would drop the random draws of exactly the popular entities. Under DDP the
  other ranks' positives sit between this rank's positives and the random negatives, so the kept columns
  are those of one process on the global batch.

Several queries per positive
----------------------------
``targets`` [n] (default ``arange(B)``) names each query's target among the B positives, so that n != B
queries can share one candidate list (eq. 3: the queries g_x(w) of every node w in {u} U N(u) all have
f(u) as their positive). The loss is then mean over the n queries of w_i * l_i.

Loss
----
l_i = -log softmax_i(i) over the (masked) corrected logits and  loss = mean_i(w_i * l_i)  (w_i = 1 by default).
The reduction divides by B (not by sum(w)) so that per-example weights are relative importances (eq. 2's pair
source weights) and the chunked path can reproduce the value exactly.

The softmax itself is computed in float32 (float64 if an input is float64) even under autocast: logsumexp and
the tiny per-logit gradients (softmax / B) are not safe in fp16/bf16. With ``chunk_size`` only a
[chunk_size, B + M] block of float32 logits exists at a time (``ml/chunked_softmax.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ml.chunked_softmax import chunked_softmax_loss
from ml.softmax_base import (
    NUM_TYPE_CODES,
    SoftmaxInputs,
    accidental_hit_mask,
    candidate_log_q,
    compute_dtype,
    empty_batch_loss,
    entity_key,
    prepare_inputs,
    target_rows,
)

__all__ = ["NUM_TYPE_CODES", "SoftmaxInputs", "entity_key", "prepare_inputs", "sampled_softmax_loss"]


def _naive(x: SoftmaxInputs) -> torch.Tensor:
    """Unchunked reference: materialises the full [B, B + M] logits and lets autograd differentiate."""
    n, b, m = x.query.shape[0], x.positive.shape[0], x.negatives.shape[0]
    dt = compute_dtype(x.query, x.positive, x.negatives)
    dev_type = x.query.device.type
    with torch.autocast(device_type=dev_type, enabled=False):
        q = x.query.to(dt)
        cand = torch.cat([x.positive.to(dt), x.negatives.to(dt)])
        logits = x.scale.to(dt) * (q @ cand.T)
        lq = candidate_log_q(x.positive_log_q, x.negative_log_q, b, m, logits)
        if lq is not None:
            logits = logits - lq[None, :]
        mask = accidental_hit_mask(
            x.positive_keys,
            x.negative_keys,
            slice(0, n),
            b,
            m,
            query_keys=x.query_keys,
            targets=x.targets,
            duplicates=x.duplicates,
        )
        if mask is not None:
            logits = logits.masked_fill(mask, float("-inf"))
        per_example = F.cross_entropy(logits, target_rows(x.targets, slice(0, n), logits.device), reduction="none")
        if x.weights is not None:
            per_example = per_example * x.weights.to(dt)
        return per_example.sum() / n


def sampled_softmax_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    scale: float | torch.Tensor,
    positive_log_q: torch.Tensor | None = None,
    negative_log_q: torch.Tensor | float | None = None,
    positive_keys: torch.Tensor | None = None,
    negative_keys: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    chunk_size: int | None = None,
    query_keys: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 1 averaged over the batch: mean_i(w_i * l_i), candidates = [in-batch positives, random negatives].

    query, positive: [B, d]; negatives: [M, d] or None; scale: lambda (float or scalar tensor, may require grad);
    positive_log_q: [B] log Q of the in-batch candidates (count-min sketch); negative_log_q: [M] or a float,
    log Q of the random negatives; positive_keys / negative_keys: int64 entity keys (``entity_key``) for
    accidental-hit masking and one column per distinct entity (module docstring); query_keys: [n] the queries' own entity keys, masked as candidates too;
    targets: [n] each query's positive (default: query i -> positive i); weights: [n] per-query weights;
    chunk_size: None = naive, else Algorithm 1 (``ml.chunked_softmax``) over query chunks of that size -
    same value and gradients.
    Returns a float32 (float64 for float64 inputs) scalar.
    """
    x = prepare_inputs(
        query,
        positive,
        negatives,
        scale=scale,
        positive_log_q=positive_log_q,
        negative_log_q=negative_log_q,
        positive_keys=positive_keys,
        negative_keys=negative_keys,
        weights=weights,
        query_keys=query_keys,
        targets=targets,
    )
    b = x.query.shape[0]
    if b == 0:
        return empty_batch_loss(x)
    if chunk_size is None:
        return _naive(x)
    return chunked_softmax_loss(x, chunk_size=chunk_size)
