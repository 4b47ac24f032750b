"""Multi-head Latent Attention without positional encoding (the full-attention layers of Kimi Linear).

Per token the layer caches only the normalised latent ``c`` (``kv_lora_rank`` values) and the shared
"rope" key part (``qk_rope_head_dim`` values, never rotated). Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` with softmax scale ``(qk_nope + qk_rope) ** -0.5``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .norms import KimiRMSNorm
from .quantization import dequantize, is_plain

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache
    from .configuration_kimi_linear import KimiLinearConfig

ABSORB_MAX_QUERY = 16  # new tokens per call up to which attention runs in latent space (decode)
QUERY_BLOCK = 2048  # query rows per SDPA call for long prefills
KV_NORM_EPS = 1e-6  # the released code builds kv_a_layernorm with the class default, not rms_norm_eps


def _scores_fp32(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, M, D] @ k[B, S, D]^T`` with float32 output, without an fp32 copy of ``k`` on CUDA."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float().transpose(1, 2))


def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x [B, nh, T, a] @ w[nh, a, c] -> [B, nh, T, c]`` as one product batched over the heads, the weight read
    once. (``torch.matmul`` broadcasts the weight over the batch first and, for B > 1, copies it B times: 4 MB a
    sequence for each of the release's two absorbed weights, in every MLA layer of a batched decode step.) The
    result is a view with the heads outermost in memory."""
    bsz, heads, seqlen, width = x.shape
    y = torch.bmm(x.transpose(0, 1).reshape(heads, bsz * seqlen, width), w)  # a view of x for one new token
    return y.view(heads, bsz, seqlen, -1).transpose(0, 1)


