"""Kimi Delta Attention (KDA) layer: projections, short causal convolutions, gates and the output norm.

Parameter names and shapes are the released checkpoint's (``q_proj``, ``q_conv1d`` ``[P, 1, W]``, ``A_log``
``[1, 1, H, 1]``, ``dt_bias`` ``[P]``, ...), so no renaming is needed for this layer. ``A_log`` and
``dt_bias`` stay float32 whatever dtype the model is cast to.

With ``config.kda_gate_granularity == "head"`` (an ablation: Gated DeltaNet's scalar per-head forget gate) the
gate path shrinks to ``f_b_proj`` ``[H, K]`` (rank ``K`` projection ``D -> K -> H``) and ``dt_bias`` ``[H]``; the
per-head log decay is broadcast over the key channels, so the same KDA kernels compute the gated delta rule.
Everything else is unchanged.

A decode step of CUDA tensors (one token, a cached state, no autograd) runs everything between the projections and
``o_proj`` as one Triton kernel (:mod:`kda_decode_triton`) when ``config.decode_kernels`` resolves to ``"triton"``
and ``kda_backend`` not to ``"torch"``; the path below is its reference and serves every other call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import (
    fused_kda_decode, kda, kda_decode_step, kda_padded, linears, needs_grad, offloaded, short_conv,
)
from .norms import KimiGatedRMSNorm

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache
    from .configuration_kimi_linear import KimiLinearConfig

FP32_PARAMS = ("A_log", "dt_bias")


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
        self.decode_kernels = getattr(config, "decode_kernels", "auto")
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
        """The q, k and v taps fused into one ``[3P, W]`` tensor (the convolutions run as one). Each holder is
        called as a module, so hooks that bring offloaded weights in (accelerate's) run first."""
        return torch.cat([self.q_conv1d(), self.k_conv1d(), self.v_conv1d()], 0).squeeze(1)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, T, D]`` -> raw ``qkv [B, T, 3P]``, gate logits ``f_b(f_a(x)) [B, T, P or H]``, beta logits
        ``b_proj(x) [B, T, H]`` and output-gate logits ``g_b(g_a(x)) [B, T, P]`` (each module called, so wrappers
        such as PEFT LoRA adapters take part)."""
        q, k, v, f, b, gate = self.split_projections(x)
        return torch.cat([q, k, v], -1), f, b, gate

    def split_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`projections` with the raw q, k and v ``[B, T, P]`` kept apart: ``(q, k, v, f, b, gate)``.

        A decode step of plain ``nn.Linear`` projections on CUDA runs them as two Triton launches instead of eight
        (:func:`kernels.linears`); anything else calls the modules."""
        q, k, v, f_a, b, g_a = linears(self.decode_kernels, [(x, self.q_proj), (x, self.k_proj), (x, self.v_proj),
                                                             (x, self.f_a_proj), (x, self.b_proj), (x, self.g_a_proj)])
        f, gate = linears(self.decode_kernels, [(f_a, self.f_b_proj), (g_a, self.g_b_proj)])
        return q, k, v, f, b, gate

    def log_decay(self, f: torch.Tensor) -> torch.Tensor:
        """``g = -exp(A_log) * softplus(f + dt_bias)`` in fp32 from the gate logits ``f [B, T, P or H]``, shape
        ``[B, T, H, K]``.

        With a per-head gate, ``f`` has one value per head and the result is that ``[B, T, H, 1]`` log decay
        expanded (a view) over the ``K`` key channels.
        """
        f = F.softplus(f.float() + self.dt_bias)
        f = f.unflatten(-1, (self.num_heads, 1 if self.per_head_gate else self.head_dim))
        g = f * -self.A_log.exp().squeeze(0)
        return g.expand(*g.shape[:-1], self.head_dim)

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The fp32 log decay ``[B, T, H, K]`` of ``x [B, T, D]`` (see :meth:`log_decay`)."""
        return self.log_decay(self.f_b_proj(self.f_a_proj(x)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        cache: "KimiLinearCache | None" = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``.

        ``token_mask`` (``[B, T]`` bool, False at padding) makes padded tokens change no state at all: their
        q/k/v inputs are zeroed, and the recurrence skips them (see :func:`kernels.kda_padded`). ``cu_seqlens``
        (B == 1) marks packed documents, which start from a zero state each.
        """
        bsz, seqlen, _ = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        conv_state = recurrent_state = None
        if cache is not None:
            conv_state, recurrent_state = cache.kda_state(self.layer_idx)
            if seqlen == 1 and cu_seqlens is None and self._decodes_fused(hidden_states, conv_state, recurrent_state):
                return self._fused_decode_step(hidden_states, token_mask, cache, conv_state, recurrent_state)
        qkv, f, b, gate = self.projections(hidden_states)
        qkv, conv_state_out = short_conv(qkv, self.conv_weight(), conv_state, backend=self.backend,
                                         token_mask=token_mask, cu_seqlens=cu_seqlens)
        q, k, v = qkv.unflatten(-1, (3, heads, dim)).unbind(2)
        g = self.log_decay(f)
        beta = torch.sigmoid(b.float())
        if token_mask is not None:  # padded batch: unpadded into cu_seqlens for fla, zero gates otherwise
            o, new_state = kda_padded(q, k, v, g, beta, token_mask, backend=self.backend,
                                      initial_state=recurrent_state, output_final_state=cache is not None)
        else:
            o, new_state = kda(q, k, v, g, beta, backend=self.backend, initial_state=recurrent_state,
                               output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.update_kda_state(self.layer_idx, conv_state_out, new_state)
        o = self.o_norm(o, gate.unflatten(-1, (heads, dim)), backend=self.backend).flatten(-2)
        return linears(self.decode_kernels, [(o, self.o_proj)], kinds=("int8",))[0]

    def _decodes_fused(self, x: torch.Tensor, conv_state: torch.Tensor | None, state: torch.Tensor | None) -> bool:
        """Whether this decode step (one token, a cached state) runs as one fused Triton kernel: ``decode_kernels``
        resolves to ``"triton"`` and ``kda_backend`` not to ``"torch"`` (:func:`kernels.fused_kda_decode`), nothing
        needs gradients, the shapes are the kernel's (float32 state, power-of-two head_dim), and no submodule's
        weights are offloaded (accelerate's hook on the conv holders or the norm, :func:`kernels.offloaded`), which
        the kernel would bypass."""
        return (
            conv_state is not None and state is not None and state.dtype == torch.float32
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and self.head_dim & (self.head_dim - 1) == 0
            and fused_kda_decode(self.decode_kernels, self.backend, x.device)
            and not needs_grad(x, state, *self.parameters())
            and not any(offloaded(m) for m in (self.q_conv1d, self.k_conv1d, self.v_conv1d, self.o_norm))
        )

    def _fused_decode_step(self, x: torch.Tensor, token_mask: torch.Tensor | None, cache: "KimiLinearCache",
                           conv_state: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The decode step with everything between the projections and ``o_proj`` in one kernel
        (:func:`kernels.kda_decode_step`); the projections stay module calls (adapters take part). In a static
        CUDA-graph step the cached tail and state are updated in place; otherwise new ones are stored."""
        q, k, v, f, b, gate = self.split_projections(x)
        conv_weights = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        o, conv_out, state_out = kda_decode_step(
            q, k, v, f, b, gate, conv_weights, self.A_log, self.dt_bias, self.o_norm.weight,
            self.o_norm.variance_epsilon, conv_state, state, token_mask, in_place=cache.graph_step is not None,
        )
        cache.update_kda_state(self.layer_idx, conv_out, state_out)  # in place: a copy onto itself, a no-op
        return linears(self.decode_kernels, [(o, self.o_proj)], kinds=("int8",))[0]


class _DepthwiseConvWeight(nn.Module):
    """Holds a released ``*_conv1d.weight`` ``[C, 1, W]`` (a bias-free depthwise ``nn.Conv1d``)."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, 1, width))

    def forward(self) -> torch.Tensor:
        """The taps ``[C, 1, W]`` (a module call, so that hooks which bring offloaded weights in run first)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, kernel_size={self.weight.shape[-1]}"
