"""Thin wrapper around flash-linear-attention's Triton KDA kernels (GPU only).

Nothing here imports ``fla`` at module import time: on a CPU-only machine with fla and triton installed,
touching fla's kernels fails ("0 active drivers"), so :func:`fla_kda_ops` is only called for CUDA tensors.
Supported fla versions: :data:`FLA_REQUIREMENT` (``fla-core >= 0.5.1, < 0.7``; the pre-gated KDA call itself exists
since 0.4.0). The short convolution and gated norm use fla 0.6's module layout (``fla.modules.causal_conv1d``);
where those do not import, they run on the PyTorch references instead.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

#: The distribution that ships fla's kernels (``fla.ops``, ``fla.modules``), as the ``gpu`` extra of setup.cfg names
#: it. ``flash-linear-attention`` (fla's layers and models) requires ``fla-core`` of its own version, so it provides
#: the same ``fla`` kernels too; it is not required because ``import fla`` then also imports its ~120 layers and
#: models (twice the import time, measured with 0.6.0) and registers their model types with transformers.
FLA_REQUIREMENT = "fla-core>=0.5.1,<0.7"
FLA_INSTALL_HINT = (f"pip install '{FLA_REQUIREMENT}' triton (or flash-linear-attention of the same versions, "
                    "which installs fla-core)")


@functools.lru_cache(maxsize=1)
def fla_kda_ops() -> tuple[Callable, Callable] | None:
    """Return ``(chunk_kda, fused_recurrent_kda)`` from fla, or ``None`` when fla/triton do not import."""
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception:  # ImportError, or triton failing to initialise
        return None
    _apply_tuned_configs()
    return chunk_kda, fused_recurrent_kda


@functools.lru_cache(maxsize=1)
def fla_module_ops() -> tuple[Callable, Callable] | None:
    """Return ``(causal_conv1d, rms_norm_gated)`` from fla's modules, or ``None`` when they do not import."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d
        from fla.modules.fused_norm_gate import rms_norm_gated
    except Exception:  # ImportError, or triton failing to initialise
        return None
    _apply_tuned_configs()
    return causal_conv1d, rms_norm_gated


def _apply_tuned_configs() -> None:
    """Give fla's freshly imported autotuners the configurations recorded on this GPU type (see
    :mod:`triton_tuning`): a fresh machine then compiles each kernel once instead of benchmarking every
    candidate."""
    try:
        from .triton_tuning import apply  # (this form: transformers copies triton_tuning.py into checkpoints)

        apply()
    except Exception as error:  # noqa: BLE001 - a damaged record file must not stop the model from running
        import warnings

        warnings.warn(f"ignoring recorded Triton tuning ({type(error).__name__}: {error}); kernels autotune as "
                      "usual", RuntimeWarning, stacklevel=3)


def short_conv_fla(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`short_conv_torch.short_conv_torch` through fla's ``causal_conv1d`` (SiLU fused in).

    Same layouts as the reference: ``x [B, T, C]``, ``weight [C, W]``, ``state [B, C, W-1]`` (oldest first).
    fla keeps ``W`` inputs per sequence; the oldest of them never reaches an output, so our ``W-1`` are padded
    with one zero column on the way in and the newest ``W-1`` are kept on the way out. With ``cu_seqlens``
    (packed documents, each from zeros) no state is returned.
    """
    ops = fla_module_ops()
    if ops is None:
        raise RuntimeError(f"fla's causal_conv1d does not import: {FLA_INSTALL_HINT}")
    causal_conv1d = ops[0]
    if token_mask is not None:
        x = x * token_mask.unsqueeze(-1).to(x.dtype)
    initial = None
    if state is not None:
        initial = torch.nn.functional.pad(state.to(x.dtype), (1, 0)).contiguous()
    packed = cu_seqlens is not None
    y, final = causal_conv1d(
        x.contiguous(), weight=weight.to(x.dtype).contiguous(), initial_state=initial,
        output_final_state=not packed, activation="silu", cu_seqlens=cu_seqlens,
    )
    return y, (None if packed else final[..., 1:])


def gated_rms_norm_fla(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`norms.gated_rms_normalize` through fla's fused kernel (the released code's ``FusedRMSNormGated``
    with ``activation="sigmoid"``): ``o, gate [..., D]``, ``weight [D]``; returns o's dtype."""
    ops = fla_module_ops()
    if ops is None:
        raise RuntimeError(f"fla's rms_norm_gated does not import: {FLA_INSTALL_HINT}")
    shape = o.shape
    rows, gates = o.reshape(-1, shape[-1]), gate.reshape(-1, shape[-1]).to(o.dtype)
    starts = range(0, max(rows.shape[0], 1), NORM_SLICE_ROWS)
    pieces = [ops[1](rows[s : s + NORM_SLICE_ROWS], gates[s : s + NORM_SLICE_ROWS], weight, None,
                     activation="sigmoid", eps=eps) for s in starts]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).view(shape)


