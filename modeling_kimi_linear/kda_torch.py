"""Pure-PyTorch kernels of Kimi Delta Attention (KDA): the reference the FLA path is tested against, and the
CPU path.

KDA is a gated delta rule with a per-channel forget gate. Per head, with state ``S`` (``K x V``, float32):

    q_t <- l2norm(q_t) * scale,  k_t <- l2norm(k_t)
    S   <- diag(exp(g_t)) S                       decay each key channel
    S   <- S + beta_t k_t (v_t - S^T k_t)^T        delta-rule write into the decayed state
    o_t  = S^T q_t

:func:`kda_recurrent_torch` runs this token by token (decode). :func:`kda_chunk_torch` computes the same thing
chunk by chunk (prefill, training) with the WY / UT-transform form: inside a chunk all tokens are handled with
matrix products and one unit-triangular solve, and only the state hand-off between chunks is sequential.

Layouts follow FLA's ``chunk_kda``: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H, K]`` (log decay,
<= 0), beta ``[B, T, H]``, states ``[N, H, K, V]`` float32.
"""

from __future__ import annotations

import torch

SUB_BLOCK = 16  # intra-chunk pairs are split at sub-block borders so every exponent stays <= 0
CHUNKS_PER_PASS = 16  # chunks whose intra-chunk matrices are built at once (bounds memory)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2, -1) + eps)`` (eps inside the square root), in float32 (float64 stays float64)."""
    x = x.double() if x.dtype == torch.float64 else x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _prepare(q, k, v, g, beta, scale, use_qk_l2norm):
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2norm(q).to(dtype), l2norm(k).to(dtype)
    else:
        q, k = q.to(dtype), k.to(dtype)
    return q * scale, k, v.to(dtype), g.to(dtype), beta.to(dtype), dtype


def kda_recurrent_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA token by token (for decode, where T is usually 1). See the module docstring for shapes."""
    if cu_seqlens is not None:
        return _per_sequence(kda_recurrent_torch, q, k, v, g, beta, scale, initial_state, output_final_state,
                             use_qk_l2norm, cu_seqlens)
    out_dtype = v.dtype
    q, k, v, g, beta, dtype = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    bsz, seqlen, heads, dk = q.shape
    state = (
        initial_state.to(dtype).clone()
        if initial_state is not None
        else q.new_zeros(bsz, heads, dk, v.shape[-1])
    )
    outs = []
    for t in range(seqlen):
        state = state * g[:, t].exp().unsqueeze(-1)
        pred = torch.einsum("bhkv,bhk->bhv", state, k[:, t])
        delta = beta[:, t].unsqueeze(-1) * (v[:, t] - pred)
        state = state + k[:, t].unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", state, q[:, t]))
    o = torch.stack(outs, 1).to(out_dtype)
    return o, (_state_out(state, dtype) if output_final_state else None)


def kda_chunk_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA in chunks of ``chunk_size`` tokens (WY / UT form). Differentiable; see the module docstring.

    With ``cu_seqlens`` (``[N+1]``, batch size 1) the packed sequences are independent, each starting from
    ``initial_state[n]`` (or zeros) and returning its own final state.
    """
    if cu_seqlens is not None:
        return _per_sequence(kda_chunk_torch, q, k, v, g, beta, scale, initial_state, output_final_state,
                             use_qk_l2norm, cu_seqlens, chunk_size=chunk_size)
    out_dtype = v.dtype
    q, k, v, g, beta, dtype = _prepare(q, k, v, g, beta, scale, use_qk_l2norm)
    bsz, seqlen, heads, dk = q.shape
    dv = v.shape[-1]
    size = chunk_size
    pad = (-seqlen) % size
    # [B, T, H, X] -> [B, H, N, C, X]; padded tokens have k = v = q = 0, g = 0 and beta = 0: no effect on S
    q, k, v, g = (_chunks(x, pad, size) for x in (q, k, v, g))
    beta = torch.nn.functional.pad(beta, (0, 0, 0, pad)).transpose(1, 2).unflatten(2, (-1, size))
    num_chunks = q.shape[2]
    gcum = g.cumsum(-2)  # inclusive cumulative log decay inside each chunk
    eye = torch.eye(size, dtype=dtype, device=q.device)

    state = (
        initial_state.to(dtype)
        if initial_state is not None
        else q.new_zeros(bsz, heads, dk, dv)
    )
    outs = []
    for first in range(0, num_chunks, CHUNKS_PER_PASS):
        sl = slice(first, first + CHUNKS_PER_PASS)
        qc, kc, vc, gc, bc = q[:, :, sl], k[:, :, sl], v[:, :, sl], gcum[:, :, sl], beta[:, :, sl]
        a_kk, a_qk = _intra_chunk_scores(qc, kc, gc, size)
        lower = bc.unsqueeze(-1) * a_kk  # beta_i * k_i^T D_ij k_j for j < i
        # (I + lower) X = diag(beta): the UT transform, one batched unit-triangular solve
        rhs = torch.diag_embed(bc).to(dtype)
        mat = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
        decay_in = gc.exp()  # exp(G_r) <= 1
        w = mat @ (decay_in * kc)
        u = mat @ vc
        q_dec = qc * decay_in
        last = gc[..., -1:, :]  # G_C
        k_dec = kc * (last - gc).exp()
        chunk_decay = last.squeeze(-2).exp()  # [B, H, n, K]
        for j in range(qc.shape[2]):
            v_new = u[:, :, j] - w[:, :, j] @ state
            outs.append(q_dec[:, :, j] @ state + a_qk[:, :, j] @ v_new)
            state = chunk_decay[:, :, j].unsqueeze(-1) * state + k_dec[:, :, j].transpose(-1, -2) @ v_new
    o = torch.stack(outs, 2).flatten(2, 3)[:, :, :seqlen].transpose(1, 2).to(out_dtype)
    return o, (_state_out(state, dtype) if output_final_state else None)


