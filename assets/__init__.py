"""Thin Dagster assets: read inputs, call the libraries (graph_engine, ml), publish, attach metadata."""

from assets import evaluation, features, graph, inference, ingest, serving, snapshot, training

#: Every module holding assets or asset checks; definitions.py loads them all.
ASSET_MODULES = [ingest, graph, snapshot, features, training, inference, evaluation, serving]
