"""The contract's environment variables (README "Data contract" / "Environment"), read in one place.

Dagster-free on purpose: the CLI, the benchmarks and the resources all read the same values. The Dagster
code location reads them ONCE, when the definitions load (``load_settings``): the partitions, the graph
window mapping, the schedules and every resource are built from that one ``Settings`` object, and nothing
else in the pipeline reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path

# The synthetic demo data starts on this day unless OMNISAGE_START_DATE says otherwise.
DEMO_START_DATE = "2026-01-01"
DEFAULT_WINDOW_DAYS = 30
#: Days of heavy per-day outputs (graph/, features/, embeddings/, user_embeddings/) kept by retention
#: (omnisage_pipeline.storage.retention); unset = OMNISAGE_WINDOW_DAYS. Must be >= OMNISAGE_WINDOW_DAYS.
RETENTION_ENV = "OMNISAGE_RETENTION_DAYS"
ENGINES = ("spark", "duckdb")
#: OMNISAGE_MLFLOW_UI_URL: where ``mlflow ui`` serves the tracking store (the addresses in Dagster metadata).
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"


class SettingsError(ValueError):
    """An environment variable of the contract holds a value the pipeline cannot use."""


def parse_retention_days(raw: str | None) -> int | None:
    """OMNISAGE_RETENTION_DAYS as an int, or None when unset/empty (then the default: the window)."""
    if raw is None or not str(raw).strip():
        return None
    try:
        return int(str(raw).strip())
    except ValueError as exc:
        raise SettingsError(
            f"{RETENTION_ENV}={raw!r} is not an integer (days of graph/features/embeddings kept)"
        ) from exc


@dataclass(frozen=True)
class Settings:
    home: Path
    data_root: Path
    data_root_is_default: bool
    mlflow_tracking_uri: str
    engine: str
    spark_master: str
    start_date: str
    window_days: int
    #: OMNISAGE_RETENTION_DAYS (None = window_days), validated >= window_days.
    retention_days: int | None = None
    #: OMNISAGE_TRAIN_CRON: the weekly training schedule (None = omnisage_pipeline.training_jobs' default).
    train_cron: str | None = None
    #: OMNISAGE_MLFLOW_UI_URL: base address of the MLflow UI, for links from Dagster metadata.
    mlflow_ui_url: str = DEFAULT_MLFLOW_UI_URL

    def __post_init__(self) -> None:
        if self.retention_days is None:
            object.__setattr__(self, "retention_days", self.window_days)
        elif self.retention_days < self.window_days:
            raise SettingsError(
                f"{RETENTION_ENV}={self.retention_days} is less than OMNISAGE_WINDOW_DAYS={self.window_days}: "
                f"retention must keep at least the graph window (set {RETENTION_ENV} >= {self.window_days}, "
                "or leave it unset for the default, the window)"
            )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        home = Path(env.get("OMNISAGE_HOME") or "./.omnisage").expanduser().absolute()
        data_root_raw = env.get("OMNISAGE_DATA_ROOT")
        data_root = Path(data_root_raw).expanduser().absolute() if data_root_raw else home / "synthetic"
        engine = (env.get("OMNISAGE_ENGINE") or "spark").strip().lower()
        if engine not in ENGINES:
            raise SettingsError(f"OMNISAGE_ENGINE={engine!r}: expected one of {', '.join(ENGINES)}")
        start_date = env.get("OMNISAGE_START_DATE") or DEMO_START_DATE
        try:
            date.fromisoformat(start_date)
        except ValueError as exc:
            raise SettingsError(f"OMNISAGE_START_DATE={start_date!r} is not YYYY-MM-DD") from exc
        window_raw = env.get("OMNISAGE_WINDOW_DAYS") or str(DEFAULT_WINDOW_DAYS)
        try:
            window_days = int(window_raw)
        except ValueError as exc:
            raise SettingsError(f"OMNISAGE_WINDOW_DAYS={window_raw!r} is not an integer") from exc
        if window_days < 1:
            raise SettingsError(f"OMNISAGE_WINDOW_DAYS={window_days} must be >= 1")
        mlflow_ui_url = env.get("OMNISAGE_MLFLOW_UI_URL") or DEFAULT_MLFLOW_UI_URL
        if not mlflow_ui_url.startswith(("http://", "https://")):
            raise SettingsError(f"OMNISAGE_MLFLOW_UI_URL={mlflow_ui_url!r} is not an http(s):// address")
        return cls(
            home=home,
            data_root=data_root,
            data_root_is_default=not data_root_raw,
            mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}",
            engine=engine,
            spark_master=env.get("OMNISAGE_SPARK_MASTER") or "local[*]",
            start_date=start_date,
            window_days=window_days,
            retention_days=parse_retention_days(env.get(RETENTION_ENV)),
            train_cron=env.get("OMNISAGE_TRAIN_CRON") or None,
            mlflow_ui_url=mlflow_ui_url,
        )

    # Output layout (contract "Outputs"): every writer goes through these.
    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse"

    def warehouse_dataset(self, name: str) -> Path:
        return self.warehouse / name

    def quarantine_dataset(self, name: str) -> Path:
        return self.warehouse / "quarantine" / name

    @property
    def graph_dir(self) -> Path:
        return self.home / "graph"

    @property
    def features_dir(self) -> Path:
        return self.home / "features"

    @property
    def embeddings_dir(self) -> Path:
        return self.home / "embeddings"

    @property
    def user_embeddings_dir(self) -> Path:
        return self.home / "user_embeddings"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    @property
    def reports_dir(self) -> Path:
        return self.home / "reports"

    @property
    def scratch_dir(self) -> Path:
        """Spark local dirs, numba and matplotlib caches: kept under OMNISAGE_HOME, not the user's $HOME."""
        return self.home / "scratch"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def require_data_root(self) -> Path:
        """A data root that does not exist is an error, never an empty input (contract)."""
        if not self.data_root.is_dir():
            hint = (
                " (the default: run `omnisage generate` or `make demo` first, or set OMNISAGE_DATA_ROOT)"
                if self.data_root_is_default
                else ""
            )
            raise FileNotFoundError(f"OMNISAGE_DATA_ROOT {self.data_root} does not exist{hint}")
        return self.data_root


