"""Pure-PyTorch kernels of Kimi Delta Attention (KDA): the CPU path, and the reference the FLA (Triton) path is
tested against.

KDA is a gated delta rule with a per-channel forget gate. Per (sequence, head), with state ``S`` (``K x V``):

    q_t <- l2norm(q_t) * scale,  k_t <- l2norm(k_t)      (without l2norm: q_t <- q_t * scale)
    S   <- diag(exp(g_t)) S                             decay each key channel (row) of S
    S   <- S + beta_t k_t (v_t - S^T k_t)^T              delta-rule write into the decayed state
    o_t  = S^T q_t                                     read after the write

:func:`kda_recurrent_torch` runs this token by token (decode). :func:`kda_chunk_torch` computes the same thing
chunk by chunk (prefill, training) in the WY / UT-transform form: everything inside a chunk is matrix products
plus one unit-lower-triangular solve, built for all chunks at once; only the state hand-off between chunks is a
Python loop.

Layouts follow FLA's ``chunk_kda``: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]`` (log of the
per-channel decay, ``<= 0``); beta ``[B, T, H]`` (in ``[0, 1]``); states ``[N, H, K, V]``. Internal math is
float32 (float64 when any input is float64, so that ``gradcheck`` works); the output has v's dtype, the final
state is float32 (float64 in float64 mode).

Numerical stability of the chunked form: with strong gates the cumulative log decay ``G`` inside a chunk reaches
``-1000`` s, so ``exp(G_i) * exp(-G_j)`` overflows. This module only ever exponentiates sums of gates over causal
ranges (all ``<= 0``), and builds those sums by *adding* gates rather than by subtracting two large cumulative
sums, which also avoids cancellation error. The decay-weighted Gram matrices inside a chunk are built
hierarchically (see :func:`_decay_gram`): a block is split into 4 sub-blocks; for i and j in different sub-blocks
the decay ``exp(G_i - G_j)`` is the product of three factors ``<= 1`` (gates of i's sub-block up to i, of the
whole sub-blocks in between, of j's sub-block after j), which turns those pairs into matrix products; pairs inside
a sub-block recurse (64 -> 16 -> 4 -> 1). Memory stays linear in T (a few times the size of q / k); no
``[C, C, K]`` tensor is built.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension: ``x / sqrt(sum(x**2, -1) + eps)`` (eps inside the square root).

    Computed and returned in float32 (float64 inputs stay float64).
    """
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float],
    use_qk_l2norm: bool,
    initial_state: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype]:
    """Check shapes, cast to the compute dtype, normalise and scale q / k (layouts stay ``[B, T, H, *]``)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q {tuple(q.shape)}, got {tuple(v.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"g must be [B, T, H, K] like q {tuple(q.shape)}, got {tuple(g.shape)}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = {tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    dtype = _compute_dtype(q, k, v, g, beta, initial_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q).to(dtype), l2norm(k).to(dtype)
    else:
        q, k = q.to(dtype), k.to(dtype)
    return q * scale, k, v.to(dtype), g.to(dtype), beta.to(dtype), dtype


def _seq_bounds(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> list[int]:
    """Validate ``cu_seqlens`` (FlashAttention convention) and return it as a Python list."""
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (sequences packed along T), got batch size {batch}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != seqlen or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={seqlen}, got {bounds}")
    return bounds


def _initial_states(
    initial_state: Optional[torch.Tensor], n: int, heads: int, dk: int, dv: int, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The ``[N, H, K, V]`` starting states in the compute dtype (zeros when none are given)."""
    if initial_state is None:
        return torch.zeros(n, heads, dk, dv, dtype=dtype, device=device)
    if tuple(initial_state.shape) != (n, heads, dk, dv):
        raise ValueError(f"initial_state must be [N, H, K, V] = {(n, heads, dk, dv)}, got {tuple(initial_state.shape)}")
    return initial_state.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# token-by-token recurrence


