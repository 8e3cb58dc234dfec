"""Baselines of the recall report (paper 4.2, Table 2), all scored by ``ml.evaluator.Evaluator`` on exactly
the model's evaluation sets and negative pools. This module only gathers them: random, oracle, popularity
and co-occurrence live in ``ml.untrained_baselines``, ALS in ``ml.als``, and the training interactions ALS
(and ``ml.ease``) is fitted on in ``ml.interactions``.

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
  latent, users by their drifted interest on the evaluation day. The ceiling a model can approach on
  synthetic data; only defined when the input came from the generator.
- The PinSage-like model (Table 2: the same pipeline with mean-pooling aggregation and the entity-entity task
  only) is a trained ``OmniSageModel``; ``ml.training_run`` trains it beside the model and the report
  scores it through ``ml.evaluator.model_embedders``.
- ``AlsEmbedder``: implicit-feedback matrix factorisation (Hu, Koren, Volinsky 2008; the ``implicit`` library)
  of a users x (pins and boards) matrix of training interactions - the classic strong collaborative-filtering
  baseline, which sees the same engagement as the graph but no graph. Entities are their item factors; a user
  is the least-squares user vector of their history against the item factors (implicit's
  ``recalculate_user``: evaluation users are not rows of the training matrix). ``build_interaction_matrix``
  builds the matrix from ``interactions_from_logs`` (every event: user x pin; a save also user x board) or
  ``interactions_from_sequences``; an event that created an excluded (held-out) pair is dropped whole, as the
  graph drops the pair's edge. ``tune_als`` picks factors / regularisation / alpha / iterations / confidence
  weighting by recall@k on validation pairs carved from training (``carve_validation_pairs``), and
  ``fit_als_baseline`` does the whole protocol (tune on the split, refit on all training). implicit's own
  threads are set explicitly (``num_threads``) and BLAS is held to one thread while it runs (implicit's
  advice: a BLAS thread pool inside its solver threads oversubscribes the CPU).

Entity-feature queries need the model's g_x encoders; these baselines have none, so that task reports null
with n = 0 for them (contract: a task without examples is null, n = 0).
"""

from __future__ import annotations

from ml.als import (
    DEFAULT_ALS_GRID,
    REPORT_ALS_GRID,
    AlsEmbedder,
    AlsFitConfig,
    AlsParams,
    AlsTuning,
    carve_validation_pairs,
    fit_als_baseline,
    pair_recall,
    tune_als,
)
from ml.interactions import (
    PAIR_COLUMNS,
    InteractionMatrix,
    build_interaction_matrix,
    engagement_pairs_from_logs,
    interactions_from_logs,
    interactions_from_sequences,
)
from ml.untrained_baselines import (
    CooccurrenceEmbedder,
    PopularityEmbedder,
    RandomUserEmbedder,
    TableUserEmbedder,
    oracle_baseline,
    random_baseline,
)

__all__ = [
    "DEFAULT_ALS_GRID",
    "PAIR_COLUMNS",
    "REPORT_ALS_GRID",
    "AlsEmbedder",
    "AlsFitConfig",
    "AlsParams",
    "AlsTuning",
    "CooccurrenceEmbedder",
    "InteractionMatrix",
    "PopularityEmbedder",
    "RandomUserEmbedder",
    "TableUserEmbedder",
    "build_interaction_matrix",
    "carve_validation_pairs",
    "engagement_pairs_from_logs",
    "fit_als_baseline",
    "interactions_from_logs",
    "interactions_from_sequences",
    "oracle_baseline",
    "pair_recall",
    "random_baseline",
    "tune_als",
]