_loaded: Settings | None = None


def load_settings() -> Settings:
    """The code location's Settings: read from the environment on the first call (when the definitions
    load), the same object afterwards. Partitions, schedules and resources are all built from it."""
    global _loaded
    if _loaded is None:
        _loaded = Settings.from_env()
    return _loaded


def configure_process_scratch(settings: Settings) -> None:
    """Point numba's and matplotlib's caches under OMNISAGE_HOME before those libraries are imported."""
    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(settings.scratch_dir / "numba"))
    os.environ.setdefault("MPLCONFIGDIR", str(settings.scratch_dir / "matplotlib"))


#: dagster.yaml of the instance the project creates under OMNISAGE_HOME (``prepare_dagster_home``):
#: - the daily chain one run at a time: its assets share the pool ``omnisage_daily_chain``
#:   (omnisage_pipeline.partitions.DAILY_CHAIN_POOL), and pools are enforced per run with a default limit
#:   of 1, so a run that touches the chain waits in the queue until no other such run is in progress (the
#:   graph of day D reads the daily edges of the days before it, and a day not published yet is read as
#:   missing); queued runs start in launch order. omnisage_model trainings have a pool of their own
#:   (partitions.MODEL_TRAINING_POOL, the same default limit of 1): one training at a time, beside the chain.
#:   Runs outside any pool - entity_embeddings shard workers - run beside them and beside each other, up to
#:   8 runs in all;
#: - telemetry off: Dagster's telemetry writes ``~/.dagster/.telemetry`` into the user's home directory
#:   whatever DAGSTER_HOME says (and the webserver uploads usage data).
DEFAULT_DAGSTER_YAML = """\
concurrency:
  runs:
    max_concurrent_runs: 8
  pools:
    granularity: run
    default_limit: 1
telemetry:
  enabled: false
"""


def prepare_dagster_home(path: Path) -> Path:
    """Create the project's Dagster instance directory (the contract's default, ``$OMNISAGE_HOME/dagster``)
    with ``DEFAULT_DAGSTER_YAML`` when it has no dagster.yaml yet; an existing configuration is left alone."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    if not config.exists():
        tmp = path / f".dagster.yaml.{os.getpid()}"
        tmp.write_text(DEFAULT_DAGSTER_YAML)
        os.replace(tmp, config)
    return path
