"""Routed experts whose fused 3-D weights are quantized tensors (torchao's int8 / float8 weight-only formats).

A quantizer such as ``TorchAoConfig(Int8WeightOnlyConfig())`` (see :mod:`quantization`) replaces
``experts.gate_up_proj [E, 2I, D]`` and ``experts.down_proj [E, D, I]`` by tensor subclasses that store one byte
a weight plus one scale per output row of each expert (``int8 [E, 2I, D]`` + ``fp32 [E, 2I, 1]``). Those
tensors support indexing along the expert axis and ``F.linear``, but not the transposes and grouped matmul of
:meth:`moe.KimiExperts.forward`, so a layer with such weights runs here instead (the one hook in ``moe.py``).

The math is the one of :meth:`moe.KimiExperts.forward`: ``sum_j w_j * down_e(act(gate_e(x)) * up_e(x))`` over
the chosen experts ``e = ids[:, j]``, accumulated in fp32. Only the chosen experts are ever dequantized:

* few token copies (decode; at most one per expert), while compiling or during CUDA-graph capture: the chosen
  experts' int8 rows and scales are gathered and dequantized to the activation dtype (``(q - z) * s``, one
  weight copy per (token, expert) pair, static shapes, no host read), then one batched product per projection
  (in blocks of :data:`GATHER_BLOCK` pairs);
* more copies (prefill, training): copies are sorted by expert and each expert that received tokens runs once
  on its slice through the quantized tensor's own ``F.linear`` (the library's int8 / float8 weight-only matmul).

Both are plain PyTorch and run on any device; they are the reference for the Triton path: a CUDA decode step with
int8 experts runs :func:`moe_decode_triton.experts` on the int8 data and its scales (one byte read a weight;
:func:`kernels.moe_decode_kernels` decides as for plain weights).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .kernels import moe_decode_kernels
from .quantization import dequantize, int8_rows, row_scaled

if TYPE_CHECKING:
    from .moe import KimiExperts
    from .moe_decode_triton import SharedExpert

GATHER_BLOCK = 32  # (token, expert) pairs dequantized at once by the static-shape path


def gather_dequantized(weight: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight[index]`` dequantized to ``dtype`` for a quantized 3-D expert weight ``[E, N, K]``: ``[len, N, K]``.

    Per-row layouts (``qdata [E, N, K]``, ``scale [E, N, 1]``, an optional zero point shaped like the scale:
    torchao's int8 and float8 weight-only tensors) gather the one-byte data and the scales and compute
    ``(q - zero) * scale`` (no host read, so it can be captured in a CUDA graph); any other layout goes through
    the tensor's own indexing and ``dequantize()``."""
    layout = row_scaled(weight)
    if layout is not None and layout[0].dim() == 3:
        qdata, scale, zero = layout
        q = qdata[index].to(dtype)  # int8 / float8 values (and int8 differences) are exact in bf16, fp16, fp32
        if zero is not None:
            q = q - zero[index].to(dtype)
        return q * scale[index].to(dtype)
    return dequantize(weight[index], dtype)


def _gathered(experts: "KimiExperts", x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Static-shape path: every (token, expert) pair as one batched product on the gathered, dequantized weights,
    :data:`GATHER_BLOCK` pairs at a time (bounds the dequantized copy: 32 pairs of the 48B's experts are 450 MB
    in bf16)."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    xs = x.repeat_interleave(top_k, 0).unsqueeze(1)  # [N*k, 1, D]
    blocks = []
    for start in range(0, flat.numel(), GATHER_BLOCK):
        part = flat[start : start + GATHER_BLOCK]
        gate_up = gather_dequantized(experts.gate_up_proj, part, x.dtype)  # [n, 2I, D]
        gate, up = torch.bmm(xs[start : start + GATHER_BLOCK], gate_up.transpose(1, 2)).chunk(2, dim=-1)
        down = gather_dequantized(experts.down_proj, part, x.dtype)  # [n, D, I]
        blocks.append(torch.bmm(experts.act_fn(gate) * up, down.transpose(1, 2)).squeeze(1))  # [n, D]
    ys = (blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)).float() * weights.reshape(-1, 1)
    return ys.view(num_tokens, top_k, -1).sum(1).to(x.dtype)


def _per_expert(experts: "KimiExperts", x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Copies sorted by expert; each expert with tokens runs once through the quantized tensor's ``F.linear``."""
    num_tokens, top_k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    token_of = order // top_k
    counts = torch.bincount(flat, minlength=experts.gate_up_proj.shape[0]).tolist()
    xs = x[token_of]
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            gate, up = F.linear(xs[start : start + n], experts.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append(F.linear(experts.act_fn(gate) * up, experts.down_proj[e]))
            start += n
    ys = torch.cat(outs, 0).float() * weights.flatten()[order].unsqueeze(-1)
    out = torch.zeros(num_tokens, x.shape[-1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_of, ys).to(x.dtype)


def forward(experts: "KimiExperts", x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:meth:`moe.KimiExperts.forward` for quantized expert weights: ``x [N, D]``, ``ids`` / ``weights [N, k]``
    -> ``[N, D]`` in ``x.dtype`` (under CUDA autocast, in the autocast dtype's products as the plain path)."""
    if x.device.type != "cpu" and torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    out = int8_kernels(experts, x, ids, weights)
    if out is not None:
        return out
    static = torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())
    if static or ids.numel() <= experts.gate_up_proj.shape[0]:
        return _gathered(experts, x, ids, weights)
    return _per_expert(experts, x, ids, weights)


def int8_kernels(experts: "KimiExperts", x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 shared: "SharedExpert | None" = None) -> torch.Tensor | None:
    """A CUDA decode step with per-row int8 experts on this package's Triton MoE kernels (they read the int8 data
    and apply the scales to the fp32 sums: one byte a weight, nothing dequantized in memory), else None. With
    ``shared`` (int8 rows with zero points exactly where the experts have them, else None is returned) the
    shared expert is computed in the same launches and added (:meth:`moe.KimiExperts.with_shared`)."""
    gate_up, down = int8_rows(experts.gate_up_proj), int8_rows(experts.down_proj)
    if gate_up is None or down is None:
        return None
    if (gate_up[2] is None) != (down[2] is None):
        return None
    if shared is not None and (shared.zeros is None) != (gate_up[2] is None):
        return None
    copies = ids.numel() + (0 if shared is None else x.shape[0])
    ops = moe_decode_kernels(experts.decode_kernels, x, copies)
    if ops is None or not ops.experts_supported(x, gate_up[0], down[0], experts.hidden_act):
        return None
    return ops.experts(x, ids, weights, gate_up[0], down[0], experts.hidden_act, gate_up_scale=gate_up[1],
                       down_scale=down[1], gate_up_zero=gate_up[2], down_zero=down[2], shared=shared)
