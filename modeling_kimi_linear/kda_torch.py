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
``-1000`` s, so ``exp(G_i) * exp(-G_j)`` overflows. This module never forms such ratios: every decay it uses is a
product of ``exp(g)`` over a causal range of tokens (factors ``<= 1``), never the difference of two large
cumulative sums, which also avoids cancellation error. The decay-weighted Gram matrices inside a chunk are built
hierarchically (see :func:`_decay_grams`): a block is split in halves; for i in the second half and j in the first
the decay ``exp(G_i - G_j)`` is the product of two factors ``<= 1`` (gates of i's half up to i, of j's half after
j), which turns those pairs into one matrix product; pairs inside a half recurse (64 -> 32 -> ... -> 1). ``exp``
runs once per gate; the factors of a level are the previous level's times whole halves' products. Memory stays
linear in T (a few times the size of q / k); no ``[C, C, K]`` tensor is built.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F


def l2norm(x: torch.Tensor, eps: float = 1e-6, scale: float = 1.0) -> torch.Tensor:
    """L2-normalise the last dimension: ``x / sqrt(sum(x**2, -1) + eps)`` (eps inside the square root), times
    ``scale`` (folded into the per-row factor, so it costs no extra pass over x).

    Computed and returned in float32 (float64 inputs stay float64).
    """
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # no x * x temporary
    return x * (torch.rsqrt(norm * norm + eps) * scale)


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
        q, k = l2norm(q, scale=scale).to(dtype), l2norm(k).to(dtype)
    else:
        q, k = q.to(dtype) * scale, k.to(dtype)
    return q, k, v.to(dtype), g.to(dtype), beta.to(dtype), dtype


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
    """The recurrence, batched over B and H, looping over T. Inputs ``[B, T, H, *]``, state ``[B, H, K, V]``.

    One step: ``pred = (diag(e^g) S)^T k``, ``S' = diag(e^g) S + k (beta (v - pred))^T``, ``o = S'^T q``; the
    rank-1 write is an in-place ``addcmul_`` on the freshly decayed state (a decode step has T = 1 and is
    dispatch-bound: few, cheap calls)."""
    decay = g.exp()
    outs = []
    for t in range(q.shape[1]):
        k_t, decay_t = k[:, t], decay[:, t]
        pred = ((k_t * decay_t).unsqueeze(-2) @ state).squeeze(-2)  # [B, H, V]
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)
        state = state * decay_t.unsqueeze(-1)  # a fresh tensor, so the rank-1 write can be in place
        state.addcmul_(k_t.unsqueeze(-1), delta.unsqueeze(-2))
        outs.append(q[:, t].unsqueeze(-2) @ state)  # [B, H, 1, V]
    if not outs:
        return v.new_zeros(v.shape), state
    if len(outs) == 1:
        return outs[0].transpose(1, 2), state  # [B, 1, H, V]
    return torch.cat(outs, -2).transpose(1, 2), state


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


