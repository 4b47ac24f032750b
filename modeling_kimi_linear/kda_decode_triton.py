"""One Triton kernel for a KDA layer's decode step: everything between the projections and ``o_proj``.

A decode step (one new token per sequence) on the PyTorch / fla path launches some 25-30 small kernels per KDA layer
(the concatenations of the projections and of the conv taps, the short-convolution update, the gate's softplus /
exp arithmetic, sigmoid(beta), fla's ``fused_recurrent_kda`` with its l2norm, the gated RMS norm, casts and
copies). Each moves a few kilobytes, so a step replayed as a CUDA graph is dominated by per-kernel launch and tail
time. This module does all of it in one launch: ``split_v`` programs per (sequence ``b``, head ``h``), see below.

Math, per program (fp32 throughout; ``D`` = head_dim = K = V, ``P = H * D``, ``W`` = conv width):

* short convolution, for each of the head's q, k and v channels ``c``::

      x_c    = raw projection of the new token (0 when ``token_mask[b]`` is False)
      window = [tail[b, c, 0], ..., tail[b, c, W-2], x_c]         (oldest first, in the model dtype)
      y_c    = silu(sum_j weight[c, j] * window[j])                (rounded to the model dtype, as the reference)
      tail'  = window[1:]                                          (a masked token shifts in a zero, as the reference)

* ``q <- q / sqrt(sum q^2 + 1e-6) * D**-0.5``, ``k <- k / sqrt(sum k^2 + 1e-6)`` (fla's in-kernel l2norm);
* forget gate ``g = softplus(f + dt_bias) * -exp(A_log[h])`` per key channel (one value per head, broadcast over
  the key channels, with ``kda_gate_granularity="head"``); ``beta = sigmoid(b)``; both 0 for a masked token, so its
  step leaves the state unchanged (:func:`kernels.kda_padded`'s in-place route);
* the gated delta rule on the fp32 state ``S [D, D]`` (:func:`kda_torch._recurrent_core`)::

      pred = (k * e^g)^T S,   S' = diag(e^g) S + k (beta (v - pred))^T,   o = S'^T q   (rounded to the model dtype)

* the output norm ``rmsnorm(o) * weight * sigmoid(gate)`` over the head's ``D`` values (:func:`norms.
  gated_rms_normalize`, ``eps = o_norm.variance_epsilon``), written in the model dtype at ``out[b, h*D : (h+1)*D]``.

Layouts (as the cache and the PyTorch reference keep them): raw q / k / v, gate logits ``[B, 1, P]``; forget-gate
logits ``[B, 1, P]`` (``[B, 1, H]`` per head); beta logits ``[B, 1, H]``; conv weights ``[P, 1, W]`` each (the
checkpoint's ``q_conv1d.weight`` etc.: no concatenation per step); conv tail ``[B, 3P, W-1]``, q channels first, then
k, then v, oldest tap first, any strides (an eager cache holds a strided view of the previous step's window);
state ``[B, H, D, D]`` float32, any strides. The tail and the state may be written in place (the outputs may be the
inputs' memory): every program reads what it needs of its own head's channels and state before a barrier and
writes only its own columns' state and value tails after it; the q / k tails every program of the head reads are
shifted and written by the last of them to arrive (below), the only program that writes them. No program touches
another head's. No host synchronisation, fixed shapes: safe under CUDA-graph capture.

Programs: ``split_v`` per (b, h), each taking ``D / split_v`` value columns of the head's state. Column j of the
delta rule reads and writes column j of S only (``pred_j``, the update of ``S[:, j]``, ``o_j``), so the columns need
no communication; the gated norm does (it needs all D outputs of the head): each program stores its outputs in a
small fp32 workspace and counts itself in at an arrival counter (:mod:`launch_resources`); the last of the head's
programs to arrive norms the head, writes its output and its q / k conv tails, and resets the counter. A head's
state is ``D*D*4`` bytes (64 KB at D = 128), read once and written once. At batch 1 one program a head is 32
programs for an H100's 132 SMs: one SM streams each head's 128 KB, and the call took 6-7 us (a fifth of the copy
bandwidth for its 4.2 MB). :func:`split_plan` can double the programs a head while the launch has fewer programs
than SMs (up to 8 a head at batch 1, 256 programs of 16 columns), but by default stays at one program a head: on
an H100 the split computed the same values and was not faster (:data:`PLANNED_MAX_SPLIT_V`; ``bench/gpu_check.py
--only kdastep`` times each split).

Registers: at ``num_warps=4`` (the default, 128 threads) an unsplit state tile is 128 fp32 registers per thread
(``1 / split_v`` of that when split). Compiled for sm_90a by Triton 3.6 (no GPU needed;
``tests/test_kda_decode_triton.py`` does it, split and unsplit) the unsplit kernel takes 254 registers at 4 warps,
186 at 8 and 128 (the cap for 512 threads) at 16, with no spills in any. Measured unsplit on an H100
(``bench/gpu_check.py --only kdastep``, 2026-12-07, graph replays): 6.0 / 11.1 / 14.0 us per call at 4 / 8 / 16
warps at batch 1, 11.6 / 23.2 / 28.3 at batch 8, hence 4. That needs the
per-channel vectors (conv taps, gates, q / k) to be computed one tap at a time as ``[D]`` vectors: a ``[D, W]``
tile in the arithmetic made the compiler pass the whole state through shared memory to match its layout, and
spill. ``num_warps`` is an argument so that ``bench/gpu_check.py --only kdastep`` compares 4, 8 and 16 on the device.

The PyTorch path (:func:`short_conv_torch.short_conv_torch`, :func:`kda_torch.kda_recurrent_torch`,
:func:`norms.gated_rms_normalize`) is the reference; ``tests/test_kda_decode_triton.py`` checks this kernel against
it (float32 and float16) and against a float64 recurrence under Triton's interpreter (bfloat16 only on the GPU: the
interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest). Only :func:`kernels.kda_decode_step`
imports this module, and only for CUDA tensors with ``config.decode_kernels`` resolving to ``"triton"``.
"""

