"""Ingest assets (contract "Input" -> warehouse): ``engagement_logs`` and ``entity_metadata``.

Thin wrappers: ``omnisage_pipeline.contract.validation`` reads and validates (rules, precedence of reasons and
accepted widenings are documented there); these assets publish its output atomically and report counts.

engagement_logs, partition D:
    reads ``$OMNISAGE_DATA_ROOT/engagement_logs/dt=D/*.parquet`` (a day folder that exists and holds no
    rows is an empty day: an empty, typed table is published; a missing day folder fails the run with a
    ``dagster.Failure`` naming the path and publishes nothing, unless config ``allow_missing_day``), writes
    valid rows to ``warehouse/engagement_logs/dt=D/`` and bad rows (+ reason, source_file, source_row,
    original_bytes) to ``warehouse/quarantine/engagement_logs/dt=D/`` (published even when empty).
entity_metadata, partition D:
    reads the metadata snapshot ``pins/*.parquet`` and ``boards/*.parquet`` (each folder's files form one
    table; a missing pins/ or boards/ folder is an empty table - logs alone still make nodes - and is
    reported as ``pins_folder_present=False``; it never empties a published day with rows, see
    ``no_empty_replacement`` below), writes ``warehouse/entity_metadata/dt=D/{pins,boards}/``
    and the quarantine as two tables ``warehouse/quarantine/entity_metadata/dt=D/{pins,boards}/`` (pins
    and boards have different columns, so one table per entity type rather than one with an entity column).
    Both are stored once per change, not once per day (``omnisage_pipeline.storage.shared_versions``): the day's
    content digest is taken over the input files' bytes (names, sizes, sha256) and the validation code
    version (this module's INGEST_CODE_VERSION, the sources of the ``omnisage_pipeline.contract`` modules, the
    pyarrow writer's version); when a published version has that digest, ``dt=D`` links to it and no Parquet byte
    is written (the checks run again on that version). Config ``reuse_identical_versions=False`` forces a
    fresh copy.

Blocking asset checks, evaluated on the staged valid table before it is published (``assets.checks``):
``rows_accounted`` (both assets): the row counts of the files about to be published plus the quarantine
(recounted from their Parquet footers) add up to the rows read from the input footers;
``quarantine_share`` (engagement_logs): at most ``max_quarantine_fraction`` (config, default 0.2) of the
day's rows are quarantined; an empty day passes. A refused day's quarantine table is still published (it is
what explains the refusal); its valid table keeps the previous version.
``no_empty_replacement`` (both assets): a table of the day with rows in its published version (logs: the
valid table; metadata: pins, boards) is not replaced by an empty one unless config
``allow_empty_replacement``; it is judged from the validated counts before anything of the day is published,
so a refused day keeps both its valid and its quarantine tables.
A missing ``OMNISAGE_DATA_ROOT`` fails the run; a structurally unreadable input file fails it with a
``ContractError`` naming the file and the column.
"""

import hashlib
from functools import cache
from pathlib import Path

import dagster as dg
import pyarrow as pa
from pydantic import Field

from assets.checks import (
    StagedGate,
    blocking_spec,
    no_empty_replacement,
    parquet_rows,
    published_rows,
    quarantine_share,
)
from assets.daily import ROW_COUNT, DayResult, materialize_days
from omnisage_pipeline.contract import validation as contract
from omnisage_pipeline.contract.validation import (
    ValidationResult,
    list_parquet_files,
    validate_boards,
    validate_engagement_logs,
    validate_pins,
    write_table,
)
from omnisage_pipeline.partitions import DAILY_BACKFILL_POLICY, DAILY_CHAIN_POOL, daily_partitions
from omnisage_pipeline.resources import StorageResource
from omnisage_pipeline.storage.publish import partition_link, publish_partition, require_published
from omnisage_pipeline.storage.shared_versions import files_digest, publish_shared

ACCOUNTING_CHECK = "rows_accounted"
QUARANTINE_CHECK = "quarantine_share"
EMPTY_CHECK = "no_empty_replacement"
OWNERS = ["team:omnisage-data"]
INGEST_CODE_VERSION = "ingest-3"  # 3: quarantine column original_bytes, over-long text cut

_ALLOW_EMPTY = (
    "blocking check no_empty_replacement: True lets an empty table replace a published day that has rows "
    "(e.g. a day retracted on purpose); False (default) refuses, and the published version stays"
)


class EngagementLogsConfig(dg.Config):
    max_quarantine_fraction: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="blocking check quarantine_share: refuse a day whose quarantined share of rows is above this",
    )
    allow_missing_day: bool = Field(
        default=False,
        description="a missing engagement_logs/dt=D folder is an error (nothing is published); True "
        "publishes an empty day instead (a day that has rows is still kept: see allow_empty_replacement)",
    )
    allow_empty_replacement: bool = Field(default=False, description=_ALLOW_EMPTY)


class EntityMetadataConfig(dg.Config):
    reuse_identical_versions: bool = Field(
        default=True,
        description="link the day to a published version with the same content digest instead of writing "
        "a new copy; False writes a fresh copy (e.g. to replace a version damaged on disk)",
    )
    allow_empty_replacement: bool = Field(default=False, description=_ALLOW_EMPTY)


