"""One checkpoint folder per training run: two runs never share (or delete) each other's; a killed one is resumed.

Layout: ``<root>/<fingerprint>-<pid>.<random>/`` (``last.pt``, ``pinsage/last.pt``, ``mlflow_run.json``): the
fingerprint names the training trajectory (``ml.training_run``), the rest the run. The run that owns a folder
holds an exclusive ``flock`` on its ``owner.lock`` for as long as it trains. The kernel drops that lock when the
process exits, however it exits (SIGKILL included), so "its lock can be taken" means "its run has ended". A new
run of the same fingerprint:

- resumes (``resume=True``) the folder of that fingerprint with the newest ``last.pt`` whose lock it can take
  without waiting: a folder of a live run is skipped, and of two runs racing for one dead folder one gets it;
- otherwise trains into a new folder, made under a hidden name with its lock already held and then renamed
  into place, so no other run ever sees it unowned.

A registered run removes its folder (``RunDir.remove``): renamed out of the fingerprint's names first, then
deleted, so a run looking for a folder to resume never picks up half a deletion. Folders of ended runs that
hold no checkpoint (killed before their first one), and hidden leftovers of killed creations or removals, are
removed by the next run of the same checkpoint root.

Under torchrun rank 0 claims the folder and hands its path to the other ranks (``claimed_run_dir``).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "owner.lock"
CHECKPOINT_FILE = "last.pt"
_NEW, _REMOVING = ".new-", ".removing-"


@dataclass
class RunDir:
    """A run's checkpoint folder and the checkpoint it resumes (None: a new folder). ``lock_fd`` is the open
    ``owner.lock`` holding the claim (None on ranks other than 0: rank 0 owns the folder)."""

    path: Path
    resume: Path | None = None
    lock_fd: int | None = None

    def remove(self) -> None:
        """Delete the folder (the run's model is registered: its checkpoints have no further use)."""
        trash = self.path.with_name(_REMOVING + self.path.name)
        with suppress(FileNotFoundError):
            os.rename(self.path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def release(self) -> None:
        """Give the folder up, kept as it is: the next run of its fingerprint may resume it."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = None


def _try_lock(folder: Path) -> int | None:
    """The fd of ``folder``'s owner lock, locked, or None when its run is alive or the folder is going away."""
    lock = folder / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR)  # never created here: a folder being removed stays unclaimable
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = os.fstat(fd)
        current = os.stat(lock)  # renamed away for removal between our open and our lock: not ours
        if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def _remove_ended_leftovers(root: Path, fingerprint: str) -> None:
    """Hidden folders of killed creations/removals, and this fingerprint's folders without a checkpoint."""
    for folder in [*root.glob(_NEW + "*"), *root.glob(_REMOVING + "*"), *root.glob(f"{fingerprint}-*")]:
        if folder.name.startswith(fingerprint) and (folder / CHECKPOINT_FILE).is_file():
            continue
        fd = _try_lock(folder)
        if fd is not None:
            RunDir(folder, lock_fd=fd).remove()
            os.close(fd)


def claim_run_dir(root: Path, fingerprint: str, resume: bool) -> RunDir:
    """This run's checkpoint folder under ``root`` (module docstring), locked until ``release``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_ended_leftovers(root, fingerprint)
    if resume:
        resumable = [f for f in root.glob(f"{fingerprint}-*") if (f / CHECKPOINT_FILE).is_file()]
        for folder in sorted(resumable, key=_checkpoint_mtime, reverse=True):
            fd = _try_lock(folder)
            if fd is not None and (folder / CHECKPOINT_FILE).is_file():
                return RunDir(folder, folder / CHECKPOINT_FILE, fd)
            if fd is not None:
                os.close(fd)
    name = f"{fingerprint}-{os.getpid()}.{uuid.uuid4().hex[:12]}"
    staging = root / (_NEW + name)
    staging.mkdir()
    # the lock file appears under its name already locked: nobody can take an unowned folder's lock
    fd = os.open(staging / (LOCK_FILE + ".new"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staging / (LOCK_FILE + ".new"), staging / LOCK_FILE)
    os.rename(staging, root / name)
    return RunDir(root / name, None, fd)


def _checkpoint_mtime(folder: Path) -> float:
    try:
        return (folder / CHECKPOINT_FILE).stat().st_mtime
    except OSError:
        return 0.0


def _from_rank0(value: dict | None) -> dict:
    """``value`` of rank 0 on every rank (JSON over a gloo group: CPU tensors whatever the default backend)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if value is None:
            raise RuntimeError("checkpoint folder: not the owner (rank 0) and no process group to ask it")
        return value
    group = dist.new_group(backend="gloo")
    try:
        data = json.dumps(value).encode() if value is not None else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=group)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8)
        if data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0, group=group)
        return json.loads(bytes(buf.tolist()).decode())
    finally:
        dist.destroy_process_group(group)


@contextmanager
def claimed_run_dir(base: Path, resume: bool, owner: bool = True) -> Iterator[RunDir]:
    """The run's folder for the ``with`` block: ``base`` is ``<root>/<fingerprint>``; the ``owner`` process
    (rank 0) claims it and every rank gets its path. Leaving the block releases the claim (the folder stays
    unless ``remove`` was called)."""
    claim = claim_run_dir(base.parent, base.name, resume) if owner else None
    try:
        mine = None if claim is None else {"path": str(claim.path), "resume": claim.resume and str(claim.resume)}
        shared = _from_rank0(mine)
        yield claim or RunDir(Path(shared["path"]), shared["resume"] and Path(shared["resume"]))
    finally:
        if claim is not None:
            claim.release()
