"""Evaluation services, Dagster-free: the daily recall report (``report``)."""
