"""Serving the daily embeddings: per-type FAISS indexes (``index``), the published day's build with its
recall check (``build``), the queries shared by the CLI and the HTTP service (``neighbors``), and the
FastAPI app (``service``). Dagster-free: ``assets/serving.py`` wires ``build`` into the daily job."""