def _recurrent_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, batched over B and H, looping over T. Inputs ``[B, T, H, *]``, state ``[B, H, K, V]``."""
    bsz, _, heads, dk = k.shape
    dv = v.shape[-1]
    decay = g.exp()
    outs = []
    for t in range(q.shape[1]):
        k_t = k[:, t]
        pred = ((k_t * decay[:, t]).unsqueeze(-2) @ state).squeeze(-2)  # (diag(e^g) S)^T k  [B, H, V]
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)
        state = state * decay[:, t].unsqueeze(-1)  # a fresh tensor, so the rank-1 write can be in place
        state.view(bsz * heads, dk, dv).baddbmm_(k_t.reshape(-1, dk, 1), delta.reshape(-1, 1, dv))
        outs.append((q[:, t].unsqueeze(-2) @ state).squeeze(-2))
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs, 1), state


def kda_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA token by token (decode, where T is usually 1). Differentiable with plain autograd.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``. g: ``[B, T, H, K]`` log decay (``<= 0``).
        beta: ``[B, T, H]`` write strength in ``[0, 1]``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` or None (zeros); N = B, or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the state after the last token of every sequence.
        use_qk_l2norm: L2-normalise q and k (per head) before use.
        cu_seqlens: ``[N + 1]`` cumulative lengths of sequences packed along T (needs B == 1).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[N, H, K, V]`` float32 (float64 in
        float64 mode) or None.
    """
    out_dtype = v.dtype
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    q, k, v, g, beta, dtype = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, initial_state)
    if cu_seqlens is None:
        state = _initial_states(initial_state, bsz, heads, dk, dv, dtype, q.device)
        o, state = _recurrent_core(q, k, v, g, beta, state)
        return o.to(out_dtype), (state if output_final_state else None)

    bounds = _seq_bounds(cu_seqlens, bsz, seqlen)
    n = len(bounds) - 1
    states = _initial_states(initial_state, n, heads, dk, dv, dtype, q.device)
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if len(set(lengths)) == 1:  # equal lengths (e.g. one token per sequence in decode): batch the sequences
        length = lengths[0]
        o, final = _recurrent_core(*(x.reshape(n, length, *x.shape[2:]) for x in (q, k, v, g, beta)), states)
        o = o.reshape(1, seqlen, heads, dv)
    else:
        outs, finals = [], []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            o_i, s_i = _recurrent_core(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b], states[i : i + 1])
            outs.append(o_i)
            finals.append(s_i)
        o, final = torch.cat(outs, 1), torch.cat(finals, 0)
    return o.to(out_dtype), (final if output_final_state else None)


# ----------------------------------------------------------------------------------------------------------------
# chunked (WY / UT transform) form


def _num_sub_blocks(size: int) -> int:
    """How many sub-blocks a block of ``size`` tokens is split into: 4 when possible, else its smallest factor."""
    if size % 4 == 0:
        return 4
    d = 2
    while size % d:
        d += 1
    return d


