"""The one dispatch seam between the pure-PyTorch kernels and fla's Triton kernels.

``backend`` comes from ``config.kda_backend``:

* ``"torch"``: always the PyTorch reference (:mod:`kda_torch`), any device;
* ``"fla"``: always fla (CUDA tensors only; a clear error otherwise);
* ``"auto"``: fla for CUDA tensors when it imports, PyTorch otherwise. CPU tensors never touch fla.
"""

from __future__ import annotations

import warnings

import torch

from .kda_fla import FLA_INSTALL_HINT, fla_kda_ops, kda_fla
from .kda_torch import kda_chunk_torch, kda_recurrent_torch

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
