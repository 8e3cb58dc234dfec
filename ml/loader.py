"""Asynchronous, deterministic training batches: worker processes build keyed steps while the device trains.

    source = make_batch_iterator_factory(data, builder, ...)        # ml.step_sampler.StepBatches
    loader = BatchLoader(source, num_workers=2, prefetch_factor=4, pin_memory=True)
    for step in loader(epoch, start=0): ...                        # what ml.train.Trainer does

The batch of (seed, epoch, global step index) depends on that key alone (``StepBatches.build_step``), so:

- the steps of an epoch are divided among workers BEFORE any work: a map-style ``Dataset`` keyed by
  (epoch, index) and a sampler listing this rank's indices; the ``DataLoader`` sends each worker only its
  own keys and hands the results back in order. No worker builds a batch another one builds;
- DDP ranks take disjoint indices (``StepBatches.step_indices``: step * world + rank), and a resumed run starts
  at its step without building the batches before it; 0, 1 or N workers give identical batches;
- workers persist across epochs (``persistent_workers``), keep ``prefetch_factor`` steps each in flight, use
  one torch / numba thread each (the training process keeps the cores it was given), and return numpy
  batches that become tensors without a copy (``ml.batches.tensorize_step``), page-locked by the loader's pin
  thread when ``pin_memory`` (CUDA).

``num_workers=0`` is the synchronous path (same batches, built on the training thread): tests, debugging.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ml.batches import pin_step, tensorize_step


def default_num_workers(processes_per_node: int = 1) -> int:
    """A sensible share of the cores for batch building: half of this process's share, at least 1, at
    most 8 (on 2 cores: 1 worker beside the training threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // max(1, processes_per_node) // 2))


class StepPayload:
    """One built step. Workers hand back numpy batches (one pickled message through the worker's pipe: far
    cheaper than a shared-memory file per tensor); ``tensors()`` converts them without copying. Not a
    Mapping, so the ``DataLoader``'s pin thread calls ``pin_memory`` here (convert + page-lock, off the
    training thread) and shared objects (step tables, negatives) stay shared."""

    def __init__(self, batches: dict, is_tensors: bool = False):
        self.batches, self.is_tensors = batches, is_tensors

    def tensors(self) -> StepPayload:
        return self if self.is_tensors else StepPayload(tensorize_step(self.batches), True)

    def pin_memory(self) -> StepPayload:
        return StepPayload(pin_step(self.tensors().batches), True)


class _KeyedSteps(Dataset):
    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:  # informative only: keys come from the sampler
        return self.source.steps_per_epoch

    def __getitem__(self, key: tuple[int, int]) -> StepPayload:
        epoch, index = key
        return StepPayload(self.source.build_step(epoch, index))


class _EpochKeys(Sampler):
    """The (epoch, global step index) keys of the current pass; set in the main process before iter()."""

    def __init__(self):
        self.keys: list[tuple[int, int]] = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # numba absent or its threading layer not started
        pass


class BatchLoader:
    """``loader(epoch, start)`` -> iterator of ``StepPayload`` (module docstring)."""

    resumable = True

    def __init__(self, source, *, num_workers: int = 0, prefetch_factor: int = 4, pin_memory: bool = False):
        if num_workers < 0 or prefetch_factor < 1:
            raise ValueError(f"BatchLoader: num_workers={num_workers} must be >= 0, prefetch_factor >= 1")
        if num_workers and multiprocessing.current_process().daemon:
            num_workers = 0  # a daemonic process (e.g. a multiprocessing pool worker) may not have children
        self.source, self.num_workers, self.pin_memory = source, int(num_workers), bool(pin_memory)
        self.steps_per_epoch = source.steps_per_epoch
        self.batch_names = getattr(source, "batch_names", [])
        self._keys = _EpochKeys()
        self._loader = None
        if self.num_workers:
            self._loader = DataLoader(
                _KeyedSteps(source),
                batch_size=None,
                sampler=self._keys,
                num_workers=self.num_workers,
                prefetch_factor=prefetch_factor,
                persistent_workers=True,
                pin_memory=self.pin_memory,
                worker_init_fn=_worker_init,
                # fork: workers share the snapshot's memory maps and the in-memory feature table
                multiprocessing_context="fork",
            )

    def __call__(self, epoch: int = 0, start: int = 0) -> Iterator[StepPayload]:
        indices = self.source.step_indices(start)
        if self._loader is None:
            return self._synchronous(epoch, indices)
        self._keys.keys = [(int(epoch), int(i)) for i in indices]
        return (payload.tensors() for payload in self._loader)

    def _synchronous(self, epoch: int, indices) -> Iterator[StepPayload]:
        for index in indices:
            payload = StepPayload(self.source.build_step(epoch, index))
            yield payload.pin_memory() if self.pin_memory else payload.tensors()

    def close(self) -> None:
        """Stops the persistent workers."""
        loader, self._loader = self._loader, None
        if loader is not None and getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()
