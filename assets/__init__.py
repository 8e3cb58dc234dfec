"""Dagster wiring only: each asset reads its inputs, calls one library function (graph_engine, ml or a
Dagster-free omnisage_pipeline subpackage), publishes, and attaches metadata and check results."""

from assets import evaluation, features, graph, inference, ingest, serving, snapshot, training

#: Every module holding assets or asset checks; definitions.py loads them all.
ASSET_MODULES = [ingest, graph, snapshot, features, training, inference, evaluation, serving]
