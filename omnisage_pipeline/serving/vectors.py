"""Reading one day's published embeddings into per-type matrices (the index's input and the check's truth).

``embeddings/dt=D/*.parquet`` (``entity_type``, ``entity_id``, ``embedding`` list<float32>) and
``user_embeddings/dt=D/*.parquet`` (``user_id``, ``embedding``) are validated as they are read: a null,
ragged, non-finite or zero vector, an unknown entity type or a duplicate id fails with an error naming the
file and the field (an index built over such rows would answer nonsense, so nothing is dropped silently).
Every vector is scaled to unit L2 norm (a no-op for the model's output) so that inner product = cosine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ENTITY_TYPES = ("pin", "board")
USER = "user"


class EmbeddingsError(ValueError):
    """A published embeddings file that cannot be indexed (names the file and the field)."""


@dataclass(frozen=True)
class Vectors:
    """Entities of one type: ``ids`` sorted unique int64 [n], ``matrix`` unit-norm float32 [n, d]."""

    ids: np.ndarray
    matrix: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1]) if self.matrix.ndim == 2 else 0

    def __len__(self) -> int:
        return len(self.ids)


def _matrix(column: pa.ChunkedArray, path: Path) -> np.ndarray:
    """list<float> column -> float32 [n, d], every row the same length, finite and non-zero."""
    arr = column.combine_chunks()
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise EmbeddingsError(f"{path}: field 'embedding' is {arr.type}, expected list<float32>")
    if arr.null_count:
        raise EmbeddingsError(f"{path}: field 'embedding' holds {arr.null_count} null vectors")
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(arr).to_numpy()
    if lengths.min() != lengths.max() or lengths[0] == 0:
        raise EmbeddingsError(
            f"{path}: field 'embedding' has vectors of lengths {int(lengths.min())}..{int(lengths.max())}; "
            "one fixed non-zero length expected"
        )
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    matrix = np.asarray(values, dtype=np.float32).reshape(n, int(lengths[0]))
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        raise EmbeddingsError(f"{path}: field 'embedding' has {int((~finite).sum())} non-finite vectors")
    norms = np.linalg.norm(matrix, axis=1)
    if (norms == 0).any():
        raise EmbeddingsError(f"{path}: field 'embedding' has {int((norms == 0).sum())} all-zero vectors")
    return np.ascontiguousarray(matrix / norms[:, None], dtype=np.float32)


def _read_file(path: Path, columns: list[str]) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, KeyError, OSError) as exc:
        raise EmbeddingsError(f"{path}: cannot read fields {columns}: {exc}") from exc


def _collect(parts: list[tuple[np.ndarray, np.ndarray, Path]], what: str) -> Vectors:
    """Concatenate (ids, matrix, file) parts, sort by id; a duplicate id or a second dimension is an error."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return Vectors(np.zeros(0, np.int64), np.zeros((0, 0), np.float32))
    dims = {m.shape[1] for _, m, _ in parts}
    if len(dims) > 1:
        raise EmbeddingsError(f"{what}: field 'embedding' has dimensions {sorted(dims)} across {parts[0][2].parent}")
    ids = np.concatenate([i for i, _, _ in parts])
    matrix = np.concatenate([m for _, m, _ in parts])
    order = np.argsort(ids, kind="stable")
    ids, matrix = ids[order], matrix[order]
    dup = np.flatnonzero(np.diff(ids) == 0)
    if dup.size:
        raise EmbeddingsError(
            f"{what}: field '{'user_id' if what == USER else 'entity_id'}' repeats id "
            f"{int(ids[dup[0]])} ({dup.size} duplicates) in {parts[0][2].parent}"
        )
    return Vectors(ids, np.ascontiguousarray(matrix))


def read_entity_vectors(folder: Path) -> dict[str, Vectors]:
    """Pins and boards of one published ``embeddings/dt=D`` version directory."""
    parts: dict[str, list] = {t: [] for t in ENTITY_TYPES}
    for path in sorted(Path(folder).glob("*.parquet")):
        table = _read_file(path, ["entity_type", "entity_id", "embedding"])
        types = table.column("entity_type").to_numpy(zero_copy_only=False)
        unknown = sorted(set(types.tolist()) - set(ENTITY_TYPES))
        if unknown:
            raise EmbeddingsError(f"{path}: field 'entity_type' holds {unknown}; expected {list(ENTITY_TYPES)}")
        if table.column("entity_id").null_count:
            raise EmbeddingsError(f"{path}: field 'entity_id' holds null ids")
        ids = table.column("entity_id").to_numpy().astype(np.int64)
        matrix = _matrix(table.column("embedding"), path)
        for t in ENTITY_TYPES:
            rows = np.flatnonzero(types == t)
            parts[t].append((ids[rows], matrix[rows], path))
    return {t: _collect(parts[t], t) for t in ENTITY_TYPES}


def read_user_vectors(folder: Path) -> Vectors:
    """Users of one published ``user_embeddings/dt=D`` version directory."""
    parts = []
    for path in sorted(Path(folder).glob("*.parquet")):
        table = _read_file(path, ["user_id", "embedding"])
        if table.column("user_id").null_count:
            raise EmbeddingsError(f"{path}: field 'user_id' holds null ids")
        parts.append(
            (
                table.column("user_id").to_numpy().astype(np.int64),
                _matrix(table.column("embedding"), path),
                path,
            )
        )
    return _collect(parts, USER)


def model_version_of(folder: Path) -> str:
    """The model version of a published embeddings partition (its ``_manifest.json``, else the column)."""
    manifest = Path(folder) / "_manifest.json"
    if manifest.is_file():
        version = json.loads(manifest.read_text()).get("model_version")
        if version is not None:
            return str(version)
    versions: set[str] = set()
    for path in sorted(Path(folder).glob("*.parquet")):
        versions |= set(pc.unique(_read_file(path, ["model_version"]).column("model_version")).to_pylist())
    if len(versions) > 1:
        raise EmbeddingsError(f"{folder}: field 'model_version' holds several versions {sorted(versions)}")
    return str(versions.pop()) if versions else ""
