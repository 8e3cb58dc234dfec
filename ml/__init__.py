"""The OmniSage model library (PyTorch, no Dagster)."""

import os

# OpenMP threads that wait passively: torch's intra-op threads otherwise spin at every barrier, and beside any
# other busy process (a loader worker, a Dagster step, a test) a 2-core machine measured 10-25x slower steps
# (5.6-7.0 s instead of 0.55-0.63 s). Must be set before torch loads its OpenMP runtime; a value already in
# the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
