"""On-disk storage of the pipeline's outputs, Dagster-free: atomic versioned publishing (``publish``),
content-addressed shared versions (``shared_versions``) and retention with reader leases (``retention``)."""
