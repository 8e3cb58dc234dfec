"""On-disk and artifact names shared by the libraries, the assets and the tools (one definition each).

Dagster-free and import-free, so every layer can read them: ``ml`` (training), the ``assets``,
``omnisage_pipeline`` (embedding service, evaluation, sensors, serving) and the tools.
"""

#: ``warehouse/pruned_edges/dt=D/_holdout.json``: the held-out split (fraction, seed) the day's graph left out.
HOLDOUT_FILE = "_holdout.json"
#: ``graph/dt=D/neighborhoods/``: the day's cached neighbourhoods beside the graph snapshot.
NEIGHBORHOODS_DIR = "neighborhoods"
#: MLflow artifact path of the model directory (ml.model_io) in a training run.
MODEL_ARTIFACT_PATH = "model"
#: The PinSage-like baseline (Table 2) trained beside the model, in the same MLflow run (never registered).
PINSAGE_ARTIFACT_PATH = "baselines/pinsage"
#: ``embeddings/dt=D/_manifest.json`` (and ``user_embeddings``): the model version and inputs of the day.
EMBEDDINGS_MANIFEST = "_manifest.json"
#: ``embeddings/.shards/``: the staging area of sharded embedding workers (no reader lists dot-folders).
SHARDS_DIR = ".shards"
#: ``reports/dt=D/``: the recall report, its markdown table and its plot.
REPORT_FILE = "recall.json"
MARKDOWN_FILE = "recall.md"
PLOT_FILE = "recall.png"
