"""What has arrived under ``$OMNISAGE_DATA_ROOT``, read from the file system alone (no file is opened).

The contract's input folders (README "Input"): ``engagement_logs/dt=YYYY-MM-DD/`` (one per UTC day) and the
metadata snapshot ``pins/`` and ``boards/``. Each folder is summarised as a ``FolderState``: present or not,
its contract files (``*.parquet``, hidden names skipped, as the ingest reads them), their bytes, the newest
modification time and a fingerprint of (name, size, mtime) per file, which changes whenever a file is
added, removed or rewritten. Dagster-free: the input assets and the arrival sensor report these figures.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from omnisage_pipeline.contract.reading import list_parquet_files

ENGAGEMENT_LOGS = "engagement_logs"
SNAPSHOT_FOLDERS = ("pins", "boards")
_DAY_FOLDER = re.compile(r"dt=(\d{4}-\d{2}-\d{2})")


@dataclass(frozen=True)
class FolderState:
    path: Path
    present: bool
    files: int
    bytes: int
    #: newest modification time (seconds) of the folder itself and its files; 0.0 when missing
    newest_mtime: float
    #: sha256 over (name, size, mtime_ns) of every file; "" when the folder is missing
    fingerprint: str


def folder_state(folder: Path) -> FolderState:
    """The folder's contract files, summarised. A file where the folder belongs raises ``ContractError``
    (``list_parquet_files``): never read as a missing folder."""
    folder = Path(folder)
    files = list_parquet_files(folder)
    if not folder.is_dir():
        return FolderState(folder, False, 0, 0, 0.0, "")
    digest = hashlib.sha256()
    total, newest = 0, folder.stat().st_mtime
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
        newest = max(newest, stat.st_mtime)
    return FolderState(folder, True, len(files), total, newest, digest.hexdigest())


def engagement_day_folder(data_root: Path, day: str) -> Path:
    """``$OMNISAGE_DATA_ROOT/engagement_logs/dt=D`` (what ``engagement_logs`` of day D reads)."""
    return Path(data_root) / ENGAGEMENT_LOGS / f"dt={day}"


def delivered_days(data_root: Path) -> tuple[list[str], list[Path]]:
    """(days, unexpected): the days that have a folder ``engagement_logs/dt=YYYY-MM-DD``, oldest first, and
    every other entry of ``engagement_logs/`` (not a day folder: reported by the caller, never skipped
    silently). A missing ``engagement_logs/`` folder has no days."""
    logs = Path(data_root) / ENGAGEMENT_LOGS
    if not logs.is_dir():
        return [], []
    days, unexpected = [], []
    for entry in sorted(logs.iterdir()):
        if entry.name.startswith((".", "_")):
            continue  # the contract's hidden names (markers, editor files)
        match = _DAY_FOLDER.fullmatch(entry.name)
        if match and entry.is_dir() and _is_date(match.group(1)):
            days.append(match.group(1))
        else:
            unexpected.append(entry)
    return days, unexpected


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def snapshot_states(data_root: Path) -> dict[str, FolderState]:
    """``pins/`` and ``boards/`` (what ``entity_metadata`` reads), by folder name."""
    return {name: folder_state(Path(data_root) / name) for name in SNAPSHOT_FOLDERS}


def snapshot_fingerprint(states: dict[str, FolderState]) -> str:
    """One fingerprint over the snapshot's folders ("" for a missing folder is part of it)."""
    joined = "\n".join(f"{name}:{states[name].fingerprint}" for name in sorted(states))
    return hashlib.sha256(joined.encode()).hexdigest()
