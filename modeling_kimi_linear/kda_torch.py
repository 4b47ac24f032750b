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
``-1000`` s, so ``exp(G_i) * exp(-G_j)`` overflows. This module only ever exponentiates sums of gates over a
causal range, ``sum_{j < u <= i} g_u <= 0``, and builds those sums by *adding* gates (prefix / suffix sums inside
small blocks) rather than by subtracting two large cumulative sums, which also avoids cancellation error. The
decay-weighted Gram matrices are built hierarchically (see :func:`_decay_gram`): a block is split into 4
sub-blocks; pairs in different sub-blocks factor at the end ``m`` of j's sub-block,
``exp(G_i - G_m) * exp(G_m - G_j)`` (both factors ``<= 1``); pairs inside a sub-block recurse, down to blocks of
at most 4 tokens that use the pairwise ``[4, 4, K]`` differences directly. Memory stays linear in T (a few
times the size of q/k), with no ``[C, C, K]`` tensor per chunk.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_SPLIT = 4  # sub-blocks per block in the hierarchical Gram construction
_LEAF = 4  # blocks of at most this many tokens use pairwise gate sums


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
    decay = g.exp()
    outs = []
    for t in range(q.shape[1]):
        state = state * decay[:, t].unsqueeze(-1)
        pred = (k[:, t].unsqueeze(-2) @ state).squeeze(-2)  # S^T k  [B, H, V]
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)
        state = state + k[:, t].unsqueeze(-1) * delta.unsqueeze(-2)
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