def _decay_gram(g: torch.Tensor, lefts: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Decay-weighted Gram matrices of blocks of tokens, inclusive lower triangle.

    Args:
        g: ``[*, C, K]`` per-token log decays (``<= 0``) of blocks of C tokens.
        lefts: ``[*, C, P, K]`` P row-side vectors per token (here k and q).
        right: ``[*, C, K]`` column-side vectors (here k).

    Returns:
        ``[*, C, P, C]`` with ``out[..., i, p, j] = sum_d lefts[i, p, d] right[j, d] exp(sum_{j<u<=i} g[u, d])`` for
        ``j <= i`` and 0 for ``j > i``.

    The block is split into ns sub-blocks (4 when C allows). For i in sub-block t and j in an earlier sub-block
    s, the decay is a product of three factors, each the exp of a sum of gates (so ``<= 1``, no cancellation)::

        exp(gates of t up to i) * exp(gates of the whole sub-blocks strictly between s and t) * exp(gates of s after j)

    which makes those pairs one matrix product per sub-block t. Pairs inside one sub-block recurse, down to single
    tokens. Temporaries are a few times the size of ``lefts``; nothing of size ``[C, C, K]`` is built.
    """
    size = g.shape[-2]
    if size == 1:
        return (lefts * right.unsqueeze(-2)).sum(-1, keepdim=True)  # [*, 1, P, 1]
    dtype, device = g.dtype, g.device
    ns = _num_sub_blocks(size)
    sub = size // ns
    npair = lefts.shape[-2]
    gb = g.unflatten(-2, (ns, sub))  # [*, ns, sub, K]
    lb = lefts.unflatten(-3, (ns, sub))  # [*, ns, sub, P, K]
    rb = right.unflatten(-2, (ns, sub))  # [*, ns, sub, K]
    # pairs inside each sub-block first, so that the recursion's temporaries are gone before this level's exist
    inner = _decay_gram(gb, lb, rb)  # [*, ns, sub, P, sub]
    eye = torch.eye(ns, dtype=dtype, device=device)
    out = (inner.unsqueeze(-2) * eye.view(ns, 1, 1, ns, 1)).flatten(-5, -4).flatten(-2, -1)  # block diagonal
    del inner
    if sub == 1:
        row_gates = gb[..., 1:, :, :]  # gates over u <= i inside i's (one-token) sub-block
        cols = rb[..., :-1, :, :]  # no gates after j inside its one-token sub-block
    else:
        ones = torch.ones(sub, sub, dtype=dtype, device=device)
        row_gates = (ones.tril() @ gb)[..., 1:, :, :]  # sum over u <= i inside i's sub-block
        cols = rb[..., :-1, :, :] * (ones.triu(1) @ gb)[..., :-1, :, :].exp()  # sum over u > j in j's sub-block
    rows = lb[..., 1:, :, :, :] * row_gates.exp().unsqueeze(-2)  # [*, t = 1..ns-1, sub, P, K]
    del row_gates
    blk = torch.arange(ns, device=device)
    t_idx, s_idx = blk[1:].view(-1, 1), blk[:-1].view(1, -1)
    spans = ((blk > s_idx.unsqueeze(-1)) & (blk < t_idx.unsqueeze(-1))).to(dtype)  # [t, s, u]: s < u < t
    between = (spans.flatten(0, 1) @ gb.sum(-2)).unflatten(-2, (ns - 1, ns - 1))  # [*, t, s, K]
    cols = cols.unsqueeze(-4) * between.exp().unsqueeze(-2)  # [*, t, s = 0..ns-2, sub, K]
    cross = rows.flatten(-3, -2) @ cols.flatten(-3, -2).transpose(-1, -2)  # [*, t, sub * P, s * sub]
    del rows, cols
    later = (t_idx > s_idx).to(dtype).repeat_interleave(sub, -1)  # [t, s * sub]: j's sub-block before i's
    cross = cross.unflatten(-2, (sub, npair)) * later[:, None, None, :]  # [*, t, sub, P, s * sub]
    # no cross pairs in the rows of sub-block 0 or the columns of the last sub-block
    return out + F.pad(cross.flatten(-4, -3), (0, sub, 0, 0, sub, 0))


def _chunk_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    segments: list[tuple[int, int, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chunked KDA on chunk-major inputs.

    Args:
        q, k, g: ``[N, B, H, C, K]``; v: ``[N, B, H, C, V]``; beta: ``[N, B, H, C]`` (N chunks of C tokens).
        segments: ``(first_chunk, end_chunk, start_state [B, H, K, V])``, contiguous and in order; the state is
            set to ``start_state`` at ``first_chunk`` and its value after chunk ``end_chunk - 1`` is returned.

    Returns:
        o ``[N, B, H, C, V]`` and the list of final states, one per segment.
    """
    # --- state-independent part, all chunks at once ---
    gram = _decay_gram(g, torch.stack([k, q], -2), k)  # [N, B, H, C, 2, C]
    a_kk = gram[..., 0, :].tril(-1) * beta.unsqueeze(-1)  # beta_i sum_d k_id k_jd exp(G_id - G_jd), j < i
    a_qk = gram[..., 1, :]  # sum_d q_id k_jd exp(G_id - G_jd), j <= i
    exp_in = g.cumsum(-2).exp()  # exp(G_i): gates from the chunk start through i
    # (I + A_kk) [W U] = diag(beta) [exp(G) K, V]: the UT transform, batched unit-lower-triangular solves
    beta = beta.unsqueeze(-1)
    w = torch.linalg.solve_triangular(a_kk, exp_in * k * beta, upper=False, unitriangular=True)
    u = torch.linalg.solve_triangular(a_kk, v * beta, upper=False, unitriangular=True)
    del a_kk
    q_in = q * exp_in  # reads the state entering the chunk
    chunk_decay = exp_in[..., -1, :].unsqueeze(-1)  # exp(G_C)  [N, B, H, K, 1]
    del exp_in
    after = F.pad(g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # G_C - G_i: gates after i
    k_out = (k * after.exp()).transpose(-1, -2)  # [N, B, H, K, C]
    del after
    # --- state recurrence over chunks: only what needs the incoming state ---
    starts, new_vals, finals = [], [], []
    for first, end, state in segments:
        for n in range(first, end):
            starts.append(state)
            v_new = u[n] - w[n] @ state  # pseudo-values U - W S0
            new_vals.append(v_new)
            state = chunk_decay[n] * state + k_out[n] @ v_new
        finals.append(state)
    if not new_vals:
        return v.new_zeros(v.shape), finals
    return q_in @ torch.stack(starts) + a_qk @ torch.stack(new_vals), finals


def _to_chunks(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, N * C, H, D]`` -> chunk-major ``[N, B, H, C, D]`` (contiguous)."""
    return x.unflatten(1, (-1, size)).permute(1, 0, 3, 2, 4).contiguous()


def kda_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA in chunks of ``chunk_size`` tokens (WY / UT-transform form), for prefill and training.

    Same arguments and results as :func:`kda_recurrent_torch`, plus ``chunk_size``. Differentiable with plain
    autograd (including w.r.t. ``initial_state``). T need not be a multiple of ``chunk_size``: the tail is padded
    with inert tokens (g = k = v = 0, beta = 0). With ``cu_seqlens`` every packed sequence is padded to whole chunks
    of its own, so no chunk straddles two sequences, and all sequences are still processed in one batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = v.dtype
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    size = chunk_size
    q, k, v, g, beta, dtype = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, initial_state)
    beta = beta.unsqueeze(-1)  # [B, T, H, 1], so that every input is [B, T, H, D]

    if cu_seqlens is None:
        num_chunks = math.ceil(seqlen / size)
        pad = num_chunks * size - seqlen
        if pad:
            q, k, v, g, beta = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g, beta))
        states = _initial_states(initial_state, bsz, heads, dk, dv, dtype, q.device)
        segments = [(0, num_chunks, states)]
        index = None
    else:
        bounds = _seq_bounds(cu_seqlens, bsz, seqlen)
        n = len(bounds) - 1
        states = _initial_states(initial_state, n, heads, dk, dv, dtype, q.device)
        segments, pieces, first, padded = [], [], 0, 0
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            chunks = math.ceil((b - a) / size)
            pieces.append(torch.arange(padded, padded + b - a))
            segments.append((first, first + chunks, states[i : i + 1]))
            first += chunks
            padded += chunks * size
        # position of every token in a stream where each sequence is padded to whole chunks
        index = torch.cat(pieces).to(q.device)
        q, k, v, g, beta = (
            x.new_zeros(1, padded, *x.shape[2:]).index_copy(1, index, x) for x in (q, k, v, g, beta)
        )

    q, k, v, g, beta = (_to_chunks(x, size) for x in (q, k, v, g, beta))
    o, finals = _chunk_core(q, k, v, g, beta.squeeze(-1), segments)
    o = o.permute(1, 0, 3, 2, 4).flatten(1, 2)  # [N, B, H, C, V] -> [B, N * C, H, V]
    o = o[:, :seqlen] if index is None else o.index_select(1, index)
    return o.to(out_dtype).contiguous(), (torch.cat(finals, 0) if output_final_state else None)
