"""Chunked sampled softmax (paper section 3.4.2, Algorithm 1) as a torch.autograd.Function.

The naive loss materialises the [B, B + M] logits L_QN and keeps them (and softmax intermediates) alive until
the backward pass. Algorithm 1 instead

1. detaches Q, P, N (here: the function's inputs are not part of an inner autograd graph at all);
2. loops over query chunks Q_chunk (and their rows of the target), computing the chunk's logits against ALL
   candidates [P, N], its loss, and - analytically, in the same step - the gradients w.r.t. Q_chunk, P, N and
   lambda (``scale``); the gradients are accumulated and the chunk's logits are freed before the next chunk;
3. returns the loss; ``backward`` then hands the accumulated dL/dQ, dL/dP, dL/dN (times grad_output) to
   autograd, i.e. ONE backward pass into the model (line 11 of Algorithm 1).

Peak extra memory is O(chunk_size * (B + M)) instead of O(B * (B + M)).

Averaging (Algorithm 1, line 10 vs eq. 1's mean): Algorithm 1 averages per-chunk mean losses with
1 / n_chunks. That equals the batch mean of eq. 1 only when every chunk has the same size; with a ragged last
chunk it would over-weight the small chunk. We weight chunk c by |c| / B instead, i.e. sum the per-example
losses (and their gradients) over all chunks and divide by B once; for equal chunks this IS 1 / n_chunks times
the sum of chunk means, so eq. 1's mean and Algorithm 1's averaging coincide and the chunked loss and
gradients equal the unchunked ones (tests/ml/test_chunked_softmax.py: allclose at 1e-5 in fp32).

The math is that of ``ml.losses`` (logit = lambda * q.c - log Q(c), accidental hits and duplicate
candidate columns -> -inf, the same mask as the naive path's, loss =
mean_i(w_i * l_i)); gradients per chunk, with G = softmax(logits) - onehot(target) scaled by w_i / B:
  dL/dQ_chunk = lambda * G @ C,  dL/dC += lambda * G^T @ Q_chunk,  dL/dlambda += sum(Q_chunk * (G @ C)),
  dL/dlogQ_j -= sum_i G_ij,  dL/dw_i = l_i / B.

Autocast: ``forward`` is wrapped in ``torch.amp.custom_fwd(device_type=..., cast_inputs=torch.float32)`` so
under autocast (fp16 on CUDA, bf16 on CPU) it runs with autocast disabled on float32 copies of its inputs
(logsumexp and the ~softmax/B gradient entries underflow in half precision); ``backward`` uses
``custom_bwd`` so it runs under the same autocast state as the forward. Gradients are returned in float32
and autograd casts them to each input's dtype. custom_fwd takes the device type at decoration time, so one
Function class is built per device type (``cpu``, ``cuda``, ...).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ml.softmax_base import (
    SoftmaxInputs,
    accidental_hit_mask,
    candidate_log_q,
    compute_dtype,
    empty_batch_loss,
    prepare_inputs,
    target_rows,
)

__all__ = ["ChunkedSoftmaxFunction", "chunked_sampled_softmax_loss", "chunked_softmax_loss"]


def _chunked_forward(
    ctx, q, p, n, scale, pos_lq, neg_lq, weights, pos_keys, neg_keys, q_keys, targets, dup, chunk_size
):
    # nq queries (== b unless ``targets`` maps several queries onto one positive), b positives, m negatives
    nq, b, m = q.shape[0], p.shape[0], n.shape[0]
    dt = compute_dtype(q, p, n)
    need = ctx.needs_input_grad
    need_q, need_p, need_n, need_s = need[0], need[1], need[2], need[3]
    need_lq = need[4] or need[5]
    need_w = need[6]
    any_grad = need_q or need_p or need_n or need_s or need_lq or need_w

    with torch.no_grad():
        Q = q.detach().to(dt)
        C = torch.cat([p.detach().to(dt), n.detach().to(dt)])  # candidates [B + M, d]
        s = scale.detach().to(dt)
        lq = candidate_log_q(pos_lq, neg_lq, b, m, C)
        w = weights.detach().to(dt) if weights is not None else None

        gQ_unscaled = torch.zeros_like(Q) if (need_q or need_s) else None
        gC_unscaled = torch.zeros_like(C) if (need_p or need_n) else None
        g_s = torch.zeros((), dtype=dt, device=Q.device)
        g_lq = torch.zeros(b + m, dtype=dt, device=Q.device) if need_lq else None
        g_w = torch.zeros(nq, dtype=dt, device=Q.device) if need_w else None
        total = torch.zeros((), dtype=dt, device=Q.device)

        for start in range(0, nq, chunk_size):
            end = min(start + chunk_size, nq)
            Qc = Q[start:end]
            rows = torch.arange(end - start, device=Q.device)
            tgt = target_rows(targets, slice(start, end), Q.device)
            logits = Qc @ C.T  # [c, B + M]: the only big buffer, freed at the end of the iteration
            logits.mul_(s)
            if lq is not None:
                logits.sub_(lq[None, :])
            mask = accidental_hit_mask(
                pos_keys,
                neg_keys,
                slice(start, end),
                b,
                m,
                query_keys=q_keys,
                targets=targets,
                duplicates=dup,
            )
            if mask is not None:
                logits.masked_fill_(mask, float("-inf"))
                del mask
            lse = torch.logsumexp(logits, dim=1)
            per_ex = lse - logits[rows, tgt]  # l_i of eq. 1
            total += (per_ex * w[start:end]).sum() if w is not None else per_ex.sum()
            if not any_grad:
                del logits
                continue
            # G = dL/dlogits for this chunk, computed in place in the logits buffer.
            G = logits.sub_(lse[:, None]).exp_()
            G[rows, tgt] -= 1.0
            coef = (
                (w[start:end] / nq)
                if w is not None
                else torch.full((end - start,), 1.0 / nq, dtype=dt, device=Q.device)
            )
            G.mul_(coef[:, None])
            if gQ_unscaled is not None:
                GC = G @ C  # dL/dQ_chunk / lambda
                gQ_unscaled[start:end] = GC
            if gC_unscaled is not None:
                gC_unscaled.addmm_(G.T, Qc)
            if g_lq is not None:
                g_lq -= G.sum(dim=0)
            if g_w is not None:
                g_w[start:end] = per_ex / nq
            del G, logits

        loss = total / nq
        grads = {}
        if need_s:
            g_s = (Q * gQ_unscaled).sum()
            grads["scale"] = g_s
        if need_q:
            grads["q"] = gQ_unscaled * s
        if gC_unscaled is not None:
            gC = gC_unscaled.mul_(s)
            if need_p:
                grads["p"] = gC[:b]
            if need_n:
                grads["n"] = gC[b:]
        if g_lq is not None:
            if need[4]:
                grads["pos_lq"] = g_lq[:b]
            if need[5]:
                grads["neg_lq"] = g_lq[b:]
        if g_w is not None:
            grads["w"] = g_w
    ctx.grads = grads
    ctx.scale_shape = scale.shape
    return loss


def _chunked_backward(ctx, grad_out):
    # Not freed here: backward(retain_graph=True) may call this again; the gradients (inputs' size, not the
    # logits') are released with the graph.
    g = ctx.grads

    def out(name):
        t = g.get(name)
        return None if t is None else t * grad_out.to(t.dtype)

    gs = out("scale")
    if gs is not None:
        gs = gs.reshape(ctx.scale_shape)
    return (
        out("q"),
        out("p"),
        out("n"),
        gs,
        out("pos_lq"),
        out("neg_lq"),
        out("w"),
        None,
        None,
        None,
        None,
        None,
        None,
    )


_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def _function_for(device_type: str) -> type[torch.autograd.Function]:
    """The autograd Function for one device type (custom_fwd/custom_bwd bind the device type)."""
    fn = _FUNCTIONS.get(device_type)
    if fn is None:

        class _ChunkedSoftmax(torch.autograd.Function):
            @staticmethod
            @torch.amp.custom_fwd(device_type=device_type, cast_inputs=torch.float32)
            def forward(ctx, *inputs):
                # (q, p, n, scale, pos_lq, neg_lq, weights, pos_keys, neg_keys, q_keys, targets, dup, chunk_size)
                return _chunked_forward(ctx, *inputs)

            @staticmethod
            @once_differentiable
            @torch.amp.custom_bwd(device_type=device_type)
            def backward(ctx, grad_out):
                return _chunked_backward(ctx, grad_out)

        _ChunkedSoftmax.__name__ = _ChunkedSoftmax.__qualname__ = f"ChunkedSoftmax_{device_type}"
        fn = _FUNCTIONS[device_type] = _ChunkedSoftmax
    return fn


def ChunkedSoftmaxFunction(device_type: str = "cpu") -> type[torch.autograd.Function]:
    """Return the Algorithm 1 autograd Function bound to ``device_type`` (for direct ``.apply`` use)."""
    return _function_for(device_type)


def chunked_softmax_loss(x: SoftmaxInputs, *, chunk_size: int) -> torch.Tensor:
    """Algorithm 1 on validated inputs (``ml.softmax_base.prepare_inputs``); same value and gradients as
    the naive loss."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"sampled_softmax_loss: chunk_size must be a positive int or None, got {chunk_size!r}")
    fn = _function_for(x.query.device.type)
    return fn.apply(
        x.query,
        x.positive,
        x.negatives,
        x.scale,
        x.positive_log_q,
        x.negative_log_q,
        x.weights,
        x.positive_keys,
        x.negative_keys,
        x.query_keys,
        x.targets,
        x.duplicates,
        chunk_size,
    )


def chunked_sampled_softmax_loss(query, positive, negatives, *, chunk_size: int, **kwargs) -> torch.Tensor:
    """Convenience: ``sampled_softmax_loss(..., chunk_size=chunk_size)`` (same keyword arguments)."""
    x = prepare_inputs(query, positive, negatives, **kwargs)
    if x.query.shape[0] == 0:
        return empty_batch_loss(x)
    return chunked_softmax_loss(x, chunk_size=chunk_size)
