"""Asynchronous, deterministic loading (ml.loader): the batch of (seed, epoch, step) is the same whichever
process builds it; workers build only their own steps; a resume starts at its step; in-memory features
give the RocksDB path's batches; the compact form embeds like the dense one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tests.pipeline_fixtures as pf
from graph_engine.batch import CompactEntityBatch
from graph_engine.batch_builder import BatchBuilder
from graph_engine.feature_table import FeatureTable, open_features
from ml.batches import tensorize_step
from ml.config import preset
from ml.entity_tensors import EntityTensors
from ml.loader import BatchLoader
from ml.model import OmniSageModel
from ml.step_sampler import BatchConfig, make_batch_iterator_factory
from ml.train import Trainer

KW = {"batch_size": 16, "num_random_negatives": 8, "seed": 5, "max_sequence_length": 8, "steps_per_epoch": 6}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return pf.build_library_pipeline(tmp_path_factory.mktemp("loader"), scale="tiny", days=3, seed=0)


def _fingerprint(payload) -> list:
    """Every tensor of a step, in a fixed order (ids, rows, features), for exact comparison."""
    out = []
    for name in sorted(payload.batches):
        b = payload.batches[name]
        for f in ("query", "positive", "nodes", "entities", "random_negatives"):
            x = getattr(b, f, None)
            if isinstance(x, EntityTensors):
                dense_tokens = x.table.token_ids.index_select(0, x.own_row)
                out += [
                    name,
                    f,
                    x.entity_ids.tolist(),
                    x.neighbor_ids.tolist(),
                    dense_tokens.tolist(),
                    x.neighbor_mask.tolist(),
                ]
        if getattr(b, "sequence_index", None) is not None:
            out.append(np.asarray(b.sequence_index).tolist())
    return out


def _epoch(loader, epoch: int, start: int = 0) -> list:
    return [_fingerprint(p) for p in loader(epoch, start=start)]


def test_same_batches_with_0_1_and_3_workers_and_across_epochs(art):
    source = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**KW))
    runs = {}
    for workers in (0, 1, 3):
        loader = BatchLoader(source, num_workers=workers, prefetch_factor=2)
        try:
            runs[workers] = [_epoch(loader, 0), _epoch(loader, 1)]  # persistent workers across epochs
        finally:
            loader.close()
    assert runs[0] == runs[1] == runs[3]
    assert len(runs[0][0]) == KW["steps_per_epoch"]
    assert runs[0][0] != runs[0][1]  # the epoch is part of the key


def test_a_step_does_not_depend_on_the_steps_before_it(art):
    """The key is (seed, epoch, step): building step 4 alone gives step 4 of the full pass."""
    source = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**KW))
    loader = BatchLoader(source, num_workers=0)
    full = _epoch(loader, 2)
    assert _epoch(loader, 2, start=4) == full[4:]


def test_ranks_take_disjoint_steps(art, monkeypatch):
    source = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**KW))
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        seen[rank] = list(source.step_indices())
    assert seen[0] == [0, 2, 4, 6, 8, 10] and seen[1] == [1, 3, 5, 7, 9, 11]


class _Recording(BatchLoader):
    """Records which steps reached the trainer (their query ids)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen: list = []

    def __call__(self, epoch=0, start=0):
        for payload in super().__call__(epoch, start):
            self.seen.append((epoch, _fingerprint(payload)))
            yield payload


def test_resume_after_a_kill_mid_epoch_with_workers_sees_the_uninterrupted_batches(art, tmp_path):
    source = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**KW))
    mc, tc = preset("small", image_dim=art.image_dim)
    tc = tc.replace(total_steps=9, warmup_steps=1, device="cpu", log_every=100, checkpoint_every=4)

    full = _Recording(source, num_workers=2)
    Trainer(mc, tc.replace(checkpoint_dir=str(tmp_path / "a")), full, progress=None).fit()
    full.close()

    killed = _Recording(source, num_workers=2)
    Trainer(mc, tc.replace(checkpoint_dir=str(tmp_path / "b")), killed, progress=None).fit(stop_after=4)
    killed.close()
    resumed = _Recording(source, num_workers=2)
    trainer = Trainer(mc, tc.replace(checkpoint_dir=str(tmp_path / "b")), resumed, progress=None)
    trainer.fit(resume=tmp_path / "b" / "last.pt")
    resumed.close()
    assert len(full.seen) == 9  # 6 steps of epoch 0, 3 of epoch 1
    assert killed.seen[:4] + resumed.seen == full.seen[:4] + full.seen[4:]
    assert resumed.seen[0] == full.seen[4]  # started at step 4 of epoch 0, built nothing before it


def test_in_memory_features_give_the_rocksdb_batches(art):
    table = open_features(art.features_dir, snapshot=art.snapshot)
    assert isinstance(table, FeatureTable)
    assert not isinstance(open_features(art.features_dir, memory_budget_mb=0), FeatureTable)  # over budget
    in_memory = BatchBuilder(art.snapshot, art.neighborhoods, table, art.layout)
    ids = np.concatenate([art.universe["pin"][:40], np.array([987654321], np.int64)])  # + one unknown id
    a, b = art.builder.build("pin", ids), in_memory.build("pin", ids)
    for name in ("token_ids", "token_lengths", "image", "image_mask", "degree", "present"):
        np.testing.assert_array_equal(getattr(a.features, name), getattr(b.features, name))
        np.testing.assert_array_equal(getattr(a.neighbor_features, name), getattr(b.neighbor_features, name))
    assert not b.features.present[-1]


def test_compact_step_tables_embed_like_dense_batches(art):
    """Shared step tables (each entity's features once) give the dense batches' embeddings."""
    mc, _ = preset("small", image_dim=art.image_dim)
    torch.manual_seed(0)
    model = OmniSageModel(mc).eval()
    source = make_batch_iterator_factory(art.data, art.builder, BatchConfig(**KW))
    step = source.build_step(0, 1)
    tensors = tensorize_step(step)
    tables = {
        id(getattr(b, f).table)
        for b in tensors.values()
        for f in ("query", "positive", "nodes", "entities")
        if getattr(b, f, None) is not None
    }
    assert len(tables) <= 2  # one table per entity type for the whole step
    with torch.no_grad():
        for name, b in step.items():
            for f in ("query", "positive", "nodes", "entities", "random_negatives"):
                raw = getattr(b, f, None)
                if isinstance(raw, CompactEntityBatch):
                    compact = model.embed(getattr(tensors[name], f))
                    dense = model.embed(raw.dense())
                    torch.testing.assert_close(compact, dense, rtol=1e-5, atol=1e-5)
