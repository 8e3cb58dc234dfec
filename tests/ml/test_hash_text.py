"""Hash text embeddings: the CPU path that encodes each distinct token once equals the direct path."""

from __future__ import annotations

import torch

from ml.config import TextHashConfig
from ml.encoders import HashTextEncoder


def _pair():
    torch.manual_seed(0)
    a = HashTextEncoder(TextHashConfig(num_buckets=4096, importance_buckets=16384, dim=16))
    b = HashTextEncoder(TextHashConfig(num_buckets=4096, importance_buckets=16384, dim=16))
    b.load_state_dict(a.state_dict())
    b.dedupe_tokens = False
    return a, b


def test_distinct_token_path_gives_the_direct_values_and_gradients():
    a, b = _pair()
    ids = torch.randint(0, 300, (200, 12))  # many repeated tokens, as in real batches
    lengths = torch.randint(0, 13, (200,))
    ids[lengths == 0] = 7  # garbage past the length is never read
    (va, ha), (vb, hb) = a(ids, lengths), b(ids, lengths)
    torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6)
    assert torch.equal(ha, hb) and not ha[lengths == 0].any()
    (va * torch.arange(16.0)).sum().backward()
    (vb * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(a.table.weight.grad, b.table.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.importance.weight.grad, b.importance.weight.grad, rtol=1e-5, atol=1e-6)


def test_no_tokens_at_all():
    a, b = _pair()
    ids, lengths = torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    torch.testing.assert_close(a(ids, lengths)[0], b(ids, lengths)[0])
    assert a(ids, lengths)[0].abs().sum() == 0
