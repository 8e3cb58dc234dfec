"""Count-min sketch (ml/count_min_sketch.py): lower bound, (eps, delta) error bound, hashing, checkpoints."""

import io
import math

import numpy as np
import pytest
import torch

from ml.count_min_sketch import MERSENNE_P, CountMinSketch
from ml.losses import entity_key


def zipf_stream(n, universe, a, seed):
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(a, size=n * 2)
    ranks = ranks[ranks <= universe][:n]
    assert len(ranks) == n
    ids = rng.permutation(universe)[ranks - 1] * 7919 + 10**12  # scattered, large ids
    types = (ranks % 2).astype(np.int64)  # pins and boards mixed
    return entity_key(torch.from_numpy(types), torch.from_numpy(ids))


def true_counts(keys):
    uniq, cnt = torch.unique(keys, return_counts=True)
    return uniq, cnt


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_bound_on_zipf_stream(seed):
    width, depth = 272, 5  # eps = e / 272 ~ 0.01, delta = e^-5 ~ 0.0067
    cms = CountMinSketch(width=width, depth=depth, seed=seed)
    keys = zipf_stream(200_000, 50_000, 1.2, seed)
    for batch in keys.split(4096):  # streamed in training-sized batches
        cms.update(batch)
    assert cms.total == keys.numel()
    uniq, cnt = true_counts(keys)
    est = cms.estimate(uniq)
    assert torch.all(est >= cnt)  # never below the true count
    bound = cnt + cms.eps * cms.total
    violation_rate = (est > bound).double().mean().item()
    assert violation_rate <= cms.delta
    # unseen keys: true count 0, estimate within eps * N with the same probability
    unseen = entity_key(2, torch.arange(5000))
    est_unseen = cms.estimate(unseen)
    assert (est_unseen > cms.eps * cms.total).double().mean().item() <= cms.delta
    # the sketch does lose information at this width: some estimates are inflated (the test can fail)
    assert torch.any(est > cnt)


def test_a_one_row_narrow_sketch_breaks_the_bound_of_a_wider_one():
    # Sanity of the bound test itself: width 8 (eps = 0.34) inflates rare keys far beyond eps(272) * N.
    keys = zipf_stream(50_000, 10_000, 1.2, 3)
    narrow = CountMinSketch(width=8, depth=1, seed=0)
    narrow.update(keys)
    uniq, cnt = true_counts(keys)
    est = narrow.estimate(uniq)
    assert torch.all(est >= cnt)
    assert ((est - cnt) > (math.e / 272) * narrow.total).double().mean().item() > 0.5


def test_exact_when_wide_and_duplicates_accumulate():
    cms = CountMinSketch(width=1 << 16, depth=4, seed=0)
    k = entity_key(0, torch.tensor([5, 5, 5, 9, 123456789]))
    cms.update(k)
    cms.update(k[:1])
    assert cms.estimate(k).tolist() == [4, 4, 4, 1, 1]
    cms.update(entity_key(1, torch.tensor([5])), counts=torch.tensor([10]))
    assert cms.estimate(entity_key(1, torch.tensor([5]))).tolist() == [10]  # board 5 is not pin 5
    assert cms.estimate(entity_key(0, torch.tensor([5]))).tolist() == [4]
    assert cms.total == 16
    cms.update(torch.zeros(0, dtype=torch.int64))
    assert cms.total == 16 and cms.estimate([]).numel() == 0


def python_bucket(key, a, b, width):
    """Exact big-integer reference of the documented hash."""
    x = key % (1 << 64)  # two's complement as unsigned
    digits = [x & ((1 << 30) - 1), (x >> 30) & ((1 << 30) - 1), x >> 60]
    return (b + sum(ai * xi for ai, xi in zip(a, digits))) % MERSENNE_P % width


