"""The model path over the contract's whole int64 id range: a negative entity id (-1 included) is an id like
any other in user histories, training sequences and neighbour exclusion - padding and "nothing to exclude"
travel as masks beside the ids, never as an id value.

The builder below gives entity -k-1 exactly the features of entity k, so a history remapped that way must
embed to the same user vector with the same weights."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from graph_engine.batch import EntityBatch, FeatureArrays
from ml.config import small
from ml.inference import embed_entities, embed_users, exclude_neighbors
from ml.model import OmniSageModel
from ml.sequence_ids import dedupe_sequences
from ml.step_sampler import BatchConfig, make_batch_iterator_factory
from ml.testing import concat_entity_batches, random_entity_batch, small_layout
from ml.training_examples import NODE_SCHEMA, PAIR_SCHEMA, SEQUENCE_SCHEMA
from ml.training_examples_reader import TrainingData

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG = 4
LAYOUT = small_layout()


def mirror(i: int) -> int:
    """The non-negative id whose features entity ``i`` shares: -k-1 <-> k."""
    return i if i >= 0 else -i - 1


class MirrorBuilder:
    """BatchBuilder stand-in: own features seeded by ``mirror(id)``; neighbours = ``adj[id]`` (ids, in the
    first block, all with score 1 and zero features); every id ever built is recorded."""

    def __init__(self, adj: dict[int, list[int]] | None = None):
        self.adj, self.built = adj or {}, []

    def build(self, entity_type: str, entity_ids) -> EntityBatch:
        ids = np.asarray(entity_ids, dtype=np.int64).reshape(-1)
        self.built.extend(ids.tolist())
        one = [
            random_entity_batch(
                np.random.default_rng([7, mirror(int(i))]),
                entity_type,
                1,
                layout=LAYOUT,
                image_dim=IMG,
                max_tokens=6,
                entity_ids=np.array([i]),
            )
            for i in ids
        ]
        batch = concat_entity_batches(one)
        nb = np.full((ids.size, LAYOUT.width), -1, dtype=np.int64)
        mask = np.zeros(nb.shape, dtype=bool)
        for r, i in enumerate(ids):
            got = self.adj.get(int(i), [])
            nb[r, : len(got)], mask[r, : len(got)] = got, True
        return EntityBatch(
            entity_type=entity_type,
            entity_ids=ids,
            features=batch.features,
            neighbor_ids=nb,
            neighbor_features=FeatureArrays.empty(nb.shape, 6, IMG),
            neighbor_scores=mask.astype(np.float32),
            neighbor_mask=mask,
            layout=LAYOUT,
        )


@pytest.fixture(scope="module")
def model() -> OmniSageModel:
    cfg, _ = small(image_dim=IMG)
    torch.manual_seed(0)
    return OmniSageModel(cfg).eval()


def test_user_history_with_negative_ids_is_embedded_from_all_its_items(model):
    positive = [np.array([3, 4, 0, 1]), np.array([5, 2])]
    negative = [np.array([3, 4, -1, -2]), np.array([5, -3])]  # 0, 1, 2 remapped to -1, -2, -3
    builder = MirrorBuilder()
    want = embed_users(model, builder, positive)
    got = embed_users(model, builder, negative)
    assert {-1, -2, -3} <= set(builder.built)  # every history item was embedded
    np.testing.assert_allclose(got, want, atol=1e-5)
    no_items = (np.zeros(0, np.int64), np.zeros((0, model.config.out_dim), np.float32))
    np.testing.assert_allclose(embed_users(model, builder, negative, item_table=no_items), want, atol=1e-5)


def test_dedupe_sequences_needs_a_mask_for_negative_ids():
    seq = np.array([[-5, 7, -1], [-1, 0, 0]])
    valid = np.array([[True, True, True], [True, True, False]])
    uniq, index, fut = dedupe_sequences(seq, np.array([-9, 0]), valid=valid, future_valid=np.array([True, False]))
    assert uniq.tolist() == [-9, -5, -1, 0, 7]
    assert uniq[index[0]].tolist() == [-5, 7, -1] and index[1].tolist() == [2, 3, -1]
    assert fut.tolist() == [0, -1]
    with pytest.raises(ValueError, match="mask"):  # without a mask a -5 is refused, not dropped
        dedupe_sequences(seq)


def _data(pairs: list[dict] | None = None, sequences: list[dict] | None = None) -> TrainingData:
    empty_pairs, no_nodes = pa.Table.from_pylist([], PAIR_SCHEMA), pa.Table.from_pylist([], NODE_SCHEMA)
    return TrainingData(
        pairs=pa.Table.from_pylist(pairs or [], PAIR_SCHEMA),
        eval_pairs=empty_pairs,
        sequences=pa.Table.from_pylist(sequences or [], SEQUENCE_SCHEMA),
        eval_sequences=pa.Table.from_pylist([], SEQUENCE_SCHEMA),
        feature_nodes=no_nodes,
        eval_feature_nodes=no_nodes,
    )


def test_training_sequences_keep_negative_ids():
    data = _data(
        sequences=[
            {"user_id": -7, "history": [-1, 5, -5], "future": [-9]},
            {"user_id": 8, "history": [-2, -1], "future": []},
        ]
    )
    config = BatchConfig(tasks=("user_entity",), num_random_negatives=0, sequence_batch_size=6, max_sequence_length=8)
    step = next(iter(make_batch_iterator_factory(data, MirrorBuilder(), config)(0)))
    sb = step["user_entity"]
    ids = sb.entities.entity_ids
    want = {-7: ([-1, 5, -5], -9), 8: ([-2, -1], None)}
    for u, row, f in zip(sb.user_ids, sb.sequence_index, sb.future_index):
        hist, fut = want[int(u)]
        assert ids[row[row >= 0]].tolist() == hist  # rows of the batch's entities: -1 is padding there
        assert (None if f < 0 else int(ids[f])) == fut


def test_exclude_neighbors_removes_negative_ids():
    batch = MirrorBuilder({10: [-5, 3], 11: [-1, 4], 12: [-5]}).build("pin", [10, 11, 12])
    out = exclude_neighbors(batch, [-5, -1, 7])  # 7 is nobody's neighbour: nothing to remove there

    def real(b):
        return [b.neighbor_ids[r][b.neighbor_mask[r]].tolist() for r in range(len(b))]

    assert real(out) == [[3], [4], [-5]]
    # "nothing to remove" is a mask, not an id value
    assert real(exclude_neighbors(batch, [-5, -1, -5], where=[True, False, False])) == [[3], [-1, 4], [-5]]


def test_embedding_without_a_negative_neighbour(model):
    with_it, without = MirrorBuilder({10: [-5, 3]}), MirrorBuilder({10: [3]})
    got = embed_entities(model, with_it, "pin", [10], exclude_neighbor_ids=[-5])
    np.testing.assert_allclose(got, embed_entities(model, without, "pin", [10]), atol=1e-5)
    assert not np.allclose(embed_entities(model, with_it, "pin", [10]), got, atol=1e-4)


def test_training_pairs_mask_negative_ids_out_of_graph_pairs_only():
    pair = {"query_type": "pin", "pos_type": "pin", "segment": None, "weight": 1.0, "count": 1}
    data = _data(
        pairs=[
            {**pair, "query_id": 10, "pos_id": -5, "source": "graph_pin_pin"},
            {**pair, "query_id": 11, "pos_id": -1, "source": "engagement_pin_pin"},
        ]
    )
    builder = MirrorBuilder({10: [-5, 3], -5: [10], 11: [-1, 4], -1: [11]})
    config = BatchConfig(tasks=("entity_entity",), batch_size=4, num_random_negatives=0)
    pb = next(iter(make_batch_iterator_factory(data, builder, config)(0)))["entity_entity/pin_pin"]
    for side, other in ((pb.query, pb.positive), (pb.positive, pb.query)):
        for r in range(len(side)):
            real = side.neighbor_ids[r][side.neighbor_mask[r]].tolist()
            graph_pair = int(pb.query.entity_ids[r]) == 10
            # a graph pair's other end is masked out (even a negative id); an engagement pair keeps its edge
            assert (int(other.entity_ids[r]) in real) != graph_pair
