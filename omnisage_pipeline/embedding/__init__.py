"""Daily batch inference, Dagster-free: the registry's champion (``champion``), one day's entities and
users embedded (``day``) and published whole or by shard workers (``shards``). The ``entity_embeddings``
asset (assets/inference.py) wires them; the module docstring of ``day`` describes the outputs."""