def _scale_half(x: torch.Tensor, half: int, factor: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``x`` (``[*, nb, 2, h, K]``) with ``x[..., half, :, :]`` multiplied by ``factor`` (``[*, nb, 1, K]``).

    ``inplace=False`` for autograd, which keeps views of x for the backward pass.
    """
    if inplace:
        x[..., half, :, :] *= factor
        return x
    ones = torch.ones_like(factor)
    scale = torch.stack([factor, ones] if half == 0 else [ones, factor], -3)  # [*, nb, 2, 1, K]: small
    return x * scale


def _decay_grams(
    g: torch.Tensor, lefts: torch.Tensor, right: torch.Tensor, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decay-weighted Gram matrices of blocks of tokens (strict lower triangle), and the inputs decayed to the
    block's ends.

    Args:
        g: ``[*, C, K]`` per-token log decays (``<= 0``) of blocks of C tokens.
        lefts: ``[P, *, C, K]`` P row-side vectors per token (here beta * k and q).
        right: ``[*, C, K]`` column-side vectors (here k).
        inplace: work in lefts' and right's storage, overwriting them (only when autograd does not track them).

    Returns:
        ``(gram, lefts_in, right_out, total)``:

        - gram ``[P, *, C, C]``: ``gram[p, ..., i, j] = sum_d lefts[p, ..., i, d] right[..., j, d] D(i, j, d)`` for
          ``j < i``, 0 for ``j >= i``, with ``D(i, j, d) = exp(sum_{j<u<=i} g[u, d])``;
        - lefts_in ``[P, *, C, K]``: lefts times ``exp(sum_{u<=i} g[u])`` (the gates from the block start on);
        - right_out ``[*, C, K]``: right times ``exp(sum_{u>j} g[u])`` (the gates after j to the block end);
        - total ``[*, 1, K]``: ``exp(sum_u g[u])``, the decay of the whole block.

    The block is split in halves, recursively (C is padded with inert tokens to a power of two). For i in the
    second half of a block and j in its first half, ``D(i, j) = pre(i) * suf(j)``: the gates of i's half up to i,
    and of j's half after j, both ``<= 1``. So the pairs of one level are one batched matrix product of
    ``lefts * pre`` and ``right * suf``; no ``[C, C, K]`` tensor is built. Level by level, from halves of one token
    up, the scaled vectors are kept and the halves' own factors grow by the total decay of the half before (rows)
    or after (columns) them, until they reach the block's ends: ``exp`` runs once per gate, and every decay is a
    product of factors ``<= 1``, so no ratio of decays (which over- or underflows for strong gates) appears.
    """
    size = g.shape[-2]
    full = 1 << (size - 1).bit_length()  # power of two >= size
    if full != size:  # inert padding: no decay, zero vectors
        pad = (0, 0, 0, full - size)
        g, lefts, right = F.pad(g, pad), F.pad(lefts, pad), F.pad(right, pad)
    gram = g.new_zeros(lefts.shape[0], *g.shape[:-2], full, full)
    total = g.exp()  # per half (here: per token) the product of its decays
    rows = lefts.mul_(total) if inplace else lefts * total  # i's half up to i
    cols = right  # j's half after j: nothing yet
    half = 1
    while half < full:
        blocks = (full // (2 * half), 2, half)  # [nb, 2, half]: block, which half, position in the half
        rows_b, cols_b = rows.unflatten(-2, blocks), cols.unflatten(-2, blocks)
        # gram[p, ..., (b, 1, i'), (b, 0, j')] for every block b: a strided view of the lower-left quadrants
        quadrants = gram.unflatten(-1, blocks).unflatten(-4, blocks).diagonal(0, -6, -3)[..., 1, :, 0, :, :]
        cols_t = cols_b[..., 0, :, :].mT  # j in first halves  [*, nb, K, h]
        # one product per left (a broadcast matmul would copy the columns); i in second halves
        for p, rows_p in enumerate(rows_b[..., 1, :, :].unbind(0)):
            quadrants[p].copy_((rows_p @ cols_t).movedim(-3, -1))
        # the halves merge: second halves' rows take the first half's total, first halves' columns the second's
        first, second = total.unflatten(-2, (-1, 2)).split(1, -2)  # [*, nb, 1, K] each
        rows = _scale_half(rows_b, 1, first, inplace).flatten(-4, -2)
        cols = _scale_half(cols_b, 0, second, inplace).flatten(-4, -2)
        total = (first * second).squeeze(-2)
        half *= 2
    if full != size:
        gram, rows, cols = gram[..., :size, :size], rows[..., :size, :], cols[..., :size, :]
    return gram, rows, cols, total


def _chunk_core(
    keys: torch.Tensor, v_beta: torch.Tensor, g: torch.Tensor, segments: list[tuple[int, int, torch.Tensor]]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Chunked KDA on chunk-major inputs; ``keys`` and ``v_beta`` are overwritten unless autograd tracks them.

    Args:
        keys: ``[3, N, B, H, C, K]``: ``beta * k``, q and k stacked (N chunks of C tokens).
        v_beta: ``[N, B, H, C, V]``: ``beta * v``. g: ``[N, B, H, C, K]``.
        segments: ``(first_chunk, end_chunk, start_state [B, H, K, V])``, contiguous and in order; the state is
            set to ``start_state`` at ``first_chunk`` and its value after chunk ``end_chunk - 1`` is returned.

    Returns:
        o ``[B, N * C, H, V]`` and the list of final states, one per segment.
    """
    bsz, heads = g.shape[1:3]
    inplace = not any(x.requires_grad for x in (keys, v_beta, g, *(state for _, _, state in segments)))
    # --- state-independent part, all chunks at once ---
    # A_kk = beta_i sum_d k_id k_jd exp(G_id - G_jd), j < i (the unit diagonal of I + A_kk is implicit);
    # A_qk = sum_d q_id k_jd exp(G_id - G_jd), j <= i.  exp(G) = gates from the chunk start: q_in reads the
    # incoming state, k_out writes into the outgoing one.
    qk_diag = torch.linalg.vecdot(keys[1], keys[2])  # before _decay_grams may scale keys in place
    gram, lefts_in, k_out, chunk_decay = _decay_grams(g, keys[:2], keys[2], inplace)
    gram[1].diagonal(0, -2, -1).copy_(qk_diag)
    a_kk, a_qk = gram.unbind(0)
    k_beta_in, q_in = lefts_in.unbind(0)
    # (I + A_kk) [W U] = diag(beta) [exp(G) K, V]: the UT transform, batched unit-lower-triangular solves
    solve = functools.partial(torch.linalg.solve_triangular, a_kk, upper=False, unitriangular=True)
    if inplace:  # into the right-hand sides
        w, u = solve(k_beta_in, out=k_beta_in), solve(v_beta, out=v_beta)
    else:
        w, u = solve(k_beta_in), solve(v_beta)
    per_chunk = (x.flatten(1, 2).unbind(0) for x in (w, u, q_in, k_out.mT, a_qk, chunk_decay.mT))
    # --- state recurrence over chunks ---
    outs, finals = [], []
    chunks = iter(zip(*per_chunk))
    for first, end, state in segments:
        state = state.flatten(0, 1)  # [B * H, K, V]
        for _ in range(first, end):
            w_n, u_n, q_n, k_n, a_n, decay_n = next(chunks)
            v_new = torch.baddbmm(u_n, w_n, state, alpha=-1)  # pseudo-values U - W S
            o_n = torch.baddbmm(a_n @ v_new, q_n, state)  # Q_in S + A_qk (U - W S)
            outs.append(o_n.unflatten(0, (bsz, heads)).transpose(1, 2))  # [B, C, H, V]
            state = torch.baddbmm(decay_n * state, k_n, v_new)
        finals.append(state.unflatten(0, (-1, heads)))
    if not outs:
        return v_beta.new_zeros(bsz, 0, heads, v_beta.shape[-1]), finals
    return torch.stack(outs, 1).flatten(1, 2), finals


def _chunked(x: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, N * C, H, D]`` -> chunk-major ``[N, B, H, C, D]`` (a view)."""
    return x.unflatten(1, (-1, size)).permute(1, 0, 3, 2, 4)


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
    beta = beta.unsqueeze(-1)  # [B, T, H, 1]
    inputs = (k * beta, q, k, v * beta, g)  # what the chunked form reads, all [B, T, H, D]

    if cu_seqlens is None:
        num_chunks = math.ceil(seqlen / size)
        pad = num_chunks * size - seqlen
        if pad:
            inputs = tuple(F.pad(x, (0, 0, 0, 0, 0, pad)) for x in inputs)
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
        inputs = tuple(x.new_zeros(1, padded, *x.shape[2:]).index_copy(1, index, x) for x in inputs)

    keys = torch.stack([_chunked(x, size) for x in inputs[:3]])  # one copy into chunk-major [3, N, B, H, C, K]
    v_beta, g = _chunked(inputs[3], size).contiguous(), _chunked(inputs[4], size)  # g is only read by exp()
    o, finals = _chunk_core(keys, v_beta, g, segments)
    o = o[:, :seqlen] if index is None else o.index_select(1, index)
    return o.to(out_dtype).contiguous(), (torch.cat(finals, 0) if output_final_state else None)