class KimiMLAAttention(nn.Module):
    """MLA token mixer with released parameter names (``q_proj`` or ``q_a_proj``/``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``)."""

    def __init__(self, config: "KimiLinearConfig", layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.decode_kernels = getattr(config, "decode_kernels", "auto")
        self.q_dim = self.nope_dim + self.rope_dim
        self.scaling = self.q_dim**-0.5
        hidden = config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * self.q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = KimiRMSNorm(config.q_lora_rank, eps=KV_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * self.q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = KimiRMSNorm(self.kv_lora_rank, eps=KV_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)

    def queries_and_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` -> queries ``[B, nh, T, qk_nope + qk_rope]`` and what is cached per token,
        ``[B, T, kv_lora_rank + qk_rope]`` = normalised latent ‖ shared key part.

        The two projections from x of a CUDA decode step run as one launch (:func:`kernels.linears`; int8 weights
        read as int8): 12.0 us at batch 1 against 14.7 for the two cuBLAS calls on an H100 once the launch
        pipelined its loads (12.1 vs 12.4 at batch 8; ``bench/gpu_check.py --only mlinear``). The latent's
        RMSNorm and its concatenation with the shared key part are one Triton launch where
        :func:`kernels.rms_norm_head` allows (a copy, about seven norm kernels and a concatenation otherwise)."""
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        q, kv = kernels.linears(self.decode_kernels, [(x, first), (x, self.kv_a_proj_with_mqa)])
        if not hasattr(self, "q_proj"):
            q = self.q_b_proj(kernels.add_rms_norm(self.decode_kernels, q, None, self.q_a_layernorm)[0])
        latent = kernels.rms_norm_head(self.decode_kernels, kv, self.kv_lora_rank, self.kv_a_layernorm)
        return q.unflatten(-1, (self.num_heads, self.q_dim)).transpose(1, 2), latent

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``[B, S, L]`` -> per-head keys ``[B, nh, S, qk]`` and values ``[B, nh, S, v]``."""
        c, k_rope = latent.split([self.kv_lora_rank, self.rope_dim], -1)
        kv = self.kv_b_proj(c).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim)).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], -1)
        k_rope = k_rope.unsqueeze(1).expand(-1, self.num_heads, -1, -1)
        return torch.cat([k_nope, k_rope], -1), v

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj`` split per head: key part ``[nh, nope, r]`` and value part ``[nh, v, r]`` (views).

        Quantization keeps ``kv_b_proj`` in high precision by default (:mod:`quantization`); a quantized one
        (torchao int8 / float8) is dequantized here on each call (a few MB a layer, read once per step)."""
        w = self.kv_b_proj.weight
        if not is_plain(w):
            w = dequantize(w, w.dtype)
        w = w.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def attend_latent(self, q: torch.Tensor, latent: torch.Tensor, attn_mask: torch.Tensor | None,
                      row_limit: torch.Tensor | None = None) -> torch.Tensor:
        """Attention in latent space (decode): the key up-projection is folded into the query and the value
        up-projection into the output, so the cached ``latent [B, S, r + rope]`` is read once, shared by all heads
        (multi-query attention), and per-head keys/values of the context are never built.

        One new token (``T == 1``) on CUDA with ``decode_kernels`` resolving to ``"triton"`` runs the
        flash-decoding kernel (:func:`kernels.mla_decode`); everything else runs the PyTorch code below, the
        reference. ``row_limit`` (a static decode step's ``position + 1``, on the device) lets the kernel skip the
        bucket's rows past the new token instead of reading them to mask them; the PyTorch path masks them.

        ``q [B, nh, T, nope + rope]`` -> ``[B, nh, T, v]``.
        """
        w_k, w_v = self.absorbed_weights()
        bsz, heads, seqlen, _ = q.shape
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], -1)
        q_abs = _per_head(q_nope, w_k)  # [B, nh, T, r]
        if seqlen == 1 and kernels.triton_decode(self.decode_kernels, q):
            mask = attn_mask[:, 0, 0] if attn_mask is not None else None  # [B or 1, S]
            out = kernels.mla_decode(q_abs[:, :, 0], latent, mask, self.scaling, self.kv_lora_rank, row_limit,
                                     q_rope=q_rope[:, :, 0])  # the two query parts as they are: no concatenation
            return _per_head(out.unsqueeze(2), w_v.transpose(1, 2))  # [B, nh, 1, v]
        q_lat = torch.cat([q_abs, q_rope], -1)  # [B, nh, T, r + rope]
        # fold the heads into the query axis: nh*T queries against the one shared latent key/value sequence.
        # (SDPA has no fused kernel for 576-wide heads and its fallback is slow; one query row per head is two
        # batched products and a softmax, with scores in fp32.)
        q_lat = q_lat.reshape(bsz, heads * seqlen, -1)
        # Compiled for the CPU (compiled_decode), the two products are written as broadcast products and sums,
        # which inductor fuses into loops that read each latent row once; extern bmm calls read them twice.
        fused = torch.compiler.is_compiling() and not latent.is_cuda
        if fused:
            scores = (q_lat.float().unsqueeze(2) * latent.float().unsqueeze(1)).sum(-1)
        else:
            scores = _scores_fp32(q_lat, latent)
        scores = scores * self.scaling  # [B, nh*T, S]
        if attn_mask is not None:
            mask = attn_mask[:, 0]  # [B or 1, T, S]
            if seqlen > 1:
                mask = mask.unsqueeze(1).expand(-1, heads, -1, -1).flatten(1, 2)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        values = latent[..., : self.kv_lora_rank]
        if fused:
            out = (probs.unsqueeze(-1) * values.float().unsqueeze(1)).sum(2).to(latent.dtype)
        else:
            out = torch.bmm(probs.to(latent.dtype), values)  # [B, nh*T, r]
        return _per_head(out.view(bsz, heads, seqlen, -1), w_v.transpose(1, 2))  # [B, nh, T, v]

    def attend_expanded(self, q: torch.Tensor, latent: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with per-head keys/values expanded from the latent (prefill); long prompts go in query
        blocks of :data:`QUERY_BLOCK` so the score matrix stays bounded. ``q [B, nh, T, qk]`` -> ``[B, nh, T, v]``."""
        k, v = self.expand(latent)
        seqlen = q.shape[2]
        if attn_mask is None:  # plain causal attention: fused SDPA kernels never build the score matrix
            # PyTorch's CPU flash kernel wants one head size for q, k and v: zero-pad v there (the extra outputs
            # are zeros, dropped); CUDA's kernels take v as it is, and padding would only cost memory traffic
            pad = self.q_dim - self.v_dim if (q.device.type == "cpu" and self.q_dim > self.v_dim) else 0
            v_pad = F.pad(v, (0, pad)) if pad else v
            out = F.scaled_dot_product_attention(q, k, v_pad, is_causal=seqlen > 1, scale=self.scaling)
            return out[..., : self.v_dim]
        if seqlen <= QUERY_BLOCK:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scaling)
        # an explicit mask (padding, packing, or a cache) rules out the fused kernels: bound the score matrix
        outs = []
        for start in range(0, seqlen, QUERY_BLOCK):
            block = attn_mask[..., start : start + QUERY_BLOCK, :]
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, start : start + QUERY_BLOCK], k, v, attn_mask=block, scale=self.scaling
                )
            )
        return torch.cat(outs, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        cache: "KimiLinearCache | None" = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``.

        ``attn_mask``: ``None`` for plain causal attention over this call's tokens, else a bool
        ``[B or 1, 1, T, S]`` mask (True = attend) over all ``S`` cached + new tokens.
        """
        seqlen = hidden_states.shape[1]
        q, latent = self.queries_and_latent(hidden_states)
        past, row_limit = 0, None
        if cache is not None:
            # a static decode step always has a past; not reading the token counter keeps it out of compiled guards
            past = 1 if cache.graph_step is not None else cache.get_seq_length()
            latent = cache.append_latent(self.layer_idx, latent)
            if cache.graph_step is not None:
                row_limit = cache.graph_step.position + 1
        # The absorbed path reads kv_b_proj's weight directly; a wrapped projection (a PEFT LoRA adapter, a
        # quantised layer) must run as a module, so it takes the expanded path.
        # Offloaded weights (accelerate's hook on the module) likewise arrive only through a module call.
        if past and seqlen <= ABSORB_MAX_QUERY and type(self.kv_b_proj) is nn.Linear \
                and not kernels.offloaded(self.kv_b_proj):
            out = self.attend_latent(q, latent, attn_mask, row_limit)
        else:
            out = self.attend_expanded(q, latent, attn_mask)
        return kernels.linears(self.decode_kernels, [(out.transpose(1, 2).flatten(2), self.o_proj)], kinds=("int8",))[0]