def _chunks(x: torch.Tensor, pad: int, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2).unflatten(2, (-1, size))


def _intra_chunk_scores(
    q: torch.Tensor, k: torch.Tensor, gcum: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A_kk[i, j] = sum_d k_id k_jd exp(G_id - G_jd)`` for j < i and ``A_qk`` likewise for j <= i.

    Inputs ``[..., C, K]``; outputs ``[..., C, C]``. ``exp(G_i - G_j)`` is never formed from ``exp(G_i)`` and
    ``exp(-G_j)`` (which overflow for strong gates): pairs in different sub-blocks are split at the end ``m`` of
    j's sub-block, ``exp(G_i - G_m) * exp(G_m - G_j)``, both factors <= 1; pairs inside one sub-block use the
    difference directly.
    """
    sub = SUB_BLOCK if size % SUB_BLOCK == 0 else size
    nb = size // sub
    shape = gcum.shape[:-2]
    gb = gcum.unflatten(-2, (nb, sub))  # [..., nb, s, K]
    kb = k.unflatten(-2, (nb, sub))
    qb = q.unflatten(-2, (nb, sub))
    ref = gb[..., -1, :]  # [..., nb, K] G at the end of each sub-block
    # source side: k_j * exp(G_m(b_j) - G_j) <= 1
    src = kb * (ref.unsqueeze(-2) - gb).exp()  # [..., nb, s, K]
    # target side relative to every sub-block end; only i after that end is used, clamp keeps the rest finite
    rel = (gcum.unsqueeze(-3) - ref.unsqueeze(-2)).clamp(max=0).exp()  # [..., nb(ref), C, K]
    a_kk = (k.unsqueeze(-3) * rel) @ src.transpose(-1, -2)  # [..., nb(ref), C, s]
    a_qk = (q.unsqueeze(-3) * rel) @ src.transpose(-1, -2)
    # -> [..., C, nb * s]: column block b holds the pairs whose j lies in sub-block b
    a_kk = a_kk.permute(*range(len(shape)), -2, -3, -1).flatten(-2)
    a_qk = a_qk.permute(*range(len(shape)), -2, -3, -1).flatten(-2)
    # inside a sub-block: pairwise differences (small [s, s, K] tensors)
    diff = (gb.unsqueeze(-2) - gb.unsqueeze(-3)).clamp(max=0).exp()  # [..., nb, s(i), s(j), K]
    d_kk = (kb.unsqueeze(-2) * kb.unsqueeze(-3) * diff).sum(-1)  # [..., nb, s, s]
    d_qk = (qb.unsqueeze(-2) * kb.unsqueeze(-3) * diff).sum(-1)
    idx = torch.arange(size, device=q.device)
    blk = idx // sub
    off_block = blk.unsqueeze(1) > blk.unsqueeze(0)  # i in a later sub-block than j
    same_block = blk.unsqueeze(1) == blk.unsqueeze(0)
    strict = idx.unsqueeze(1) > idx.unsqueeze(0)
    a_kk = a_kk * off_block + _block_diag(d_kk, nb, sub) * (same_block & strict)
    a_qk = a_qk * off_block + _block_diag(d_qk, nb, sub) * (same_block & ~strict.T)
    return a_kk, a_qk


def _block_diag(blocks: torch.Tensor, nb: int, sub: int) -> torch.Tensor:
    """``[..., nb, s, s]`` -> ``[..., nb*s, nb*s]`` with the blocks on the diagonal (zeros elsewhere)."""
    out = blocks.new_zeros(*blocks.shape[:-3], nb, sub, nb, sub)
    for b in range(nb):
        out[..., b, :, b, :] = blocks[..., b, :, :]
    return out.flatten(-4, -3).flatten(-2, -1)


def _state_out(state: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return state if dtype == torch.float64 else state.float()


def _per_sequence(fn, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                  **kwargs):
    """Run ``fn`` on each sequence of a packed (``B == 1``) batch and stitch outputs and states back together."""
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got batch size {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = initial_state[n : n + 1] if initial_state is not None else None
        sl = slice(start, end)
        o, s = fn(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], scale=scale, initial_state=h0,
                  output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm, **kwargs)
        outs.append(o)
        states.append(s)
    return torch.cat(outs, 1), (torch.cat(states, 0) if output_final_state else None)