def _decay_gram(g: torch.Tensor, lefts: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Decay-weighted Gram matrices of a block of tokens, inclusive lower triangle.

    Args:
        g: ``[*, C, K]`` per-token log decays (``<= 0``) of blocks of C tokens.
        lefts: ``[P, *, C, K]`` P stacked row-side vectors (here k and q).
        right: ``[*, C, K]`` column-side vectors (here k).

    Returns:
        ``[P, *, C, C]`` with ``out[p, ..., i, j] = sum_d lefts[p, i, d] right[j, d] exp(sum_{j<u<=i} g[u, d])``
        for ``j <= i`` and 0 for ``j > i``.

    Every exponent is a sum of gates (never a difference of cumulative sums), so it is ``<= 0`` and exact to
    rounding. Blocks of more than ``_LEAF`` tokens (divisible by ``_SPLIT``) are split into ``_SPLIT`` sub-blocks:
    pairs in different sub-blocks factor at the end m of j's sub-block, pairs in the same one recurse.
    """
    size = g.shape[-2]
    dtype, device = g.dtype, g.device
    if size <= _LEAF or size % _SPLIT:
        # leaf: pairwise gate sums D[i, j] = sum_u [j < u <= i] g_u via a 0/1 path tensor, [*, C, C, K]
        idx = torch.arange(size, device=device)
        u, i, j = idx, idx.view(-1, 1, 1), idx.view(1, -1, 1)
        path = ((u > j) & (u <= i)).to(dtype)  # [C(i), C(j), C(u)]
        causal = (idx.view(-1, 1) >= idx.view(1, -1)).to(dtype)  # [C(i), C(j)]
        weight = torch.exp(path @ g.unsqueeze(-3)) * causal.unsqueeze(-1)  # [*, C(i), C(j), K]
        cols = weight * right.unsqueeze(-3)  # [*, C(i), C(j), K]
        # out[p, *, i, j] = sum_k lefts[p, *, i, k] cols[*, i, j, k]: a batched [P, K] @ [K, C] per row i
        out = lefts.movedim(0, -2) @ cols.transpose(-1, -2)  # [*, C(i), P, C(j)]
        return out.movedim(-2, 0)

    ns, sub = _SPLIT, size // _SPLIT
    gb = g.unflatten(-2, (ns, sub))  # [*, ns, sub, K]
    lb = lefts.unflatten(-2, (ns, sub))  # [P, *, ns, sub, K]
    rb = right.unflatten(-2, (ns, sub))  # [*, ns, sub, K]
    ones = torch.ones(sub, sub, dtype=dtype, device=device)
    prefix = ones.tril() @ gb  # sum of g over u <= i inside i's sub-block (inclusive)
    suffix = ones.triu(1) @ gb  # sum of g over u > j inside j's sub-block (exclusive)
    totals = gb.sum(-2)  # [*, ns, K]
    blk = torch.arange(ns, device=device)
    t_, s_, u_ = blk.view(-1, 1, 1), blk.view(1, -1, 1), blk
    between = ((u_ > s_) & (u_ < t_)).to(dtype) @ totals.unsqueeze(-3)  # [*, ns(t), ns(s), K]: sum over s < u < t
    # rows in sub-blocks t = 1..ns-1, reference ends of sub-blocks s = 0..ns-2 (only s < t is used)
    to_ref = prefix[..., 1:, None, :, :] + between[..., 1:, :-1, None, :]  # [*, t, s, sub, K] = G_i - G_m(s)
    valid = (blk[1:].view(-1, 1) > blk[:-1].view(1, -1)).to(dtype)  # [t, s]
    to_ref = to_ref * valid[:, :, None, None]  # unused (t <= s) exponents set to 0, never positive
    row_side = lb[..., 1:, None, :, :] * torch.exp(to_ref)  # [P, *, t, s, sub, K]
    col_side = rb[..., :-1, :, :] * torch.exp(suffix[..., :-1, :, :])  # [*, s, sub, K] (k_j exp(G_m - G_j))
    cross = row_side @ col_side.unsqueeze(-4).transpose(-1, -2)  # [P, *, t, s, sub(i), sub(j)]
    cross = cross * valid[:, :, None, None]
    cross = cross.transpose(-3, -2).flatten(-4, -3).flatten(-2, -1)  # [P, *, (ns-1) sub, (ns-1) sub]
    cross = F.pad(cross, (0, sub, sub, 0))  # rows of sub-block 0 and columns of the last sub-block are zero
    inner = _decay_gram(gb, lb, rb)  # [P, *, ns, sub, sub]
    eye = torch.eye(ns, dtype=dtype, device=device)
    diag = (inner.unsqueeze(-2) * eye[:, None, :, None]).flatten(-4, -3).flatten(-2, -1)  # block diagonal
    return cross + diag


def _chunk_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    segments: list[tuple[int, int, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chunked KDA on chunk-shaped inputs.

    Args:
        q, k, g: ``[B, H, N, C, K]``; v: ``[B, H, N, C, V]``; beta: ``[B, H, N, C]``.
        segments: ``(first_chunk, end_chunk, start_state [B, H, K, V])``, contiguous and in order; the state is
            reset to ``start_state`` at ``first_chunk`` and its value after ``end_chunk - 1`` is returned.

    Returns:
        o ``[B, H, N, C, V]`` and the list of final states, one per segment.
    """
    size = q.shape[-2]
    dk = q.shape[-1]
    # --- state-independent part, all chunks at once ---
    gram = _decay_gram(g, torch.stack([k, q]), k)  # [2, B, H, N, C, C]
    a_kk = gram[0].tril(-1) * beta.unsqueeze(-1)  # beta_i k_i^T D_ij k_j, j < i
    a_qk = gram[1]  # q_i^T D_ij k_j, j <= i
    decay_in = g.cumsum(-2)  # G_i: gates from the chunk start through i (<= 0)
    decay_out = F.pad(g.flip(-2).cumsum(-2).flip(-2)[..., 1:, :], (0, 0, 0, 1))  # G_C - G_i: gates after i
    exp_in = decay_in.exp()
    rhs = torch.cat([exp_in * k, v], -1) * beta.unsqueeze(-1)
    # (I + A) [W U] = diag(beta) [exp(G) K, V]: the UT transform, one batched unit-lower-triangular solve
    wu = torch.linalg.solve_triangular(a_kk, rhs, upper=False, unitriangular=True)
    w, u = wu[..., :dk], wu[..., dk:]
    wq = torch.cat([w, q * exp_in], -2)  # [B, H, N, 2C, K]: both read the incoming state
    k_out = (k * decay_out.exp()).transpose(-1, -2)  # [B, H, N, K, C]
    chunk_decay = decay_in[..., -1, :].exp().unsqueeze(-1)  # exp(G_C)  [B, H, N, K, 1]
    # --- state recurrence over chunks ---
    new_vals, reads, finals = [], [], []
    for first, end, state in segments:
        for n in range(first, end):
            read = wq[:, :, n] @ state  # [B, H, 2C, V]
            v_new = u[:, :, n] - read[..., :size, :]  # pseudo-values U - W S0
            new_vals.append(v_new)
            reads.append(read[..., size:, :])  # (Q exp(G)) S0
            state = chunk_decay[:, :, n] * state + k_out[:, :, n] @ v_new
        finals.append(state)
    if not new_vals:
        return v.new_zeros(v.shape), finals
    v_new = torch.stack(new_vals, 2)
    o = torch.stack(reads, 2) + a_qk @ v_new
    return o, finals


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
    autograd (including w.r.t. ``initial_state``). T need not be a multiple of ``chunk_size`` (the tail is padded
    with inert tokens: g = k = v = 0, beta = 0). With ``cu_seqlens`` every packed sequence is padded to whole
    chunks of its own, so no chunk straddles two sequences; all sequences are still processed in one batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    out_dtype = v.dtype
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    size = chunk_size
    q, k, v, g, beta, dtype = _prepare(q, k, v, g, beta, scale, use_qk_l2norm, initial_state)
    # [B, T, H, X] -> [B, H, T, X]
    q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))
    beta = beta.transpose(1, 2).unsqueeze(-1)

    if cu_seqlens is None:
        num_chunks = math.ceil(seqlen / size)
        pad = num_chunks * size - seqlen
        q, k, v, g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g, beta))
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
        # position of every token in the stream where each sequence is padded to whole chunks
        index = torch.cat(pieces).to(q.device)
        q, k, v, g, beta = (
            x.new_zeros(*x.shape[:2], padded, x.shape[-1]).index_copy(2, index, x) for x in (q, k, v, g, beta)
        )

    q, k, v, g, beta = (x.unflatten(2, (-1, size)) for x in (q, k, v, g, beta))
    o, finals = _chunk_core(q, k, v, g, beta.squeeze(-1), segments)
    o = o.flatten(2, 3)
    o = o[:, :, :seqlen] if index is None else o.index_select(2, index)
    o = o.transpose(1, 2).to(out_dtype)
    return o, (torch.cat(finals, 0) if output_final_state else None)
