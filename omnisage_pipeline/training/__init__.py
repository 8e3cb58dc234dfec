"""Dagster-free training services: one day of training examples from its published inputs (``examples``)
and the training of one model version, in process or launched on N ranks (``runner``)."""