def test_hash_matches_big_integer_reference_for_extreme_keys():
    cms = CountMinSketch(width=1009, depth=3, seed=42)
    keys = [0, 1, -1, 2**63 - 1, -(2**63), 2**62 + 12345, -(2**40) - 7, (1 << 30) - 1, 1 << 30, 1 << 60]
    got = cms.buckets(torch.tensor(keys, dtype=torch.int64))
    assert got.shape == (3, len(keys))
    for r in range(3):
        a = cms.hash_a[r].tolist()
        b = int(cms.hash_b[r])
        assert got[r].tolist() == [python_bucket(k, a, b, 1009) for k in keys]
    assert int(got.min()) >= 0 and int(got.max()) < 1009


def test_seed_determines_hashes():
    keys = entity_key(0, torch.arange(1000))
    a, b, c = CountMinSketch(997, 4, seed=1), CountMinSketch(997, 4, seed=1), CountMinSketch(997, 4, seed=2)
    assert torch.equal(a.buckets(keys), b.buckets(keys))
    assert not torch.equal(a.buckets(keys), c.buckets(keys))


def test_in_batch_log_q():
    """log Q = log P(entity in a batch of B draws) = log(1 - (1 - p)^B), p = est / total."""
    cms = CountMinSketch(width=1 << 16, depth=4)
    k = entity_key(0, torch.tensor([1, 2, 3]))
    assert cms.in_batch_log_q(k, 64).tolist() == [0.0, 0.0, 0.0]  # empty sketch: no correction
    cms.update(entity_key(0, torch.tensor([1, 1, 1, 2] + [10 + i for i in range(96)])))  # total 100
    lq = cms.in_batch_log_q(k, 10)
    assert lq.dtype == torch.float32
    assert lq[0].item() == pytest.approx(math.log(1 - 0.97**10), rel=1e-6)  # p = 0.03, B = 10
    assert lq[1].item() == pytest.approx(math.log(1 - 0.99**10), rel=1e-6)
    assert lq[2].item() == pytest.approx(math.log(1 - 0.99**10), rel=1e-6)  # unseen key clamped to count 1
    # a popular entity: B p = 15 expected copies, but one column that is there almost surely (log Q ~ 0,
    # not log 15 capped to 0), a rare one ~ log(B p)
    big = cms.in_batch_log_q(k, 500)
    assert big[0].item() == pytest.approx(math.log(1 - 0.97**500), abs=1e-6) and big[0].item() < 0
    tiny = CountMinSketch(width=1 << 16, depth=4)
    tiny.update(torch.tensor([10**6, 5]), counts=torch.tensor([1, 99_999]))  # p = 1e-5
    assert tiny.in_batch_log_q(torch.tensor([10**6]), 4).item() == pytest.approx(math.log(4e-5), rel=1e-4)
    assert torch.all(torch.isfinite(lq))
    with pytest.raises(ValueError, match="batch_size"):
        cms.in_batch_log_q(k, 0)
    assert cms.in_batch_log_q(k[:0], 0).shape == (0,)  # no candidates at all: nothing to correct


def test_state_dict_roundtrip_weights_only_and_resume():
    keys = zipf_stream(20_000, 3000, 1.3, 4)
    full = CountMinSketch(width=500, depth=3, seed=7)
    full.update(keys)
    half = CountMinSketch(width=500, depth=3, seed=7)
    half.update(keys[:10_000])
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    resumed = CountMinSketch(width=500, depth=3, seed=999)  # hashes come from the checkpoint
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    resumed.update(keys[10_000:])
    assert resumed.total == full.total
    assert torch.equal(resumed.table, full.table)
    assert torch.equal(resumed.estimate(keys[:100]), full.estimate(keys[:100]))
    with pytest.raises(ValueError, match="table"):
        CountMinSketch(width=10, depth=3).load_state_dict(half.state_dict())


def test_bad_input():
    with pytest.raises(ValueError, match="width"):
        CountMinSketch(width=0, depth=2)
    cms = CountMinSketch(10, 2)
    with pytest.raises(TypeError, match="keys"):
        cms.update(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="counts"):
        cms.update(torch.tensor([1, 2]), counts=torch.tensor([1]))
