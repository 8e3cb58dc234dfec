"""Model and training configuration (paper A.3) with two presets.

``paper``  - the hyper-parameters of A.3.3: embedder transformer 1 layer, 12 heads, dim 768, MLP 3072, ReLU;
             entity-feature projection g_x 4 layers, hidden 1024, ReLU, no norm (A.3.2); user-sequence model
             4 layers, 4 heads, dim 512, GELU; AdamW, lr 0.005, linear warm-up then cosine annealing, fp16.
``small``  - the same architecture at tiny widths, for CPU tests, the demo and CPU inference.

Values the paper does not state are marked "not in the paper" and chosen to be conventional.
All configs are plain dataclasses of JSON-able values (``to_dict`` / ``from_dict``) so a checkpoint or an
MLflow run can carry them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

TASK_NAMES = ("entity_entity", "entity_feature", "user_entity")


@dataclass
class TextHashConfig:
    """Hash embeddings (ref [34], Svenstrup et al. 2017): ``num_hashes`` hash functions map a token id to
    ``num_hashes`` rows of ONE shared table of ``num_buckets`` rows; the rows are combined with per-token
    importance weights that are themselves looked up by a hash into ``importance_buckets`` rows."""

    num_buckets: int = 1 << 18
    num_hashes: int = 2
    importance_buckets: int = 1 << 20
    dim: int = 256
    seed: int = 0


@dataclass
class EmbedderConfig:
    """One per-type embedder f_t (3.2, A.3.1)."""

    aggregator: str = "transformer"  # "transformer" (the paper) or "mean" (PinSage-like baseline / A.2.4 ablation)
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 1
    ffn_dim: int = 3072
    activation: str = "relu"
    dropout: float = 0.0  # not in the paper
    image_hidden: int = 768  # image MLP hidden width (not in the paper)
    neighbor_hidden: int = 768  # neighbour-feature MLP hidden width (not in the paper)
    head_hidden: int = 768  # "transformer head" MLP hidden width (not in the paper)
    max_blocks: int = 8  # capacity of the neighbour block embedding (layout blocks must fit)
    max_rank: int = 128  # capacity of the within-block proximity-rank embedding (ranks beyond share the last row)
    # learned entity-identity token (ml.encoders.IdHashEncoder) for u and every neighbour; 0 = content only
    # (the paper's f_t). Not in the paper: see the encoder's docstring for why.
    id_buckets: int = 0
    id_hashes: int = 2
    # share of training rows whose identity tokens are zeroed (not in the paper): trains the content + graph
    # path of f_t to stand alone, which is all an entity unseen in training has
    id_dropout: float = 0.0


@dataclass
class FeatureTaskConfig:
    """g_x per feature type x (3.3.2, A.3.2): MLP, ``layers`` Linear layers, ReLU, no normalisation."""

    layers: int = 4
    hidden: int = 1024
    text_hash: TextHashConfig = field(default_factory=lambda: TextHashConfig(dim=256))
    # eq. 3's queries g_x(v) per step come from at most this many of u's neighbours (the highest-proximity
    # columns of each block, in proportion to its k_t; not in the paper): with the paper's 150 neighbours every
    # node would otherwise cost 151 queries per feature type. None = every neighbour.
    max_neighbor_queries: int | None = 16


@dataclass
class SequenceConfig:
    """Causal user-sequence transformer T (3.3.3, A.3.3)."""

    d_model: int = 512
    n_heads: int = 4
    n_layers: int = 4
    ffn_dim: int = 2048  # not in the paper (4 x d_model)
    activation: str = "gelu"
    dropout: float = 0.0
    max_len: int = 64  # t_max (not in the paper)


@dataclass
class LossConfig:
    """Sampled softmax (eq. 1): s(q, v) = lambda * q.v - log Q(v)."""

    # lambda is an inverse temperature applied to a cosine (q, v are unit vectors): order 10-30.
    scale: float = 20.0
    learn_scale: bool = False
    scale_min: float = 5.0
    scale_max: float = 50.0
    chunk_size: int | None = 1024  # Algorithm 1 query chunk; None = unchunked
    logq_correction: bool = True
    sketch_width: int = 1 << 20
    sketch_depth: int = 4
    sketch_seed: int = 0


@dataclass
class ModelConfig:
    out_dim: int = 256  # OmniSage embedding dimension d (not in the paper)
    image_dim: int = 0  # D of the data set's image vectors; 0 = no image feature
    node_types: tuple[str, ...] = ("pin", "board")
    text: TextHashConfig = field(default_factory=TextHashConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    feature_task: FeatureTaskConfig = field(default_factory=FeatureTaskConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # eq. 6 weights lambda_p, lambda_f, lambda_s; a task is switched off by listing it out of ``tasks``.
    lambda_p: float = 1.0
    lambda_f: float = 1.0
    lambda_s: float = 1.0
    tasks: tuple[str, ...] = TASK_NAMES
    # user-entity: eq. 4 (next action) and eq. 5 (future action) can be switched separately.
    next_action: bool = True
    future_action: bool = True

    def __post_init__(self) -> None:
        self.node_types = tuple(self.node_types)
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in TASK_NAMES]
        if bad:
            raise ValueError(f"ModelConfig.tasks: unknown task(s) {bad}; known: {TASK_NAMES}")
        if self.embedder.aggregator not in ("transformer", "mean"):
            raise ValueError(
                f"EmbedderConfig.aggregator must be 'transformer' or 'mean', got {self.embedder.aggregator!r}"
            )
        if self.embedder.d_model % self.embedder.n_heads:
            raise ValueError("EmbedderConfig.d_model must be divisible by n_heads")
        if self.sequence.d_model % self.sequence.n_heads:
            raise ValueError("SequenceConfig.d_model must be divisible by n_heads")
        if self.image_dim < 0:
            raise ValueError("ModelConfig.image_dim must be >= 0")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        sub = {
            "text": TextHashConfig,
            "embedder": EmbedderConfig,
            "sequence": SequenceConfig,
            "loss": LossConfig,
        }
        for key, klass in sub.items():
            if key in d and isinstance(d[key], dict):
                d[key] = klass(**d[key])
        if "feature_task" in d and isinstance(d["feature_task"], dict):
            ft = dict(d["feature_task"])
            if isinstance(ft.get("text_hash"), dict):
                ft["text_hash"] = TextHashConfig(**ft["text_hash"])
            d["feature_task"] = FeatureTaskConfig(**ft)
        return cls(**d)


@dataclass
class TrainConfig:
    lr: float = 0.005  # A.3.3
    weight_decay: float = 0.01  # not in the paper (AdamW default)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 1000  # not in the paper
    total_steps: int = 100_000  # cosine annealing horizon; training stops here unless epochs ends it first
    epochs: int | None = None  # None: loop over the batch factory until total_steps
    min_lr_ratio: float = 0.0  # cosine anneals to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm (not in the paper)
    precision: str = "auto"  # "auto" (fp16 on CUDA, fp32 on CPU), "fp16", "bf16", "fp32"
    device: str = "auto"  # "auto" = cuda when available
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0 = only at the end (when checkpoint_dir is set)
    checkpoint_dir: str | None = None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


def paper(image_dim: int = 0) -> tuple[ModelConfig, TrainConfig]:
    """A.3 hyper-parameters."""
    model = ModelConfig(
        out_dim=256,
        image_dim=image_dim,
        text=TextHashConfig(num_buckets=1 << 17, num_hashes=2, importance_buckets=1 << 20, dim=256),
        embedder=EmbedderConfig(d_model=768, n_heads=12, n_layers=1, ffn_dim=3072, activation="relu"),
        feature_task=FeatureTaskConfig(layers=4, hidden=1024),
        sequence=SequenceConfig(d_model=512, n_heads=4, n_layers=4, ffn_dim=2048, activation="gelu"),
        loss=LossConfig(scale=20.0, chunk_size=1024),
    )
    return model, TrainConfig(lr=0.005, precision="auto")


def small(image_dim: int = 0) -> tuple[ModelConfig, TrainConfig]:
    """Tiny widths for CPU tests, the demo and CPU inference; same structure as ``paper``."""
    model = ModelConfig(
        out_dim=32,
        image_dim=image_dim,
        text=TextHashConfig(num_buckets=1 << 12, num_hashes=2, importance_buckets=1 << 14, dim=32),
        embedder=EmbedderConfig(
            d_model=32,
            n_heads=4,
            n_layers=1,
            ffn_dim=64,
            activation="relu",
            image_hidden=32,
            neighbor_hidden=32,
            head_hidden=32,
        ),
        feature_task=FeatureTaskConfig(
            layers=4,
            hidden=64,
            text_hash=TextHashConfig(num_buckets=1 << 12, num_hashes=2, importance_buckets=1 << 14, dim=32),
        ),
        sequence=SequenceConfig(d_model=32, n_heads=4, n_layers=1, ffn_dim=64, activation="gelu", max_len=16),
        loss=LossConfig(scale=20.0, chunk_size=256, sketch_width=1 << 12, sketch_depth=4),
    )
    return model, TrainConfig(lr=0.003, warmup_steps=20, total_steps=500, log_every=25, precision="auto")


def with_width(model: ModelConfig, width: int) -> ModelConfig:
    """``model`` with embedding width d = ``width``: the output, the embedder's d_model and hidden MLPs, the
    text table and the sequence model (feed-forward layers 2 d); the number of heads is kept (d must divide)."""
    if width % model.embedder.n_heads or width % model.sequence.n_heads:
        raise ValueError(f"width {width} must be a multiple of the attention heads")
    hidden = {"image_hidden": width, "neighbor_hidden": width, "head_hidden": width}
    e = dataclasses.replace(model.embedder, d_model=width, ffn_dim=2 * width, **hidden)
    seq = dataclasses.replace(model.sequence, d_model=width, ffn_dim=2 * width)
    text = dataclasses.replace(model.text, dim=width)
    ft = dataclasses.replace(
        model.feature_task,
        hidden=2 * width,
        text_hash=dataclasses.replace(model.feature_task.text_hash, dim=width),
    )
    return model.replace(out_dim=width, embedder=e, sequence=seq, text=text, feature_task=ft)


PRESETS = {"paper": paper, "small": small}


def preset(name: str, image_dim: int = 0) -> tuple[ModelConfig, TrainConfig]:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name](image_dim=image_dim)
