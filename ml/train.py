"""Training loop (paper 3.4, A.3.3): AdamW, linear warm-up then cosine annealing, mixed precision, DDP.

    trainer = Trainer(model_config, train_config, batch_factory, on_log=callback)
    result = trainer.fit(resume="path/to/last.pt")        # or train(...)

``batch_factory(epoch) -> iterable of {name: PairBatch | FeatureTaskBatch | SequenceBatch}`` (a factory
without parameters is called without the epoch). It must be deterministic for a given epoch: a resumed run
re-creates the epoch's iterator and skips the batches it had consumed, so it continues with exactly the
batches the uninterrupted run would have seen. Under DDP every rank calls the factory; the factory shards
(``dist_info()`` tells it its rank) and every rank must produce the same tasks in the same order per step.

- device ``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU;
- precision ``auto``: fp16 autocast + GradScaler on CUDA (A.3.3), fp32 on CPU; ``bf16`` optional;
- gradient clipping on the global norm (after unscaling), seeded (python, numpy, torch);
- checkpoints: model, optimizer, scheduler, scaler, sketches, position, RNG states (``ml.checkpoint``);
- logging: ``on_log(step, metrics)`` with the total and per-task losses (mean over ranks), lr, lambda,
  examples/s; a progress line through ``progress`` (default ``print``) on rank 0;
- DDP when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): ``init_process_group`` from
  env (gloo on CPU, nccl on CUDA), ``DistributedDataParallel`` for the gradients, negatives of every task
  gathered across ranks with gradient (``ml.model``).
"""

from __future__ import annotations

import inspect
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ml.batches import move_step
from ml.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ml.config import ModelConfig, TrainConfig
from ml.model import OmniSageModel

BatchFactory = Callable[..., Iterable[Mapping[str, Any]]]

# How long the other ranks wait for rank 0's model-selection validation (a full validation pass over a
# large split can take far longer than a collective's timeout, e.g. NCCL's 10 minutes).
VALIDATION_TIMEOUT = timedelta(hours=6)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank): from the process group when initialised, else from torchrun's env."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", str(dist.get_rank())))
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. ``auto`` and ``cuda``
    take the GPU of this process's LOCAL_RANK (torchrun), so every rank of a node gets its own device."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use 'auto' or 'cpu')")
        index = int(name.split(":", 1)[1]) if ":" in name else dist_info()[2] % torch.cuda.device_count()
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ValueError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """-> autocast dtype (None = fp32)."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    table = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise ValueError(f"TrainConfig.precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("TrainConfig.precision fp16 needs CUDA (GradScaler); use bf16 or fp32 on CPU")
    return table[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine annealing to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases, norms, embedding tables and learned tokens (decay there only shrinks rows that
    a batch did not touch)."""
    decay, no_decay = [], []
    skip_modules = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm)
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, skip_modules):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in no_decay_ids or "missing" in name or "own_kind" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    steps: int
    epochs_completed: int
    last_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None


def _sketch_snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]] | None:
    """CPU copies of the model's count-min sketches (they are not in ``state_dict``); None for a model that
    has none (no ``sketch_state_dict``)."""
    get = getattr(model, "sketch_state_dict", None)
    if get is None:
        return None
    return {name: {k: v.detach().to("cpu", copy=True) for k, v in st.items()} for name, st in get().items()}


