"""The one dispatch seam between the pure-PyTorch kernels and the Triton ones: fla's (KDA itself, KDA's short
convolution for prompts, its gated output norm) and this package's own decode kernels (``*_triton.py``: MLA
flash-decoding, the MoE's router and experts, the fused KDA step, several linear maps in one launch, the
residual add with RMSNorm).

fla's kernels follow ``config.kda_backend``:

* ``"torch"``: always the PyTorch reference (:mod:`kda_torch`), any device;
* ``"fla"``: always fla (CUDA tensors only; a clear error otherwise);
* ``"auto"``: fla for CUDA tensors when it imports, PyTorch otherwise. CPU tensors never touch fla.

This package's decode kernels follow ``config.decode_kernels`` the same way (:func:`resolve_decode_kernels`:
``"torch"``, ``"triton"`` or ``"auto"``); each has a PyTorch reference that stays the CPU path.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .kda_fla import (
    FLA_INSTALL_HINT, fla_kda_ops, fla_module_ops, gated_rms_norm_fla, kda_fla, needs_grad, short_conv_fla,
)
from .kda_torch import kda_chunk_torch, kda_recurrent_torch
from .norms import KimiRMSNorm, gated_rms_normalize
from .quantization import int8_rows
from .short_conv_torch import positions_in_documents, short_conv_torch

_warned_missing_fla = False


def resolve_kda_backend(backend: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"fla"`` for tensors on ``device``."""
    global _warned_missing_fla
    if backend == "torch":
        return "torch"
    if backend == "fla":
        if device.type != "cuda":
            raise RuntimeError(f"kda_backend='fla' needs CUDA tensors, got tensors on {device}")
        if fla_kda_ops() is None:
            raise RuntimeError(f"kda_backend='fla' but flash-linear-attention does not import: {FLA_INSTALL_HINT}")
        return "fla"
    if backend != "auto":
        raise ValueError(f"kda_backend={backend!r} must be one of 'auto', 'torch', 'fla'")
    if device.type != "cuda":
        return "torch"
    if fla_kda_ops() is None:
        if not _warned_missing_fla:
            warnings.warn(
                f"flash-linear-attention is not installed: KDA runs on slow PyTorch kernels on the GPU. "
                f"Install it with: {FLA_INSTALL_HINT}",
                stacklevel=3,
            )
            _warned_missing_fla = True
        return "torch"
    return "fla"


@functools.lru_cache(maxsize=1)
def triton_imports() -> bool:
    """Whether ``triton`` imports (checked once; only asked for CUDA tensors)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def resolve_decode_kernels(choice: str, device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"``: which implementation of this package's decode kernels serves tensors on
    ``device`` for ``config.decode_kernels == choice``."""
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if device.type != "cuda":
            raise RuntimeError(f"decode_kernels='triton' needs CUDA tensors, got tensors on {device}")
        if not triton_imports():
            raise RuntimeError("decode_kernels='triton' but triton does not import: pip install triton")
        return "triton"
    if choice != "auto":
        raise ValueError(f"decode_kernels={choice!r} must be one of 'auto', 'torch', 'triton'")
    return "triton" if device.type == "cuda" and triton_imports() else "torch"


def triton_decode(choice: str, x: torch.Tensor) -> bool:
    """Whether ``choice`` (``config.decode_kernels``) resolves to this package's Triton decode kernels for x's
    device (:func:`resolve_decode_kernels`)."""
    return resolve_decode_kernels(choice, x.device) == "triton"


def fused_kda_decode(decode_kernels: str, kda_backend: str, device: torch.device) -> bool:
    """Whether a KDA layer's decode step on ``device`` runs as this package's one fused Triton kernel
    (:func:`kda_decode_step`): ``decode_kernels`` resolves to ``"triton"`` and ``kda_backend`` does not resolve to
    ``"torch"`` (which asks for the PyTorch reference throughout). CPU tensors never do."""
    if resolve_decode_kernels(decode_kernels, device) != "triton":
        return False
    return resolve_kda_backend(kda_backend, device) != "torch"


