"""Dagster wiring only: each asset reads its inputs, calls one library function (graph_engine, ml or a
Dagster-free omnisage_pipeline subpackage), publishes, and attaches metadata and check results."""

from assets import evaluation, features, graph, inference, ingest, serving, snapshot, sources, training

#: Every module holding assets or asset checks; definitions.py loads them all. ``sources``: the inputs the
#: pipeline reads but never writes (the contract's folders, the registry's champion), as observable assets.
ASSET_MODULES = [sources, ingest, graph, snapshot, features, training, inference, evaluation, serving]
