"""RMS normalisations used by Kimi Linear: the plain one and the per-head gated one of KDA."""

from __future__ import annotations

import torch
from torch import nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x**2, -1) + eps)`` computed in float32 (returned in float32)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def gated_rms_normalize(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rmsnorm(o) * weight * sigmoid(gate)`` over the last dimension, in fp32, returned in o's dtype."""
    y = rms_normalize(o, eps) * weight.float() * torch.sigmoid(gate.float())
    return y.to(o.dtype)


class KimiRMSNorm(nn.Module):
    """RMSNorm as in the released code: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.variance_epsilon).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class KimiGatedRMSNorm(nn.Module):
    """KDA output norm: ``rmsnorm(o) * weight * sigmoid(gate)`` per head, all in fp32, stored in o's dtype.

    The weight (``head_dim`` values) is shared by all heads.
    """

    def __init__(self, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.variance_epsilon = eps

    def forward(self, o: torch.Tensor, gate: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """``o``, ``gate`` ``[..., head_dim]``; ``backend`` is ``config.kda_backend`` (fla's fused kernel for CUDA
        tensors where it resolves to fla, :func:`gated_rms_normalize` otherwise; see ``kernels.gated_rms_norm``)."""
        from .kernels import gated_rms_norm  # (kernels imports this module)

        return gated_rms_norm(o, gate, self.weight, self.variance_epsilon, backend=backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
