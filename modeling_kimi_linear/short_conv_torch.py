"""KDA's short causal convolution in pure PyTorch (the reference; fla's Triton kernel is used for GPU prompts,
see :func:`kernels.short_conv`).

The cached state of a sequence is its last ``W - 1`` raw inputs ``[B, C, W-1]``, oldest first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 (no call at all when it already is: a decode step is dispatch-bound)."""
    return x if x.dtype == torch.float32 else x.float()


def short_conv_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
    pos_in_doc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal convolution + SiLU over time, continuing from ``state``.

    Args:
        x: ``[B, T, C]`` raw (pre-convolution) inputs.
        weight: ``[C, W]`` taps, oldest first.
        state: ``[B, C, W-1]`` the previous ``W-1`` raw inputs (oldest first), or ``None`` for zeros.
        token_mask: optional ``[B, T]`` bool, False where ``x`` is padding; padded inputs count as zeros.
        pos_in_doc: optional ``[T]`` position of each token inside its packed document (``B == 1``, no
            ``state``): a tap never reaches back across a document start, so each document starts from zeros.

    Returns ``(silu(conv(x)) in x.dtype, new_state [B, C, W-1] in x.dtype)``; computed in fp32. With
    ``pos_in_doc`` the state is ``None`` (packed documents are never continued).
    """
    bsz, seqlen, channels = x.shape
    width = weight.shape[-1]
    if token_mask is not None:
        x = x * token_mask.unsqueeze(-1).to(x.dtype)
    if state is None:
        state = x.new_zeros(bsz, channels, width - 1)
    w = _f32(weight)
    if seqlen == 1:  # decode: one dot product per channel over the window
        window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, W]
        out = (_f32(window) * w).sum(-1)
        return F.silu(out).unsqueeze(1).to(x.dtype), window[:, :, 1:]
    full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    wt = w.t()  # [W, C]: one contiguous row of taps per lag
    out = _f32(full[:, width - 1 :]) * wt[width - 1]
    for i in range(width - 1):
        tap = _f32(full[:, i : i + seqlen]) * wt[i]
        if pos_in_doc is not None:  # lag width-1-i must stay inside the token's document
            tap = tap * (pos_in_doc >= width - 1 - i).unsqueeze(-1)
        out = out + tap
    new_state = None if pos_in_doc is not None else full[:, seqlen:].transpose(1, 2).contiguous()
    return F.silu(out).to(x.dtype), new_state


def positions_in_documents(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """``[T]`` index of each token inside its document, for documents packed along T at ``cu_seqlens``
    (computed on the device, no host synchronisation)."""
    idx = torch.arange(seqlen, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:], idx, right=True)
    return idx - cu_seqlens[doc]