# fla's fused gated norm compiles (and autotunes) its kernel once per NB = ceil(rows / 65536), a compile-time
# constant: at 32 heads a new NB every 2048 tokens, each costing ~3 s (H200, 2026-12-01), so every long prompt length
# past the warm-up stalled its first prefill (3.7 s at 40K tokens, 4 s at 132K). Rows go through in slices of at most
# 65536, so NB is always 1, which any warm-up prompt compiles; a 128K-token prompt makes 64 launches per layer.
NORM_SLICE_ROWS = 65536


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kda_fla(
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
    """KDA through fla: the recurrent kernel for short inputs without autograd (as the released code does for
    T <= 64), the chunked kernel otherwise. Same layouts as :func:`kda_torch.kda_chunk_torch`."""
    ops = fla_kda_ops()
    if ops is None:
        raise RuntimeError(f"kda_backend='fla' needs flash-linear-attention with triton: {FLA_INSTALL_HINT}")
    chunk_kda, fused_recurrent_kda = ops
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    training = needs_grad(q, k, v, g, beta, initial_state)
    if q.shape[1] <= 64 and not training:
        return fused_recurrent_kda(
            q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
        )
    if cu_seqlens is not None and not training:
        return _bucketed_varlen_chunk_kda(chunk_kda, q, k, v, g, beta, scale, initial_state, output_final_state,
                                          use_qk_l2norm, cu_seqlens)
    if training:
        return chunk_kda(
            q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale=scale,
            initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
        )
    return _bucketed_chunk_kda(chunk_kda, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm)


# Inference prefill runs fla's chunk kernel only at these lengths: Triton autotunes per input length, which stalls
# seconds at every new prompt length. Shorter inputs are right-padded to the next bucket with neutral tokens
# (g = 0: no decay, beta = 0: no write, k = 0), which leave the state untouched; longer inputs run in windows of the
# largest bucket, carrying the state. After :func:`warmup_lengths` have run once, no new length triggers tuning.
BUCKETS = (1024, 2048, 4096, 8192, 16384)


def warmup_lengths() -> tuple[int, ...]:
    """Prompt lengths that exercise every kernel shape the bucketed prefill uses (plus the recurrent kernel)."""
    return (1, 65) + BUCKETS[1:]


def _pad_time(parts: list[torch.Tensor], pad: int) -> list[torch.Tensor]:
    """Right-pad ``[B, T, ...]`` tensors with ``pad`` zero tokens: neutral for KDA (k = 0, g = 0, beta = 0)."""
    return [torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) for x in parts]


def _bucketed_chunk_kda(chunk_kda, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm):
    seqlen = q.shape[1]
    window = BUCKETS[-1]
    outs = []
    state = initial_state
    for start in range(0, seqlen, window):
        end = min(start + window, seqlen)
        size = end - start
        bucket = next(b for b in BUCKETS if b >= size)
        pad = bucket - size
        parts = [x[:, start:end] for x in (q, k, v, g, beta)]
        if pad:
            parts = _pad_time(parts, pad)
        last = end == seqlen
        o, state = chunk_kda(
            *(x.contiguous() for x in parts), scale=scale, initial_state=state,
            output_final_state=output_final_state or not last, use_qk_l2norm_in_kernel=use_qk_l2norm,
        )
        outs.append(o[:, :size])
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0], state


def _bucketed_varlen_chunk_kda(chunk_kda, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm,
                               cu_seqlens):
    """Packed sequences (``cu_seqlens``) without autograd: the packed stream is right-padded to the next bucket with
    neutral tokens appended to its last sequence (which they leave unchanged), so that no new total length tunes
    kernels. Streams longer than the largest bucket run as they are."""
    total = q.shape[1]
    bucket = next((b for b in BUCKETS if b >= total), total)
    parts = [q, k, v, g, beta]
    if bucket > total:
        pad = bucket - total
        parts = _pad_time(parts, pad)
        cu_seqlens = torch.cat([cu_seqlens[:-1], cu_seqlens.new_full((1,), bucket)])
    o, state = chunk_kda(
        *(x.contiguous() for x in parts), scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens,
    )
    return o[:, :total], state