@dataclass
class ModelSelection:
    """Model selection on a validation split: ``score(model)`` (higher is better; None = no figure) at
    ``checks`` evenly spaced steps of the run and at its end; ``fit`` ends with the best step's weights and
    count-min sketches (the latest of equal scores: it has trained longest) - the sketches are the logQ
    state a warm start continues from, so they must be the selected step's too. Rank 0 only: it is the
    rank that registers; under DDP the other ranks wait for it outside the training collectives."""

    score: Callable[[nn.Module], float | None]
    checks: int = 4
    best_step: int | None = None
    best_score: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_sketches: dict[str, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def planned(self, end: int) -> set[int]:
        n = max(1, self.checks)
        return {max(1, round(end * i / n)) for i in range(1, n + 1)} if end > 0 else set()

    def consider(self, model: nn.Module, step: int) -> None:
        if self.history and self.history[-1]["step"] == step:
            return
        was_training = model.training
        value = self.score(model)
        model.train(was_training)
        self.history.append({"step": step, "score": value})
        if value is not None and (self.best_score is None or value >= self.best_score):
            self.best_step, self.best_score = step, float(value)
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_sketches = _sketch_snapshot(model)

    def restore(self, model: nn.Module) -> None:
        """Back to the best step's weights and sketches (nothing to do when that is the last check)."""
        last = self.history[-1]["step"] if self.history else None
        if self.best_state is None or self.best_step == last:
            return
        model.load_state_dict(self.best_state)
        if self.best_sketches is not None:
            model.sketches.clear()  # a sketch first created after the best step must not survive either
            model.load_sketch_state_dict(self.best_sketches)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_score": self.best_score,
            "best_state": self.best_state,
            "best_sketches": self.best_sketches,
            "history": list(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_step, self.best_score = state.get("best_step"), state.get("best_score")
        self.best_state, self.history = state.get("best_state"), list(state.get("history", []))
        self.best_sketches = state.get("best_sketches")


class Trainer:
    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        batch_factory: BatchFactory,
        *,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        progress: Callable[[str], None] | None = print,
        selection: ModelSelection | None = None,
        validation_timeout: timedelta = VALIDATION_TIMEOUT,
    ):
        self.model_config, self.config = model_config, train_config
        self.selection = selection
        self.batch_factory = batch_factory
        self.on_log, self.progress = on_log, progress
        self._owns_pg = False
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = resolve_device(train_config.device)
        if world_env > 1 and dist.is_available() and not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            self._owns_pg = True
        self.rank, self.world, _ = dist_info()
        self.distributed = self.world > 1
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.amp_dtype = resolve_precision(train_config.precision, self.device)

        seed_everything(train_config.seed)  # same seed on every rank: identical initial parameters
        self.model = OmniSageModel(model_config).to(self.device)
        self.module: nn.Module = self.model
        if self.distributed:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            # a separate group so the negatives' collectives never interleave with DDP's gradient buckets
            self.model.gather_group = dist.new_group(backend=backend)
            # the other ranks wait here while rank 0 validates (model selection): a CPU group whose timeout
            # is sized for a validation, so no training collective is left pending meanwhile
            self._wait_group = dist.new_group(backend="gloo", timeout=validation_timeout)
            self.module = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # switched-off tasks / a type absent from a step
            )
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, train_config.weight_decay),
            lr=train_config.lr,
            betas=tuple(train_config.betas),
        )
        tc = train_config
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, tc.warmup_steps, tc.total_steps, tc.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, float]] = []
        seed_everything(train_config.seed + 1000003 * self.rank)  # per-rank stream for dropout / sampling

    # ------------------------------------------------------------------------------------------- one step
    def train_step(self, batches: Mapping[str, Any]) -> dict[str, Any]:
        """Forward (autocast), backward (scaled), unscale, clip, optimizer + scheduler step. Gradients stay
        on the parameters until the next step (tests read them)."""
        self.model.train()
        batches = getattr(batches, "batches", batches)  # ml.loader.StepPayload
        if self.device.type != "cpu":  # one asynchronous copy per step, shared objects copied once
            batches = move_step(batches, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            out = self.module(batches)
        self.scaler.scale(out.loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if self.config.grad_clip
            else None
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return {
            "loss": out.loss.detach(),
            "losses": out.losses,
            "examples": out.examples,
            "grad_norm": None if grad_norm is None else grad_norm.detach(),
            "stats": out.stats,
        }

    # ----------------------------------------------------------------------------------------- the loop
    def _iter_epoch(self, epoch: int):
        f = self.batch_factory
        if getattr(f, "resumable", False):  # keyed batches: start at the step, build nothing before it
            return iter(f(epoch, start=self.batch_in_epoch))
        try:
            n_params = len(inspect.signature(f).parameters)
        except (TypeError, ValueError):
            n_params = 1
        return iter(f(epoch) if n_params else f())

    def fit(self, resume: str | Path | None = None, stop_after: int | None = None) -> TrainResult:
        """Trains until ``total_steps`` (or ``epochs``); ``stop_after`` ends earlier at that step (the lr
        schedule keeps its ``total_steps`` horizon - e.g. to checkpoint and resume later)."""
        if resume is not None:
            self.load(resume)
        tc = self.config
        end = tc.total_steps if stop_after is None else min(stop_after, tc.total_steps)
        selecting = self.selection is not None and self.rank == 0
        checks = self.selection.planned(tc.total_steps) if selecting else set()
        selects = selecting
        if self.distributed:  # only rank 0 holds the selection: every rank learns when it validates
            selects, checks = self._rank0_checks(checks if selecting else None)
        last: dict[str, float] = {}
        window_examples, window_t0, window_losses, window_steps = 0, time.perf_counter(), {}, 0
        while self.step < end and (tc.epochs is None or self.epoch < tc.epochs):
            it = self._iter_epoch(self.epoch)
            exhausted = False
            skip = 0 if getattr(self.batch_factory, "resumable", False) else self.batch_in_epoch
            for _ in range(skip):  # resume inside an epoch: skip what was consumed
                if next(it, None) is None:
                    exhausted = True
                    break
            got_any = self.batch_in_epoch > 0
            if not exhausted:
                for batches in it:
                    got_any = True
                    r = self.train_step(batches)
                    self.batch_in_epoch += 1
                    window_steps += 1
                    window_examples += r["examples"]
                    # detached tensors: no host sync per step on CUDA, only at log time
                    window_losses["loss"] = window_losses.get("loss", 0.0) + r["loss"]
                    for k, v in r["losses"].items():
                        window_losses[k] = window_losses.get(k, 0.0) + v
                    if self.step % tc.log_every == 0 or self.step == end:
                        last = self._log(
                            window_losses, window_steps, window_examples, time.perf_counter() - window_t0, r
                        )
                        window_examples, window_t0, window_losses, window_steps = (
                            0,
                            time.perf_counter(),
                            {},
                            0,
                        )
                    if self.step in checks:
                        self._validate(selecting)
                    if tc.checkpoint_dir and tc.checkpoint_every and self.step % tc.checkpoint_every == 0:
                        self.save(Path(tc.checkpoint_dir) / "last.pt")
                    if self.step >= end:
                        break
                else:
                    exhausted = True
            if not got_any:
                raise ValueError(f"batch factory yielded no batches for epoch {self.epoch}")
            if exhausted:
                self.epoch += 1
                self.batch_in_epoch = 0
        if window_steps:
            last = self._log(window_losses, window_steps, window_examples, time.perf_counter() - window_t0, None)
        finished = stop_after is None or stop_after >= tc.total_steps
        if selects and finished and self.step > 0:
            self._validate(selecting)
        ckpt = None
        if tc.checkpoint_dir:
            ckpt = str(self.save(Path(tc.checkpoint_dir) / "last.pt"))
        if selecting and finished:
            self.selection.restore(self.model)
        return TrainResult(self.step, self.epoch, last, list(self.history), ckpt)

    def _rank0_checks(self, checks: set[int] | None) -> tuple[bool, set[int]]:
        """(whether rank 0 runs model selection, its check steps), broadcast from rank 0 to every rank."""
        box = [None if checks is None else sorted(checks)]
        dist.broadcast_object_list(box, src=0, group=self._wait_group)
        return box[0] is not None, set(box[0] or ())

    def _validate(self, selecting: bool) -> None:
        """Rank 0 scores the model for selection; under DDP every rank then meets in the wait group's barrier
        (timeout ``validation_timeout``) before the next collective, so a validation longer than the training
        collectives' timeout does not break the run."""
        if selecting:
            self.selection.consider(self.model, self.step)
        if self.distributed:
            dist.barrier(group=self._wait_group)

    def _log(self, sums: dict[str, float], steps: int, examples: int, seconds: float, r) -> dict[str, float]:
        names = sorted(sums)
        vals = torch.tensor([float(sums[n]) / max(1, steps) for n in names] + [float(examples)], dtype=torch.float64)
        if self.distributed:  # mean losses over ranks, total examples
            dist.all_reduce(vals)
            vals[:-1] /= self.world
        metrics = {n: float(v) for n, v in zip(names, vals[:-1])}
        metrics["examples_per_s"] = float(vals[-1]) / max(seconds, 1e-9)
        metrics["lr"] = float(self.scheduler.get_last_lr()[0])
        sc = self.model.scale()
        metrics["scale"] = float(sc.detach()) if isinstance(sc, torch.Tensor) else float(sc)
        metrics["step"] = float(self.step)
        if r is not None and r["grad_norm"] is not None:
            metrics["grad_norm"] = float(r["grad_norm"])
        self.history.append(metrics)
        if self.rank == 0:
            if self.on_log is not None:
                self.on_log(self.step, dict(metrics))
            if self.progress is not None:
                tasks = " ".join(f"{n} {metrics[n]:.4f}" for n in names if n != "loss")
                self.progress(
                    f"step {self.step}/{self.config.total_steps} epoch {self.epoch} loss {metrics['loss']:.4f} "
                    f"[{tasks}] lr {metrics['lr']:.2e} {metrics['examples_per_s']:.1f} examples/s"
                )
        return metrics

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sketches": self.model.sketch_state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(),
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "world_size": self.world,
            **({"selection": self.selection.state_dict()} if self.selection is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.model.load_sketch_state_dict(state.get("sketches", {}))
        if self.selection is not None and state.get("selection"):
            self.selection.load_state_dict(state["selection"])
        self.step, self.epoch, self.batch_in_epoch = (
            int(state["step"]),
            int(state["epoch"]),
            int(state["batch_in_epoch"]),
        )
        if self.world == int(state.get("world_size", 1)):  # per-rank RNG streams only mean something at equal world
            set_rng_state(state["rng"])

    def warm_start(self, weights: Mapping[str, torch.Tensor], sketches: Mapping[str, dict]) -> None:
        """Start from another model's weights and count-min sketches (the champion's, for daily training);
        the optimizer, the schedule and the step count start fresh."""
        self.model.load_state_dict(weights)
        self.model.load_sketch_state_dict(sketches)

    def save(self, path: str | Path) -> Path:
        """Rank 0 writes (all ranks hold the same state under DDP)."""
        path = Path(path)
        if self.rank == 0:
            save_checkpoint(path, self.state_dict())
        if self.distributed:
            dist.barrier()
        return path

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_checkpoint(path, map_location=self.device))

    def close(self) -> None:
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_pg = False


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    batch_factory: BatchFactory,
    *,
    resume: str | Path | None = None,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: Callable[[str], None] | None = print,
) -> tuple[OmniSageModel, TrainResult]:
    trainer = Trainer(model_config, train_config, batch_factory, on_log=on_log, progress=progress)
    try:
        result = trainer.fit(resume=resume)
    finally:
        trainer.close()
    return trainer.model, result


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> OmniSageModel:
    """A trained model from a trainer checkpoint (for inference)."""
    state = load_checkpoint(path, map_location=map_location)
    model = OmniSageModel(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(state["model"])
    model.load_sketch_state_dict(state.get("sketches", {}))
    return model.to(map_location).eval()
