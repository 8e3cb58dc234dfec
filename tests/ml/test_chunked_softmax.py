"""Chunked softmax (Algorithm 1, ml/chunked_softmax.py) equals the unchunked eq. 1 loss in value and gradients."""

import pytest
import torch

from ml.chunked_softmax import ChunkedSoftmaxFunction, chunked_sampled_softmax_loss
from ml.losses import sampled_softmax_loss

B, M, D = 50, 37, 16


def make_inputs(seed, *, features=True, negatives=True):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    q = norm(torch.randn(B, D, generator=g), dim=-1)
    p = norm(q + 0.5 * torch.randn(B, D, generator=g), dim=-1)
    n = norm(torch.randn(M, D, generator=g), dim=-1) if negatives else None
    kw = {}
    if features:
        kw = {
            "positive_log_q": -torch.rand(B, generator=g) * 4,
            "negative_log_q": -torch.rand(M, generator=g) * 4 if negatives else None,
            "positive_keys": torch.randint(0, 20, (B,), generator=g),  # duplicates -> in-batch accidental hits
            "negative_keys": torch.randint(0, 20, (M,), generator=g) if negatives else None,
            "weights": torch.rand(B, generator=g) * 2,
        }
    return q, p, n, kw


def loss_and_grads(q, p, n, kw, scale_value, chunk_size, grad_scale=1.0):
    q = q.clone().requires_grad_()
    p = p.clone().requires_grad_()
    n = n.clone().requires_grad_() if n is not None else None
    scale = torch.tensor(scale_value, requires_grad=True)
    loss = sampled_softmax_loss(q, p, n, scale=scale, chunk_size=chunk_size, **kw)
    (loss * grad_scale).backward()
    grads = [q.grad, p.grad, scale.grad] + ([n.grad] if n is not None else [])
    return loss.detach(), grads


# 1: one query per chunk; 7: ragged (50 = 7 * 7 + 1); 16: ragged (50 = 3 * 16 + 2); 25: even; 50 = B; 64 > B
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 25, 50, 64])
@pytest.mark.parametrize("features", [False, True])
def test_chunked_equals_naive_fp32(chunk_size, features):
    q, p, n, kw = make_inputs(seed=chunk_size, features=features)
    ref_loss, ref_grads = loss_and_grads(q, p, n, kw, 20.0, None)
    loss, grads = loss_and_grads(q, p, n, kw, 20.0, chunk_size)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert g is not None and g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_chunked_without_random_negatives():
    q, p, _, kw = make_inputs(seed=3, features=True, negatives=False)
    ref_loss, ref_grads = loss_and_grads(q, p, None, kw, 15.0, None)
    loss, grads = loss_and_grads(q, p, None, kw, 15.0, 8)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_ragged_chunks_are_weighted_by_size_not_by_chunk_count():
    # Algorithm 1 line 10 divides the sum of chunk losses by n_chunks; with a ragged last chunk that is not
    # eq. 1's batch mean. Our chunked loss is the batch mean; the literal 1/n_chunks average differs.
    q, p, n, kw = make_inputs(seed=5, features=False)
    chunk = 16  # chunks of 16, 16, 16, 2
    chunk_means = []
    for s in range(0, B, chunk):
        e = min(s + chunk, B)
        w = torch.zeros(B)
        w[s:e] = B / (e - s)  # mean over B of w_i * l_i = mean over the chunk of l_i
        chunk_means.append(sampled_softmax_loss(q, p, n, scale=20.0, weights=w))
    size_weighted = sum(m * (min(s + chunk, B) - s) / B for m, s in zip(chunk_means, range(0, B, chunk)))
    literal_alg1 = sum(chunk_means) / len(chunk_means)
    chunked, _ = loss_and_grads(q, p, n, kw, 20.0, chunk)
    torch.testing.assert_close(chunked, size_weighted, rtol=1e-5, atol=1e-5)
    assert abs(literal_alg1.item() - chunked.item()) > 1e-3


def test_grad_output_is_multiplied():
    q, p, n, kw = make_inputs(seed=7)
    _, g1 = loss_and_grads(q, p, n, kw, 20.0, 16, grad_scale=1.0)
    _, g3 = loss_and_grads(q, p, n, kw, 20.0, 16, grad_scale=-3.0)
    for a, b in zip(g1, g3):
        torch.testing.assert_close(b, -3.0 * a, rtol=1e-6, atol=1e-7)


def test_retain_graph_double_backward_call_and_no_grad_inputs():
    q, p, n, kw = make_inputs(seed=8)
    qq = q.clone().requires_grad_()
    loss = sampled_softmax_loss(qq, p, n, scale=20.0, chunk_size=10, **kw)  # only q needs a gradient
    loss.backward(retain_graph=True)
    first = qq.grad.clone()
    loss.backward()
    torch.testing.assert_close(qq.grad, 2 * first)
    with torch.no_grad():
        nograd = sampled_softmax_loss(q, p, n, scale=20.0, chunk_size=10, **kw)
    torch.testing.assert_close(nograd, loss.detach())


def test_autocast_bf16_cpu_trains_a_model():
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, D)
    scale = torch.nn.Parameter(torch.tensor(15.0))
    q_in, p_in, n_in, kw = make_inputs(seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, p, n = (torch.nn.functional.normalize(enc(x), dim=-1) for x in (q_in, p_in, n_in))
        assert q.dtype == torch.bfloat16
        chunked = sampled_softmax_loss(q, p, n, scale=scale, chunk_size=16, **kw)
        naive = sampled_softmax_loss(q, p, n, scale=scale, **kw)
    assert chunked.dtype == torch.float32 and torch.isfinite(chunked)
    # both paths see the same bf16 embeddings and do the softmax in fp32
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-5)
    chunked.backward(retain_graph=True)
    g_chunked = [enc.weight.grad.clone(), scale.grad.clone()]
    enc.zero_grad()
    scale.grad = None
    naive.backward()
    assert all(torch.isfinite(g).all() for g in g_chunked)
    torch.testing.assert_close(g_chunked[0], enc.weight.grad, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(g_chunked[1], scale.grad, rtol=2e-2, atol=1e-4)


def test_function_per_device_type_and_convenience_wrapper():
    assert ChunkedSoftmaxFunction("cpu") is ChunkedSoftmaxFunction("cpu")
    assert ChunkedSoftmaxFunction("cpu") is not ChunkedSoftmaxFunction("cuda")
    q, p, n, kw = make_inputs(seed=10)
    a = chunked_sampled_softmax_loss(q, p, n, chunk_size=9, scale=12.0, **kw)
    b = sampled_softmax_loss(q, p, n, scale=12.0, **kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
