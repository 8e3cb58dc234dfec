"""The OmniSage model library (PyTorch, no Dagster)."""

import os

# OpenMP threads that spin only briefly before sleeping: torch's intra-op threads otherwise spin ~300,000
# rounds at every barrier, and beside any other busy process (a loader worker, a Dagster step, a test) a
# 2-core machine measured 10-25x slower steps (5.6-7.0 s instead of 0.55-0.63 s). A short spin keeps the
# latency of small operators on an idle machine (fully passive waiting cost ~15% there). Must be set before
# torch loads its OpenMP runtime; values already in the environment win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