def kda_decode_step(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A KDA layer's decode step from the raw projections to ``o_proj``'s input, fused into one Triton kernel:
    :func:`kda_decode_triton.kda_decode_step` (imported here, on first use; only for CUDA tensors that
    :func:`fused_kda_decode` sent here). Its PyTorch reference is the layer's ordinary path."""
    from .kda_decode_triton import kda_decode_step as fused_step

    return fused_step(*args, **kwargs)


def mla_decode(
    q_lat: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, scale: float, value_dim: int,
    row_limit: torch.Tensor | None = None, q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """MLA attention in latent space for one new token per sequence, as one flash-decoding Triton kernel
    (:func:`mla_decode_triton.mla_decode_attention`; imported here, on first use, only after
    :func:`resolve_decode_kernels` chose ``"triton"``).

    ``q_lat [B, H, L]``, ``latent [B, S, L]``, ``mask [B or 1, S]`` bool or ``None`` -> ``[B, H, value_dim]``;
    rows at and past ``row_limit`` (a one-element device tensor) are not read. With ``q_rope``, the query comes in
    its two parts: ``q_lat [B, H, value_dim]`` and ``q_rope [B, H, L - value_dim]``.
    """
    from .mla_decode_triton import mla_decode_attention

    return mla_decode_attention(q_lat, latent, mask, scale, value_dim, row_limit=row_limit, q_rope=q_rope)


# Token-expert copies (tokens x top-k) up to which the MoE runs on the Triton decode kernels: batch 64 at top-8.
# Past it (prompts, large batches) grouped matmul is the better tool; the kernels themselves handle any count.
MOE_DECODE_MAX_COPIES = 512


def moe_decode_kernels(choice: str, x: torch.Tensor, copies: int, *weights: torch.Tensor):  # noqa: ANN201
    """The module of this package's Triton MoE decode kernels (:mod:`moe_decode_triton`, imported on first use)
    when they serve this call, else ``None`` (the PyTorch path): ``choice`` (``config.decode_kernels``) resolves to
    ``"triton"`` for ``x``'s device (:func:`resolve_decode_kernels`; never for CPU tensors), no gradient is
    needed, there are at most :data:`MOE_DECODE_MAX_COPIES` token-expert ``copies``, and every weight is a plain
    floating-point tensor (a quantized tensor subclass takes its own path)."""
    if not triton_decode(choice, x) or copies > MOE_DECODE_MAX_COPIES:
        return None
    if needs_grad(x, *weights):
        return None
    if any(type(w) not in (torch.Tensor, torch.nn.Parameter) or not w.is_floating_point() for w in weights):
        return None
    return moe_decode_module()


def moe_decode_module():  # noqa: ANN201
    """Import :mod:`moe_decode_triton` (imports triton; called only once Triton was chosen for CUDA tensors)."""
    from .moe_decode_triton import experts  # noqa: F401  (this form: save_pretrained copies what it names)
    from . import moe_decode_triton

    return moe_decode_triton


# One Triton launch for several linear maps (multi_linear_triton): at most this many (x, module) pairs, and at most
# this many tokens (decode steps; prompts keep cuBLAS, which is the better tool for matrices).
MULTI_LINEAR_SLOTS = 6
MULTI_LINEAR_MAX_TOKENS = 64


def linears(
    choice: str, pairs: Sequence[tuple[torch.Tensor, nn.Module]], kinds: tuple[str, ...] = ("plain", "int8")
) -> list[torch.Tensor]:
    """``[module(x) for x, module in pairs]``, with the pairs whose :func:`linear_kind` is in ``kinds`` computed by
    one Triton launch per kind (:func:`multi_linear_triton.multi_linear`: plain weights in one, weight-only int8
    weights in another) and the rest by the module calls themselves.

    ``choice`` is ``config.decode_kernels``; launches serve CUDA tensors only, with ``choice`` resolving to
    ``"triton"`` (:func:`resolve_decode_kernels`), no gradient needed and :func:`launchable` true. Callers pass
    ``kinds=("int8",)`` where cuBLAS was measured faster than the launch for plain weights (a single projection
    with few output rows: o_proj, down_proj; docs/benchmarks.md) - an int8 weight is still read as int8 there,
    where the module call would first write it out in bf16."""
    x = pairs[0][0]
    chosen: list[str | None] = [None] * len(pairs)
    if triton_decode(choice, x) and launchable(pairs):
        chosen = [k if k in kinds else None for k in (linear_kind(t, m) for t, m in pairs)]
        if needs_grad(*(t for t, _ in pairs), *(m.weight for (_, m), k in zip(pairs, chosen) if k == "plain")):
            chosen = [None] * len(pairs)
    if not any(chosen):
        return [m(t) for t, m in pairs]
    from .multi_linear_triton import multi_linear

    out: list[torch.Tensor | None] = [None] * len(pairs)
    for kind in ("plain", "int8"):
        idx = [i for i, k in enumerate(chosen) if k == kind]
        if not idx:
            continue
        if kind == "plain":
            ys = multi_linear([(pairs[i][0], pairs[i][1].weight) for i in idx])
        else:
            rows = [int8_rows(pairs[i][1].weight) for i in idx]
            zeros = None
            if any(r[2] is not None for r in rows):
                zeros = [r[2] if r[2] is not None else torch.zeros_like(r[1], dtype=torch.int8) for r in rows]
            ys = multi_linear([(pairs[i][0], r[0]) for i, r in zip(idx, rows)], scales=[r[1] for r in rows],
                              zeros=zeros)
        for i, y in zip(idx, ys):
            out[i] = y
    return [y if y is not None else m(t) for y, (t, m) in zip(out, pairs)]


def launchable(pairs: Sequence[tuple[torch.Tensor, nn.Module]]) -> bool:
    """Whether one launch could serve these pairs at all: at most :data:`MULTI_LINEAR_SLOTS` of them and
    :data:`MULTI_LINEAR_MAX_TOKENS` tokens, inputs of one floating dtype, device and leading shape, no autocast and
    no global module hooks."""
    x = pairs[0][0]
    if len(pairs) > MULTI_LINEAR_SLOTS or x.numel() > MULTI_LINEAR_MAX_TOKENS * x.shape[-1]:
        return False
    if not plain_call_context(x):
        return False
    return all(t.shape[:-1] == x.shape[:-1] and t.dtype == x.dtype and t.device == x.device for t, _ in pairs)


def linear_kind(x: torch.Tensor, module: nn.Module) -> str | None:
    """``"plain"`` when ``module(x)`` is exactly ``x W^T`` with a plain weight of x's dtype, ``"int8"`` when it is
    that with a weight-only int8 weight (:func:`quantization.int8_rows`), else None (the module call): the module
    must be exactly ``nn.Linear`` (not a PEFT or quantization wrapper, not a subclass), without bias or hooks
    (accelerate's offloading hooks included), its weight on x's device."""
    if type(module) is not nn.Linear or module.bias is not None or hooked(module):
        return None
    w = module.weight
    if w.device != x.device:
        return None
    if type(w) in (torch.Tensor, nn.Parameter):
        return "plain" if w.dtype == x.dtype else None
    return "int8" if int8_rows(w) is not None else None


def offloaded(module: nn.Module) -> bool:
    """Whether accelerate hooked ``module`` (``_hf_hook``; e.g. offloaded weights, which arrive only through the
    module call): code that reads its weights directly must call it instead."""
    return hasattr(module, "_hf_hook")


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its ``forward``: forward hooks or pre-hooks, or accelerate's
    (:func:`offloaded`). A kernel that replaces the call must leave such a module to it."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or offloaded(module)


def plain_call_context(x: torch.Tensor) -> bool:
    """Whether a module call on ``x`` computes just its ``forward``, in x's dtype: x of a floating dtype the Triton
    kernels take, no autocast, no global module hooks."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks or torch.is_autocast_enabled(x.device.type):
        return False
    return x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def add_rms_norm(
    choice: str, x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(h), h)`` with ``h = residual + x`` (``h = x`` without a residual): the decoder's residual add and
    RMSNorm as one Triton launch (:func:`rms_norm_triton.add_rms_norm`) where :func:`plain_rms_norm` says that
    computes the same and ``choice`` (``config.decode_kernels``) resolves to ``"triton"`` for x's device, else the
    add and the module call themselves (the reference)."""
    if triton_decode(choice, x) and plain_rms_norm(x, residual, norm):
        from .rms_norm_triton import add_rms_norm as fused

        return fused(x, residual, norm.weight, norm.variance_epsilon)
    h = x if residual is None else residual + x
    return norm(h), h


def rms_norm_head(choice: str, x: torch.Tensor, width: int, norm: nn.Module) -> torch.Tensor:
    """``cat([norm(x[..., :width]), x[..., width:]], -1)`` (MLA's cached latent: the compressed KV normalised, the
    shared key part as it is): one Triton launch (:func:`rms_norm_triton.rms_norm_head`) where
    :func:`plain_rms_norm` says that computes the same and ``choice`` resolves to ``"triton"`` for x's device, else
    the split, the module call and the concatenation (the reference)."""
    if triton_decode(choice, x) and plain_rms_norm(x, None, norm) and norm.weight.shape == (width,):
        from .rms_norm_triton import rms_norm_head as fused

        return fused(x, norm.weight, norm.variance_epsilon)
    head, tail = x.split([width, x.shape[-1] - width], -1)
    return torch.cat([norm(head), tail], -1)


def plain_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module) -> bool:
    """Whether ``norm`` is exactly :class:`norms.KimiRMSNorm` (no subclass, no hooks or global module hooks) with a
    plain weight of x's dtype and device, ``residual`` (if any) is like x, nothing needs gradients and no autocast
    is on: then :func:`rms_norm_triton.add_rms_norm` computes what the module computes."""
    w = getattr(norm, "weight", None)
    if type(norm) is not KimiRMSNorm or hooked(norm) or not plain_call_context(x):
        return False
    if type(w) not in (torch.Tensor, nn.Parameter) or w.dtype != x.dtype or w.device != x.device:
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return False
    return not needs_grad(x, w, *(() if residual is None else (residual,)))


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule with per-channel decay; q/k are L2-normalised inside, scale ``K**-0.5``.

    Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g ``[B, T, H, K]`` (log decay, fp32), beta ``[B, T, H]``,
    state ``[N, H, K, V]`` fp32. Returns ``(o [B, T, H, V], final_state or None)``.
    """
    kwargs = dict(
        initial_state=initial_state,
        output_final_state=output_final_state,
        use_qk_l2norm=True,
        cu_seqlens=cu_seqlens,
    )
    if resolve_kda_backend(backend, q.device) == "fla":
        return kda_fla(q, k, v, g, beta, **kwargs)
    if q.shape[1] == 1:
        return kda_recurrent_torch(q, k, v, g, beta, **kwargs)
    return kda_chunk_torch(q, k, v, g, beta, **kwargs)


def kda_padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    backend: str = "auto",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    unpad: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`kda` over a batch with padding: positions where ``token_mask [B, T]`` is False change no state.

    Two exact routes (``unpad=None`` picks the first for fla's kernels on prompts without autograd, the second
    otherwise, see :func:`unpads`):

    * unpadded: the real tokens of every row are packed along T and run as variable-length sequences
      (``cu_seqlens``), so the kernels never see padding; outputs are scattered back, 0 at padded positions;
    * in place: padded positions get decay 1 (``g = 0``) and write strength 0 (``beta = 0``), so the recurrence
      steps over them unchanged.

    The unpadded route reads the row lengths back to the host once (prefill only). Rows without any real token
    take the in-place route (their final state is their initial state).
    """
    resolved = resolve_kda_backend(backend, q.device)
    if unpad is None:
        unpad = unpads(resolved, q.shape[1], needs_grad(q, k, v, g, beta, initial_state))
    if unpad:
        lengths = token_mask.sum(-1)
        if bool((lengths > 0).all()):
            return _kda_unpadded(q, k, v, g, beta, token_mask, lengths, resolved, initial_state, output_final_state)
    keep = token_mask.unsqueeze(-1)
    return kda(q, k, v, g * keep.unsqueeze(-1), beta * keep, backend=resolved, initial_state=initial_state,
               output_final_state=output_final_state)


def unpads(backend: str, seqlen: int, training: bool) -> bool:
    """The route :func:`kda_padded` takes by default: unpadded for fla prompts (no work on padding), in place for
    training (every step of a padded training batch then has the same shapes; unpadded, the number of real tokens
    changes step by step, and fla autotunes its forward and backward kernels anew for each count: ~20 s a step on
    an H200) and for the PyTorch kernels."""
    return backend == "fla" and seqlen > 1 and not training


def _kda_unpadded(q, k, v, g, beta, token_mask, lengths, backend, initial_state, output_final_state):  # noqa: ANN001
    bsz, seqlen, heads, dv = v.shape
    where = token_mask.flatten().nonzero().squeeze(-1)  # positions of real tokens, row by row
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = [x.flatten(0, 1).index_select(0, where).unsqueeze(0) for x in (q, k, v, g, beta)]
    o, state = kda(*packed, backend=backend, initial_state=initial_state, output_final_state=output_final_state,
                   cu_seqlens=cu_seqlens)
    out = o.new_zeros(bsz * seqlen, heads, dv).index_copy(0, where, o[0])
    return out.view(bsz, seqlen, heads, dv), state


def _fla_modules_for(backend: str, device: torch.device) -> bool:
    """Whether fla's conv / norm kernels serve tensors on ``device`` (fla resolved and its modules import)."""
    return resolve_kda_backend(backend, device) == "fla" and fla_module_ops() is not None


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None,
    *,
    backend: str = "auto",
    token_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA's depthwise causal convolution + SiLU (``x [B, T, C]``, ``weight [C, W]``, ``state [B, C, W-1]``).

    Prompts on the fla path use fla's ``causal_conv1d``; single-token steps and CPU tensors the PyTorch reference
    (:func:`short_conv_torch.short_conv_torch`). ``cu_seqlens`` marks packed documents (each from zeros; no state
    returned); ``token_mask`` zeroes padded inputs.
    """
    if x.shape[1] > 1 and _fla_modules_for(backend, x.device):
        return short_conv_fla(x, weight, state, token_mask, cu_seqlens)
    pos_in_doc = positions_in_documents(cu_seqlens, x.shape[1]) if cu_seqlens is not None else None
    return short_conv_torch(x, weight, state, token_mask, pos_in_doc)


def gated_rms_norm(
    o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, *, backend: str = "auto"
) -> torch.Tensor:
    """KDA's output norm ``rmsnorm(o) * weight * sigmoid(gate)``: fla's fused kernel on the fla path, the PyTorch
    reference (:func:`norms.gated_rms_normalize`) otherwise."""
    if _fla_modules_for(backend, o.device):
        return gated_rms_norm_fla(o, gate, weight, eps)
    return gated_rms_normalize(o, gate, weight, eps)
