"""Daily partitions (contract: daily from OMNISAGE_START_DATE) and the graph window mapping."""

from __future__ import annotations

import dagster as dg

from omnisage_pipeline.settings import load_settings

_settings = load_settings()  # the code location's one read of the environment

#: Every daily asset shares these partitions; the start date is read when the definitions load.
daily_partitions = dg.DailyPartitionsDefinition(start_date=_settings.start_date, timezone="UTC")

#: OMNISAGE_WINDOW_DAYS, read when the definitions load, so the partition mapping and the code agree.
WINDOW_DAYS = _settings.window_days


def window_mapping(window_days: int = WINDOW_DAYS) -> dg.TimeWindowPartitionMapping:
    """Day D depends on the ``window_days`` days ending at D; days before the first partition are simply
    absent (allow_nonexistent_upstream_partitions)."""
    return dg.TimeWindowPartitionMapping(
        start_offset=-(window_days - 1), end_offset=0, allow_nonexistent_upstream_partitions=True
    )


def window_keys(day: str) -> list[str]:
    """The partitions of day D's window, oldest first: exactly what ``window_mapping`` says (so lineage and
    the files read agree); days before the first partition are absent."""
    result = window_mapping().get_upstream_mapped_partitions_result_for_partitions(
        daily_partitions.subset_with_partition_keys([day]), daily_partitions, daily_partitions
    )
    return sorted(result.partitions_subset.get_partition_keys())


#: Every daily asset runs a backfill range as ONE run that handles its days in date order (the asset body
#: loops over ``partition_keys(context)`` and publishes each day atomically). Why single-run: pruned_edges of
#: day D reads daily_edges of the days before it, so a range must be built in date order, not as concurrent
#: per-day runs; and ``dagster asset materialize --partition-range`` accepts only single-run policies, so
#: the same range can be backfilled from the CLI without a daemon (see docs/operations.md, "Backfills").
DAILY_BACKFILL_POLICY = dg.BackfillPolicy.single_run()

#: Retry policy of the steps that publish atomically (ingest, edges, pruning, snapshot, features, training
#: examples, embeddings, index): a failed attempt left the published days as they were, so running the step
#: again after a transient error (I/O, a lost Spark executor, a lock held too long) is safe. Never on
#: omnisage_model: a retry after its registration could register and gate a second version. A failure that
#: would repeat (a blocking check, a missing input folder) is retried too unless its ``dg.Failure`` says
#: ``allow_retries=False``.
SAFE_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=30, backoff=dg.Backoff.EXPONENTIAL)


def partition_keys(context) -> list[str]:
    """The day(s) an asset invocation materializes, oldest first (one for a daily run, many for a backfill)."""
    return sorted(context.partition_keys)


#: Dagster pool of the daily chain (ingest -> ... -> training_examples, and recall_report, which compares
#: against the previous day's report). The instance the project creates (settings.DEFAULT_DAGSTER_YAML)
#: enforces pools per run with a limit of 1: runs that touch the chain run one at a time, in launch order,
#: because day D's graph reads the days before it. entity_embeddings (shard workers) are outside any pool
#: and run beside the chain and beside each other.
DAILY_CHAIN_POOL = "omnisage_daily_chain"

#: Dagster pool of omnisage_model, limit 1 like every pool of that instance (its ``default_limit``): one
#: training at a time (the scheduled one and a launched one queue rather than train side by side on the same
#: devices), beside the daily chain, whose retention keeps the days a training reads (reader leases,
#: omnisage_pipeline.training.runner). Promotions are serialised by the library too (ml.promotion_lock), so
#: runs outside Dagster (the CLI, a notebook) stay safe.
MODEL_TRAINING_POOL = "omnisage_model"
