"""DDP on CPU with gloo, 2 processes, launched the way torchrun launches (RANK / WORLD_SIZE / MASTER_* env).

A global batch is split in two halves, one per rank. Because every rank gathers the other rank's positives and
random negatives (3.4.2) with gradient, the mean of the two ranks' losses and the averaged gradient must equal
those of ONE process training on the whole global batch - which is what is asserted, together with both ranks
ending with identical parameters. Each rank's random negatives carry its own sampler's log Q (M / world draws);
the pooled candidates must carry the global draw's, as the single process's do.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from graph_engine.batch import EntityBatch
from ml.batches import FeatureTaskBatch, PairBatch, SequenceBatch
from ml.config import small
from ml.testing import synthetic_task_batches
from ml.train import ModelSelection, Trainer

IMG = 4
STEPS = 3
B, M, U, T = 8, 6, 4, 4


def _configs():
    mc, tc = small(image_dim=IMG)
    mc = mc.replace(loss=dataclasses.replace(mc.loss, chunk_size=5))  # the chunked path under DDP too
    tc = tc.replace(device="cpu", precision="fp32", warmup_steps=1, total_steps=STEPS, log_every=1, seed=0)
    return mc, tc


def _global_batches(step: int) -> dict:
    rng = np.random.default_rng([42, step])
    g = synthetic_task_batches(rng, image_dim=IMG, batch_size=B, num_negatives=M, num_users=U, seq_len=T)
    s = g["user_entity"]
    e = len(s.entities)
    # full-length sequences, every user with a future action: both ranks then hold the same number of
    # queries, so the mean of the per-rank means is the global mean
    g["user_entity"] = dataclasses.replace(
        s, sequence_index=rng.integers(0, e, size=(U, T)), future_index=rng.integers(0, e, size=U)
    )
    return g


def _rows(b: EntityBatch, idx: np.ndarray) -> EntityBatch:
    return EntityBatch(
        b.entity_type,
        b.entity_ids[idx],
        b.features.take(idx),
        b.neighbor_ids[idx],
        b.neighbor_features.take(idx),
        b.neighbor_scores[idx],
        b.neighbor_mask[idx],
        b.layout,
    )


def _shard(g: dict, rank: int, world: int) -> dict:
    def half(n: int) -> np.ndarray:
        return np.array_split(np.arange(n), world)[rank]

    def rank_log_q(log_q):
        # this rank's sampler draws M / world negatives: log Q = log((M / world) / N)
        return None if log_q is None else np.asarray(log_q) - np.log(world)

    p, f, s = g["entity_entity"], g["entity_feature"], g["user_entity"]
    qi, ni, ui = half(len(p)), half(len(p.random_negatives)), half(len(s))
    return {
        "entity_entity": PairBatch(
            _rows(p.query, qi),
            _rows(p.positive, qi),
            _rows(p.random_negatives, ni),
            weights=p.weights[qi],
            random_negative_log_q=rank_log_q(p.random_negative_log_q),
        ),
        "entity_feature": FeatureTaskBatch(
            _rows(f.nodes, half(len(f))),
            _rows(f.random_negatives, half(len(f.random_negatives))),
            random_negative_log_q=rank_log_q(f.random_negative_log_q),
        ),
        # each rank embeds the entities its users reference (here: all of them, indices unchanged)
        "user_entity": SequenceBatch(
            s.entities,
            s.sequence_index[ui],
            s.future_index[ui],
            _rows(s.random_negatives, half(len(s.random_negatives))),
            random_negative_log_q=rank_log_q(s.random_negative_log_q),
        ),
    }


def _run(trainer: Trainer, batches_of_step) -> dict:
    out = {"loss": [], "losses": [], "stats": []}
    for step in range(STEPS):
        r = trainer.train_step(batches_of_step(step))
        out["loss"].append(float(r["loss"]))
        out["losses"].append({k: float(v) for k, v in r["losses"].items()})
        out["stats"].append(dict(r["stats"]))
        if step == 0:
            out["grads"] = {
                n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None
            }
    out["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    out["sketch_total"] = trainer.model.sketch("entity_entity/board").total
    return out


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _env(rank, world, port)
    mc, tc = _configs()
    trainer = Trainer(mc, tc, lambda epoch: iter(()), progress=None)
    assert trainer.distributed and trainer.world == world
    try:
        res = _run(trainer, lambda step: _shard(_global_batches(step), rank, world))
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        trainer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gloo_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path, monkeypatch):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    # both ranks end with identical parameters
    assert r0["params"].keys() == r1["params"].keys()
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n

    # every loss saw the negatives of both ranks: candidates = global positives + global random negatives
    st = r0["stats"][0]
    assert st["entity_entity/num_candidates"] == B + M
    assert st["entity_feature/num_candidates"] == B + M
    assert st["user_entity/num_candidates"] == U + M  # future-action loss: one positive per user
    assert r0["sketch_total"] == r1["sketch_total"] == STEPS * B  # sketch fed with the gathered keys

    # one process on the whole global batch
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    mc, tc = _configs()
    single = Trainer(mc, tc, lambda epoch: iter(()), progress=None)
    assert not single.distributed
    ref = _run(single, _global_batches)
    for step in range(STEPS):
        mean_loss = (r0["loss"][step] + r1["loss"][step]) / 2
        assert mean_loss == pytest.approx(ref["loss"][step], rel=1e-5, abs=1e-5), step
        for k, v in ref["losses"][step].items():
            assert (r0["losses"][step][k] + r1["losses"][step][k]) / 2 == pytest.approx(v, rel=1e-5, abs=1e-5), (
                step,
                k,
            )
    # the averaged DDP gradient == the gradient of the global-batch loss (cross-rank negatives included)
    assert r0["grads"].keys() == ref["grads"].keys()
    for n, g in ref["grads"].items():
        torch.testing.assert_close(r0["grads"][n], g, atol=2e-6, rtol=1e-4, msg=n)
    # (parameters after several AdamW steps are not compared with the single process: Adam normalises
    # ~1e-10 gradients - e.g. of attention key biases, which softmax ignores - to lr-sized steps, so summation
    # order noise shows; the equal losses of steps 2 and 3 above already show the runs stay together)


COLLECTIVE_TIMEOUT_S, VALIDATION_S = 3, 6


def _slow_validation_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _env(rank, world, port)
    # training collectives time out after 3 s; rank 0's first validation (model selection) takes 6 s
    dist.init_process_group("gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    mc, tc = _configs()
    calls = []

    def score(model) -> float:
        if not calls:
            time.sleep(VALIDATION_S)
        calls.append(1)
        return float(len(calls))

    # as in a launched run, rank 0 alone holds the selection (it registers the model)
    selection = ModelSelection(score, checks=STEPS) if rank == 0 else None
    factory = lambda epoch: (_shard(_global_batches(step), rank, world) for step in range(STEPS))
    trainer = Trainer(mc, tc, factory, progress=None, selection=selection)
    try:
        result = trainer.fit()
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"steps": result.steps, "params": params}, os.path.join(out_dir, f"slow{rank}.pt"))
    finally:
        trainer.close()
        dist.destroy_process_group()


def test_a_validation_longer_than_the_collective_timeout_does_not_break_training(tmp_path):
    """Rank 0 validates at steps 1..3 (the first takes longer than the process group's timeout) while rank 1
    must not sit in a training collective meanwhile: both ranks finish with identical parameters."""
    world = 2
    mp.spawn(_slow_validation_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0 = torch.load(tmp_path / "slow0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "slow1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == STEPS
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