@cache
def _validation_code_version() -> tuple[str, ...]:
    """What, besides the input bytes, decides the validated output's bytes (part of the content digest)."""
    sources = sorted(Path(contract.__file__).parent.glob("*.py"))
    digests = tuple(f"contract/{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}" for p in sources)
    return (INGEST_CODE_VERSION, *digests, f"pyarrow:{pa.__version__}")


def _counts_metadata(result: ValidationResult, prefix: str = "") -> dict:
    meta: dict = {
        f"{prefix}rows_read": result.rows_read,
        f"{prefix}rows_kept": result.rows_kept,
        f"{prefix}rows_quarantined": result.rows_quarantined,
        f"{prefix}files_read": len(result.files),
    }
    for reason, count in result.reason_counts.items():
        meta[f"{prefix}quarantined.{reason}"] = count
    meta[f"{prefix}files"] = dg.MetadataValue.json(result.files)
    return meta


def _accounting_check(asset: str, rows_read: int, tables: list[Path]) -> dg.AssetCheckResult:
    on_disk = [parquet_rows([p]) for p in tables]
    return dg.AssetCheckResult(
        check_name=ACCOUNTING_CHECK,
        asset_key=asset,
        passed=rows_read == sum(on_disk),
        metadata={"rows_read": rows_read, "rows_published": sum(on_disk), "per_table": on_disk},
        description="rows read == rows kept + rows quarantined (staged files recounted)",
    )


def _accounting_spec(asset: str) -> dg.AssetCheckSpec:
    return blocking_spec(
        ACCOUNTING_CHECK,
        asset,
        "rows read from the input == rows kept + rows quarantined in the staged partition",
        partitions_def=daily_partitions,
    )


def _empty_spec(asset: str) -> dg.AssetCheckSpec:
    return blocking_spec(
        EMPTY_CHECK,
        asset,
        "a published day with rows is not replaced by an empty one (allow_empty_replacement)",
        partitions_def=daily_partitions,
    )


def _missing_day(folder: Path, day: str) -> dg.Failure:
    return dg.Failure(
        description=f"engagement_logs dt={day}: the input folder {folder} does not exist (not delivered, or "
        "a wrong OMNISAGE_DATA_ROOT); nothing was published. Set allow_missing_day in the run config of "
        "engagement_logs to publish an empty day instead.",
        metadata={"missing_path": dg.MetadataValue.path(str(folder)), "day": day},
        allow_retries=False,  # the folder does not appear by retrying the step
    )


@dg.asset(
    partitions_def=daily_partitions,
    deps=[dg.AssetDep("raw_engagement_logs")],  # the day's input folder (assets.sources), same day
    check_specs=[
        _accounting_spec("engagement_logs"),
        blocking_spec(
            QUARANTINE_CHECK,
            "engagement_logs",
            "quarantined share of the day's rows <= max_quarantine_fraction",
            partitions_def=daily_partitions,
        ),
        _empty_spec("engagement_logs"),
    ],
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    group_name="ingest",
    kinds={"parquet"},
    owners=OWNERS,
    tags={"layer": "ingest"},
    code_version=INGEST_CODE_VERSION,
    description="The day's engagement events, validated against the data contract; bad rows quarantined.",
)
def engagement_logs(context: dg.AssetExecutionContext, config: EngagementLogsConfig, storage: StorageResource):
    settings = storage.settings
    root = settings.require_data_root()
    yield from materialize_days(context, lambda day: _ingest_logs_day(context, config, settings, root, day))


def _ingest_logs_day(context, config: EngagementLogsConfig, settings, root: Path, day: str) -> DayResult:
    folder = root / "engagement_logs" / f"dt={day}"
    files = list_parquet_files(folder)  # a file where the folder belongs raises ContractError
    present = folder.is_dir()
    if not present and not config.allow_missing_day:
        raise _missing_day(folder, day)
    if not present:
        context.log.warning(f"no day folder {folder}: publishing an empty day (allow_missing_day)")
    result = validate_engagement_logs(files, day, root)
    if result.rows_quarantined:
        nonzero = {r: c for r, c in result.reason_counts.items() if c}
        context.log.warning(f"{result.rows_quarantined} log rows quarantined: {nonzero}")

    valid_ds = settings.warehouse_dataset("engagement_logs")
    quarantine_ds = settings.quarantine_dataset("engagement_logs")
    emptied = no_empty_replacement(
        "engagement_logs",
        {"": result.rows_kept},
        published_rows(valid_ds, day, [""]),
        config.allow_empty_replacement,
    )
    gate = StagedGate(
        day,
        lambda staged: [
            _accounting_check("engagement_logs", result.rows_read, [staged, quarantine_dir]),
            quarantine_share(
                "engagement_logs", result.rows_read, result.rows_quarantined, config.max_quarantine_fraction
            ),
        ],
        early=[emptied],
    )
    gate.refuse_early()
    # Quarantine next and unconditionally (it explains a refused day); the valid table, which downstream
    # assets read, is checked in staging and swapped last.
    with publish_partition(quarantine_ds, day) as staging:
        write_table(result.quarantine, staging)
    quarantine_dir = require_published(quarantine_ds, day)
    with publish_partition(valid_ds, day, validate=gate) as staging:
        write_table(result.valid, staging)

    metadata = _counts_metadata(result)
    metadata[ROW_COUNT] = result.rows_kept
    metadata["day_folder_present"] = present
    metadata["path"] = dg.MetadataValue.path(str(partition_link(valid_ds, day)))
    metadata["quarantine_path"] = dg.MetadataValue.path(str(partition_link(quarantine_ds, day)))
    return DayResult(metadata, gate.results)


