"""Dagster-free training services: resolving a training day's published inputs and running (or launching)
the training of one model version (``runner``)."""