from __future__ import annotations

import torch

try:  # inside try: transformers' remote-code loader then does not require triton to load a checkpoint's code
    import triton
    import triton.language as tl
except ImportError as err:  # only :func:`kernels.kda_decode_step` imports this module, for CUDA tensors
    raise ImportError("the fused KDA decode kernel needs triton: pip install triton") from err

from . import pdl
from .pdl import launch_options  # noqa: F401  (this form: transformers copies pdl.py into checkpoints)
from .launch_resources import INTERPRETER_SMS, arrival_counters, sm_count

DEFAULT_NUM_WARPS = 4
MAX_SPLIT_V = 8  # programs per head at most (16 value columns each at D = 128)
# Programs per head the default plan goes up to. 1, from the first GPU run of the split (H100, 2026-12-08,
# bench/gpu_check.py --only kdastep, the release's 32 heads, graph replays of one state): batch 1 took 6.0 us
# with one program a head (4 warps) against 6.2 / 6.3 / 6.6 us with 2 / 4 / 8; batch 8, 10.8 against 12.9 /
# 13.1 / 17.1. The split computes the same values (3e-8 apart) but did not pay there. With the state read from
# memory, as in a decode step (the check stepping over 48 copies of it; H100, 2026-12-08, later): 7.5 us one
# program a head against 8.6-9.1 us split in 2, 4 or 8.
PLANNED_MAX_SPLIT_V = 1


def split_plan(heads_total: int, dim: int, sms: int, most: int | None = None) -> int:
    """Programs per head for ``heads_total = B * H`` heads: doubled (up to ``most``, default
    :data:`PLANNED_MAX_SPLIT_V`; at least 16 value columns each) while the launch has fewer programs than the
    device has SMs. Unsplit, a head's state is read and written by one program's SM, and at batch 1 the release's
    32 heads use 32 of 132 SMs."""
    most = PLANNED_MAX_SPLIT_V if most is None else min(most, MAX_SPLIT_V)
    split = 1
    while split < most and heads_total * split < sms and dim // (2 * split) >= 16:
        split *= 2
    return split


