"""Tools around the pipeline, behind ``omnisage`` commands: the demo, the synthetic data generator, the
MovieLens importer and the ablation runner. The demo and the ablation runner drive the Dagster definitions,
so this package sits above ``assets`` and ``omnisage_pipeline.definitions``; nothing below imports it."""
