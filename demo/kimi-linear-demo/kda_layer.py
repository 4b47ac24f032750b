"""Kimi Delta Attention (KDA) layer: projections, short causal convolutions, gates and the output norm.

Parameter names and shapes are the released checkpoint's (``q_proj``, ``q_conv1d`` ``[P, 1, W]``, ``A_log``
``[1, 1, H, 1]``, ``dt_bias`` ``[P]``, ...), so no renaming is needed for this layer. ``A_log`` and
``dt_bias`` stay float32 whatever dtype the model is cast to.

With ``config.kda_gate_granularity == "head"`` (an ablation: Gated DeltaNet's scalar per-head forget gate) the
gate path shrinks to ``f_b_proj`` ``[H, K]`` (rank ``K`` projection ``D -> K -> H``) and ``dt_bias`` ``[H]``; the
per-head log decay is broadcast over the key channels, so the same KDA kernels compute the gated delta rule.
Everything else is unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import kda
from .norms import KimiGatedRMSNorm

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache
    from .configuration_kimi_linear import KimiLinearConfig

FP32_PARAMS = ("A_log", "dt_bias")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution + SiLU over time, continuing from ``state``.

    Args:
        x: ``[B, T, C]`` raw (pre-convolution) inputs.
        weight: ``[C, W]`` taps, oldest first.
        state: ``[B, C, W-1]`` the previous ``W-1`` raw inputs (oldest first), or ``None`` for zeros.
        token_mask: optional ``[B, T]`` bool, False where ``x`` is padding; padded inputs count as zeros.

    Returns ``(silu(conv(x)) in x.dtype, new_state [B, C, W-1] in x.dtype)``; computed in fp32.
    """
    bsz, seqlen, channels = x.shape
    width = weight.shape[-1]
    if token_mask is not None:
        x = x * token_mask.unsqueeze(-1).to(x.dtype)
    if state is None:
        state = x.new_zeros(bsz, channels, width - 1)
    if seqlen == 1:  # decode: one dot product per channel over the window
        window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, C, W]
        out = (window.float() * weight.float()).sum(-1)
        return F.silu(out).unsqueeze(1).to(x.dtype), window[:, :, 1:]
    full = torch.cat([state.transpose(1, 2).to(x.dtype), x], dim=1)  # [B, W-1+T, C]
    w = weight.float()
    out = full[:, width - 1 :].float() * w[:, width - 1]
    for i in range(width - 1):
        out = out + full[:, i : i + seqlen].float() * w[:, i]
    new_state = full[:, seqlen:].transpose(1, 2).contiguous()
    return F.silu(out).to(x.dtype), new_state


class KimiDeltaAttention(nn.Module):
    """One KDA token mixer (a gated delta rule with per-channel forget gate, see :mod:`kda_torch`; per-head gate
    with ``kda_gate_granularity="head"``)."""

    def __init__(self, config: "KimiLinearConfig", layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = hidden = config.hidden_size
        self.num_heads = heads = config.kda_num_heads
        self.head_dim = dim = config.kda_head_dim
        self.conv_size = width = config.kda_conv_size
        self.backend = config.kda_backend
        self.per_head_gate = getattr(config, "kda_gate_granularity", "channel") == "head"
        proj = heads * dim
        gate_width = heads if self.per_head_gate else proj  # forget-gate values per token
        self.q_proj = nn.Linear(hidden, proj, bias=False)
        self.k_proj = nn.Linear(hidden, proj, bias=False)
        self.v_proj = nn.Linear(hidden, proj, bias=False)
        self.q_conv1d = _DepthwiseConvWeight(proj, width)
        self.k_conv1d = _DepthwiseConvWeight(proj, width)
        self.v_conv1d = _DepthwiseConvWeight(proj, width)
        self.A_log = nn.Parameter(torch.zeros(1, 1, heads, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.zeros(gate_width, dtype=torch.float32))
        self.f_a_proj = nn.Linear(hidden, dim, bias=False)
        self.f_b_proj = nn.Linear(dim, gate_width, bias=False)
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, dim, bias=False)
        self.g_b_proj = nn.Linear(dim, proj, bias=False)
        self.o_norm = KimiGatedRMSNorm(dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(proj, hidden, bias=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch signature
        """Keep ``A_log`` / ``dt_bias`` in float32 through ``.to(dtype)``, ``.half()``, ``.bfloat16()``."""
        kept = {name: getattr(self, name).data for name in FP32_PARAMS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            param = getattr(self, name)
            if param.dtype != torch.float32 and old.dtype == torch.float32 and old.device.type != "meta":
                param.data = old.to(param.device)
        return self

    def conv_weight(self) -> torch.Tensor:
        """The q, k and v taps fused into one ``[3P, W]`` tensor (the convolutions run as one)."""
        return torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight], 0).squeeze(1)

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)`` in fp32, shape ``[B, T, H, K]``.

        With a per-head gate, ``f_b(f_a(x))`` has one value per head and the result is that ``[B, T, H, 1]`` log
        decay expanded (a view) over the ``K`` key channels.
        """
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias
        f = f.unflatten(-1, (self.num_heads, 1 if self.per_head_gate else self.head_dim))
        g = -self.A_log.float().exp() * F.softplus(f)
        return g.expand(*g.shape[:-1], self.head_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: "KimiLinearCache | None" = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``.

        ``token_mask`` (``[B, T]`` bool, False at padding) makes padded tokens change no state at all: their
        q/k/v inputs are zeroed, their decay is 1 and their write strength 0. ``cu_seqlens`` (B == 1) marks packed
        documents, which start from a zero state each.
        """
        bsz, seqlen, _ = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state, recurrent_state = cache.kda_state(self.layer_idx)
        qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
        if cu_seqlens is not None:
            qkv, conv_state_out = _packed_short_conv(qkv, self.conv_weight(), cu_seqlens)
        else:
            qkv, conv_state_out = short_conv(qkv, self.conv_weight(), conv_state, token_mask)
        q, k, v = qkv.unflatten(-1, (3, heads, dim)).unbind(2)
        g = self.forget_gate(hidden_states)
        beta = torch.sigmoid(self.b_proj(hidden_states).float())
        if token_mask is not None:
            keep = token_mask.unsqueeze(-1)
            g = g * keep.unsqueeze(-1)
            beta = beta * keep
        o, new_state = kda(
            q,
            k,
            v,
            g,
            beta,
            backend=self.backend,
            initial_state=recurrent_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        if cache is not None:
            cache.update_kda_state(self.layer_idx, conv_state_out, new_state)
        gate = self.g_b_proj(self.g_a_proj(hidden_states)).unflatten(-1, (heads, dim))
        o = self.o_norm(o, gate).flatten(-2)
        return self.o_proj(o)


class _DepthwiseConvWeight(nn.Module):
    """Holds a released ``*_conv1d.weight`` ``[C, 1, W]`` (a bias-free depthwise ``nn.Conv1d``)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}"


def _packed_short_conv(
    x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`short_conv` over documents packed along T (``x [1, T, C]``); each starts from zeros."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, state = short_conv(x[:, start:end], weight, None)
        outs.append(out)
        states.append(state)
    return torch.cat(outs, 1), torch.cat(states, 0)