@triton.jit
def _log1p(u):
    """``log(1 + u)`` accurate for small ``u >= 0`` (Kahan's trick: the rounding of ``1 + u`` cancels)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _conv(x_ptr, keep, w_ptr, tail_ptr, stride_tc, stride_tw, offs_d, W: tl.constexpr, DTYPE: tl.constexpr):
    """One head's q, k or v block of the short convolution, ``[D]`` fp32: ``silu(sum_j weight[c, j] * window[c, j])``
    rounded to the model dtype, the window being the old tail (``tail_ptr``: the block's first channel) and the new
    input (0 when masked), taps oldest first (``w_ptr``: the block's first channel's ``W`` taps).

    Vectors of D channels, one tap at a time: a ``[D, W]`` tile here would be the kernel's anchor layout and make
    the compiler shuffle the ``[D, D]`` state through shared memory to match it."""
    acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    for j in tl.static_range(W - 1):
        old = tl.load(tail_ptr + offs_d * stride_tc + j * stride_tw).to(DTYPE).to(tl.float32)
        acc += old * tl.load(w_ptr + offs_d * W + j).to(tl.float32)
    x = (tl.load(x_ptr + offs_d).to(tl.float32) * keep).to(DTYPE).to(tl.float32)  # the reference multiplies too
    acc += x * tl.load(w_ptr + offs_d * W + (W - 1)).to(tl.float32)
    y = acc * tl.sigmoid(acc)
    return y.to(DTYPE).to(tl.float32)


@triton.jit
def _new_tail(x_ptr, keep, tail_ptr, stride_tc, stride_tw, offs_d, offs_w, W: tl.constexpr):
    """One block's new tail ``[D, WP]`` fp32 (columns past W-2 unused): the old tail shifted by one, the new input
    (0 when masked) last. Read on its own (the input loaded again as a ``[D, WP]`` broadcast), so that this tile's
    layout stays apart from the arithmetic's."""
    col = offs_w[None, :]
    rows = tail_ptr + offs_d[:, None] * stride_tc
    shifted = tl.load(rows + (col + 1) * stride_tw, mask=col + 1 < W - 1, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs_d[:, None] + col * 0).to(tl.float32) * keep
    return tl.where(col == W - 2, x, shifted)


@triton.jit
def _store_tail(tail_out, vals, stride_oc, stride_ow, offs_d, offs_w, W: tl.constexpr, DTYPE: tl.constexpr):
    """Write one block's new tail (``[D, WP]``, the first W-1 columns) in the model dtype."""
    ptrs = tail_out + offs_d[:, None] * stride_oc + offs_w[None, :] * stride_ow
    tl.store(ptrs, vals.to(DTYPE).to(tail_out.dtype.element_ty), mask=offs_w[None, :] < W - 1)


@triton.jit
def _kda_decode_kernel(
    q_ptr, k_ptr, v_ptr, f_ptr, b_ptr, gate_ptr,
    stride_qb, stride_kb, stride_vb, stride_fb, stride_bb, stride_gb,
    wq_ptr, wk_ptr, wv_ptr, a_log_ptr, dt_bias_ptr, norm_w_ptr,
    tail_ptr, stride_tb, stride_tc, stride_tw,
    tail_out_ptr, stride_ob, stride_oc, stride_ow,
    state_ptr, stride_sb, stride_sh, stride_sk, stride_sv,
    state_out_ptr, stride_zb, stride_zh, stride_zk, stride_zv,
    mask_ptr, stride_mb, out_ptr, stride_outb, o_ws_ptr, cnt_ptr,
    H, scale, eps,
    D: tl.constexpr, W: tl.constexpr, WP: tl.constexpr, HAS_MASK: tl.constexpr, PER_HEAD_GATE: tl.constexpr,
    SPLIT_V: tl.constexpr, PDL: tl.constexpr,
):
    """Program ``(b * H + h, part)``: sequence b, head h, value columns ``[part * D / SPLIT_V, (part + 1) * D /
    SPLIT_V)`` of the state (all of them when SPLIT_V is 1). SPLIT_V > 1: the head's gated norm needs all D outputs,
    so each program stores its outputs (fp32, already rounded to the model dtype) in ``o_ws [B * H, D]`` and counts
    itself in at ``cnt[b * H + h]`` (acquire-release); the last of the head's programs to arrive reads them back,
    writes the head's normed output and its q / k conv tails (every program of the head has read those by then),
    and resets the counter."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    P = H * D
    BV: tl.constexpr = D // SPLIT_V
    DTYPE = out_ptr.dtype.element_ty
    offs_d = tl.arange(0, D)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)  # this program's value columns
    offs_w = tl.arange(0, WP)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * stride_mb).to(tl.float32)  # 1.0 real token, 0.0 padding
    else:
        keep = 1.0

    # ---- every read first (the tail and the state may be overwritten below)
    s_ptrs = (state_ptr + b * stride_sb + h * stride_sh
              + offs_d[:, None] * stride_sk + offs_v[None, :] * stride_sv)
    state = tl.load(s_ptrs)  # [D (key), BV (value)] fp32
    tail = tail_ptr + b * stride_tb
    q_x, k_x = q_ptr + b * stride_qb + h * D, k_ptr + b * stride_kb + h * D
    v_x = v_ptr + b * stride_vb + h * D + tl.program_id(1) * BV  # the value channels of this program's columns
    q_tail = tail + h * D * stride_tc  # the head's first q channel; k and v channels follow P and 2P later
    k_tail = tail + (P + h * D) * stride_tc
    v_tail = tail + (2 * P + h * D + tl.program_id(1) * BV) * stride_tc
    # short convolution (SiLU, rounded to the model dtype); each conv weight is [P, W]
    q = _conv(q_x, keep, wq_ptr + h * D * W, q_tail, stride_tc, stride_tw, offs_d, W, DTYPE)
    k = _conv(k_x, keep, wk_ptr + h * D * W, k_tail, stride_tc, stride_tw, offs_d, W, DTYPE)
    v = _conv(v_x, keep, wv_ptr + (h * D + tl.program_id(1) * BV) * W, v_tail, stride_tc, stride_tw,
              tl.arange(0, BV), W, DTYPE)
    v_tail_new = _new_tail(v_x, keep, v_tail, stride_tc, stride_tw, tl.arange(0, BV), offs_w, W)
    if PER_HEAD_GATE:
        f = tl.load(f_ptr + b * stride_fb + h).to(tl.float32) + tl.load(dt_bias_ptr + h)
    else:
        f = tl.load(f_ptr + b * stride_fb + h * D + offs_d).to(tl.float32) + tl.load(dt_bias_ptr + h * D + offs_d)
    beta_logit = tl.load(b_ptr + b * stride_bb + h).to(tl.float32)
    a_log = tl.load(a_log_ptr + h)

    # ---- l2norm (eps 1e-6 inside the root, as fla's use_qk_l2norm_in_kernel and kda_torch.l2norm), query scale
    q = q * (tl.rsqrt(tl.sum(q * q, axis=0) + 1e-6) * scale)
    k = k * tl.rsqrt(tl.sum(k * k, axis=0) + 1e-6)
    # ---- gates: softplus as torch computes it (x itself above 20), in the overflow-free form max(x, 0) + log1p(e^-|x|)
    sp = tl.where(f > 20.0, f, tl.maximum(f, 0.0) + _log1p(tl.exp(-tl.abs(f))))
    g = sp * -tl.exp(a_log) * keep
    beta = tl.sigmoid(beta_logit) * keep
    decay = tl.exp(g)
    if PER_HEAD_GATE:
        decay = tl.zeros([D], dtype=tl.float32) + decay

    # ---- gated delta rule: decay, delta-rule write, read
    pred = tl.sum((k * decay)[:, None] * state, axis=0)  # [D (value)]
    delta = beta * (v - pred)
    state = state * decay[:, None] + k[:, None] * delta[None, :]
    o = tl.sum(q[:, None] * state, axis=0)
    o = o.to(DTYPE).to(tl.float32)  # the op's output is in the model dtype, the norm reads it from there

    # ---- every write last: this program's state columns and value tails
    tl.debug_barrier()
    z_ptrs = (state_out_ptr + b * stride_zb + h * stride_zh
              + offs_d[:, None] * stride_zk + offs_v[None, :] * stride_zv)
    tl.store(z_ptrs, state)
    tail_out = tail_out_ptr + b * stride_ob
    _store_tail(tail_out + (2 * P + h * D + tl.program_id(1) * BV) * stride_oc, v_tail_new, stride_oc, stride_ow,
                tl.arange(0, BV), offs_w, W, DTYPE)
    last = True
    if SPLIT_V > 1:  # hand the head's outputs to the last of its programs
        tl.store(o_ws_ptr + pid * D + offs_v, o)
        tl.debug_barrier()  # every thread's outputs stored before the arrival below releases them
        last = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_V - 1
    if last:
        o_head = o
        if SPLIT_V > 1:
            o_head = tl.load(o_ws_ptr + pid * D + offs_d, cache_modifier=".cg")  # past L1: other SMs wrote it
            tl.atomic_xchg(cnt_ptr + pid, 0)
        # ---- gated RMS norm of the head, and the q / k tails (read here: no other program writes them)
        q_tail_new = _new_tail(q_x, keep, q_tail, stride_tc, stride_tw, offs_d, offs_w, W)
        k_tail_new = _new_tail(k_x, keep, k_tail, stride_tc, stride_tw, offs_d, offs_w, W)
        gate = tl.load(gate_ptr + b * stride_gb + h * D + offs_d).to(tl.float32)
        norm_w = tl.load(norm_w_ptr + offs_d).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(o_head * o_head, axis=0) / D + eps)
        y = o_head * rstd * norm_w * tl.sigmoid(gate)
        _store_tail(tail_out + h * D * stride_oc, q_tail_new, stride_oc, stride_ow, offs_d, offs_w, W, DTYPE)
        _store_tail(tail_out + (P + h * D) * stride_oc, k_tail_new, stride_oc, stride_ow, offs_d, offs_w, W, DTYPE)
        tl.store(out_ptr + b * stride_outb + h * D + offs_d, y.to(DTYPE))


def _rows(x: torch.Tensor, name: str, bsz: int, width: int) -> torch.Tensor:
    """``x [B, 1, width]`` (or ``[B, width]``) with a unit last stride, as ``[B, width]``."""
    if x.shape[0] != bsz or x.shape[-1] != width or x.numel() != bsz * width:
        raise ValueError(f"{name} must be [B, 1, {width}] with B = {bsz}, got {tuple(x.shape)}")
    x = x.reshape(bsz, width)
    return x if x.stride(-1) == 1 else x.contiguous()


def kda_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    beta_logits: torch.Tensor,
    gate: torch.Tensor,
    conv_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    conv_tail: torch.Tensor,
    state: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    in_place: bool = False,
    num_warps: int = DEFAULT_NUM_WARPS,
    split_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One KDA decode step for every sequence, fused (see the module docstring for the math).

    Args:
        q, k, v: raw projections of the new token ``[B, 1, P]`` (model dtype).
        f: forget-gate logits ``[B, 1, P]`` (``[B, 1, H]`` for a per-head gate). beta_logits: ``[B, 1, H]``.
        gate: output-gate logits ``[B, 1, P]``.
        conv_weights: the q, k and v taps, ``[P, 1, W]`` (or ``[P, W]``) each.
        a_log: ``[H]`` values (any shape, e.g. ``[1, 1, H, 1]``), float32. dt_bias: ``[P]`` or ``[H]``, float32.
        norm_weight: ``[D]``, the output norm's weight. eps: its epsilon.
        conv_tail: ``[B, 3P, W-1]``, any strides. state: ``[B, H, D, D]`` float32, any strides.
        token_mask: optional ``[B, 1]`` (or ``[B]``) bool, False for a padded token.
        in_place: write the new tail and state into ``conv_tail`` and ``state``; otherwise into new contiguous
            tensors.
        num_warps: warps per program (see the module docstring).
        split_v: programs per head, each taking ``D / split_v`` value columns of the state (a power of two);
            default :func:`split_plan`.

    Returns:
        ``(o [B, 1, P] in the model dtype (o_proj's input), new conv tail, new state)``.
    """
    bsz, heads, dim, dim_v = state.shape
    width = conv_weights[0].shape[-1]
    proj = heads * dim
    if dim != dim_v or dim & (dim - 1) or state.dtype != torch.float32:
        raise ValueError(f"state must be [B, H, D, D] float32 with D a power of two, got {tuple(state.shape)} "
                         f"{state.dtype}")
    if width < 2 or tuple(conv_tail.shape) != (bsz, 3 * proj, width - 1):
        raise ValueError(f"conv_tail must be [B, 3P, W-1] = {(bsz, 3 * proj, width - 1)}, got "
                         f"{tuple(conv_tail.shape)}")
    per_head_gate = f.shape[-1] == heads and heads != proj
    q, k, v, gate = (_rows(x, n, bsz, proj) for x, n in ((q, "q"), (k, "k"), (v, "v"), (gate, "gate")))
    f = _rows(f, "f", bsz, heads if per_head_gate else proj)
    beta_logits = _rows(beta_logits, "beta_logits", bsz, heads)
    weights = []
    for w, name in zip(conv_weights, "qkv"):
        if w.numel() != proj * width:
            raise ValueError(f"{name} conv weight must be [P, 1, W] = [{proj}, 1, {width}], got {tuple(w.shape)}")
        weights.append(w.reshape(proj, width).contiguous())
    a_log = a_log.reshape(heads).float().contiguous()
    dt_bias = dt_bias.reshape(-1).float().contiguous()
    if dt_bias.numel() != f.shape[-1]:
        raise ValueError(f"dt_bias must have {f.shape[-1]} values, got {dt_bias.numel()}")
    norm_weight = norm_weight.reshape(dim).contiguous()
    if token_mask is not None:
        token_mask = token_mask.reshape(bsz)
    if in_place:
        tail_out, state_out = conv_tail, state
    else:
        # the reference's new tail is in the model dtype (it concatenates the old tail cast to it and the input)
        tail_out = torch.empty(conv_tail.shape, dtype=v.dtype, device=conv_tail.device)
        state_out = torch.empty(state.shape, dtype=state.dtype, device=state.device)
    out = torch.empty(bsz, 1, proj, dtype=v.dtype, device=v.device)
    mask_arg = token_mask if token_mask is not None else out  # unread without HAS_MASK
    split_v = split_plan(bsz * heads, dim, sm_count(v.device, INTERPRETER_SMS)) if split_v is None else split_v
    if split_v < 1 or split_v & (split_v - 1) or dim % split_v:
        raise ValueError(f"split_v must be a power of two dividing D = {dim}, got {split_v}")
    counters = arrival_counters(v.device, bsz * heads) if split_v > 1 else None
    if counters is None:  # unsplit, or a CUDA-graph capture that would have to allocate the counters
        split_v, counters = 1, out
    o_ws = torch.empty(bsz * heads, dim, dtype=torch.float32, device=v.device) if split_v > 1 else out
    _kda_decode_kernel[(bsz * heads, split_v)](
        q, k, v, f, beta_logits, gate,
        q.stride(0), k.stride(0), v.stride(0), f.stride(0), beta_logits.stride(0), gate.stride(0),
        weights[0], weights[1], weights[2], a_log, dt_bias, norm_weight,
        conv_tail, *conv_tail.stride(),
        tail_out, *tail_out.stride(),
        state, *state.stride(),
        state_out, *state_out.stride(),
        mask_arg, mask_arg.stride(0), out, out.stride(0), o_ws, counters,
        heads, dim ** -0.5, float(eps),
        D=dim, W=width, WP=triton.next_power_of_2(width), HAS_MASK=token_mask is not None,
        PER_HEAD_GATE=per_head_gate, SPLIT_V=split_v, num_warps=num_warps, **pdl.launch_options(v.device),
    )
    return out, tail_out, state_out
