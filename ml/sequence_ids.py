"""Entity-id sequences -> the dense index space of one batch, with padding kept beside the ids.

The data contract allows any int64 entity id (negative ones and -1 included), so no id value can stand for
"padding" or "nothing": padded id arrays travel with a bool mask (True = an id). Once the ids are mapped to
rows of the batch's unique entities, -1 is free to mean padding again (``SequenceBatch.sequence_index``).
"""

from __future__ import annotations

import numpy as np


def dedupe_sequences(
    sequences: np.ndarray,
    future_ids: np.ndarray | None = None,
    *,
    valid: np.ndarray | None = None,
    future_valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Entity ids [U, T] and future ids [U] -> (unique ids [E], sequence_index [U, T], future_index [U];
    -1 = padding in both indices). Vectorised (np.unique); every entity is embedded once per batch (3.3.3).
    ``valid`` [U, T] and ``future_valid`` [U] mark the ids (False = padding). Without a mask -1 marks padding,
    for callers whose ids are all >= 0; any other negative value is then refused rather than dropped."""
    seq = np.asarray(sequences, dtype=np.int64)
    if seq.ndim != 2:
        raise ValueError(f"sequences must be 2-D [U, T], got shape {seq.shape}")
    valid = id_mask("sequences", seq, valid)
    fut = None if future_ids is None else np.asarray(future_ids, dtype=np.int64)
    fut_ok = None if fut is None else id_mask("future_ids", fut, future_valid)
    uniq = np.unique(seq[valid] if fut is None else np.concatenate([seq[valid], fut[fut_ok]]))
    index = np.where(valid, np.searchsorted(uniq, seq), -1)
    fut_index = None if fut is None else np.where(fut_ok, np.searchsorted(uniq, fut), -1)
    return uniq, index, fut_index


def id_mask(name: str, ids: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """``valid`` as a bool mask of ``ids``' shape; without one, ids != -1 (other negatives are refused)."""
    if valid is None:
        if (ids < -1).any():
            raise ValueError(f"{name}: holds negative entity ids; pass the padding as a mask (valid=), -1 is an id too")
        return ids != -1
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != ids.shape:
        raise ValueError(f"{name}: padding mask has shape {valid.shape}, expected {ids.shape}")
    return valid


def padded_ids(histories: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged id arrays -> (int64 [n, T] left-aligned, bool valid [n, T]); T = the longest (at least 1)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    t = max(int(lengths.max()) if lengths.size else 0, 1)
    valid = np.arange(t)[None, :] < lengths[:, None]
    ids = np.full(valid.shape, -1, dtype=np.int64)  # the mask, not this value, marks the padding
    if lengths.sum():
        ids[valid] = np.concatenate([np.asarray(h, dtype=np.int64).reshape(-1) for h in histories])
    return ids, valid