@dg.asset(
    partitions_def=daily_partitions,
    deps=[dg.AssetDep("raw_entity_metadata")],  # the metadata snapshot (assets.sources), read by every day
    check_specs=[_accounting_spec("entity_metadata"), _empty_spec("entity_metadata")],
    backfill_policy=DAILY_BACKFILL_POLICY,
    pool=DAILY_CHAIN_POOL,
    group_name="ingest",
    kinds={"parquet"},
    owners=OWNERS,
    tags={"layer": "ingest"},
    code_version=INGEST_CODE_VERSION,
    description="Pin and board metadata snapshot, validated against the data contract; bad rows quarantined.",
)
def entity_metadata(context: dg.AssetExecutionContext, config: EntityMetadataConfig, storage: StorageResource):
    settings = storage.settings
    root = settings.require_data_root()
    yield from materialize_days(context, lambda day: _ingest_metadata_day(context, config, settings, root, day))


def _ingest_metadata_day(context, config: EntityMetadataConfig, settings, root: Path, day: str) -> DayResult:
    present = {kind: (root / kind).is_dir() for kind in ("pins", "boards")}
    for kind, is_there in present.items():
        if not is_there:
            context.log.warning(f"no {root / kind} folder: no {kind} metadata (entities keep empty features)")
    files = {kind: list_parquet_files(root / kind) for kind in ("pins", "boards")}
    pins = validate_pins(files["pins"], root)
    boards = validate_boards(files["boards"], root)
    digest = files_digest(root, files, salt=_validation_code_version())

    valid_ds = settings.warehouse_dataset("entity_metadata")
    quarantine_ds = settings.quarantine_dataset("entity_metadata")
    reuse = config.reuse_identical_versions
    emptied = no_empty_replacement(
        "entity_metadata",
        {"pins": pins.rows_kept, "boards": boards.rows_kept},
        published_rows(valid_ds, day, ["pins", "boards"]),
        config.allow_empty_replacement,
    )
    rows_read = pins.rows_read + boards.rows_read
    gate = StagedGate(
        day,
        lambda staged: [
            _accounting_check(
                "entity_metadata",
                rows_read,
                [staged / "pins", staged / "boards", quarantine.version / "pins", quarantine.version / "boards"],
            )
        ],
        early=[emptied],
    )
    gate.refuse_early()
    write_quarantine = _pins_and_boards_writer(pins.quarantine, boards.quarantine)
    quarantine = publish_shared(quarantine_ds, day, digest, write_quarantine, reuse=reuse)
    write_valid = _pins_and_boards_writer(pins.valid, boards.valid)
    valid = publish_shared(valid_ds, day, digest, write_valid, validate=gate, reuse=reuse)
    if valid.reused:
        context.log.info(f"dt={day}: catalogue unchanged, linked to the published version {valid.version.name}")

    metadata: dict = {}
    metadata.update(_counts_metadata(pins, "pins."))
    metadata.update(_counts_metadata(boards, "boards."))
    metadata["rows_read"] = rows_read
    metadata["rows_kept"] = pins.rows_kept + boards.rows_kept
    metadata["rows_quarantined"] = pins.rows_quarantined + boards.rows_quarantined
    metadata[ROW_COUNT] = pins.rows_kept + boards.rows_kept
    metadata["image_dim"] = int(pins.extra.get("image_dim", 0))
    metadata["pins_folder_present"] = present["pins"]
    metadata["boards_folder_present"] = present["boards"]
    metadata.update(_version_metadata(valid, quarantine))
    metadata["path"] = dg.MetadataValue.path(str(partition_link(valid_ds, day)))
    metadata["quarantine_path"] = dg.MetadataValue.path(str(partition_link(quarantine_ds, day)))
    return DayResult(metadata, gate.results)


def _pins_and_boards_writer(pins: pa.Table, boards: pa.Table):
    def build(staging: Path) -> None:
        write_table(pins, staging / "pins")
        write_table(boards, staging / "boards")

    return build


def _version_metadata(valid, quarantine) -> dict:
    """Which stored version the day shows, and what this run wrote for it (0 bytes when reused)."""
    return {
        "reused_version": valid.reused,
        "version": valid.version.name,
        "content_digest": valid.digest,
        "bytes_written": valid.bytes_written + quarantine.bytes_written,
        "quarantine_reused_version": quarantine.reused,
    }
