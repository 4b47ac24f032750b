"""The decoder's residual add and RMSNorm in one Triton launch (CUDA only).

``KimiRMSNorm`` in PyTorch is about seven kernels (fp32 cast, square, mean, + eps, rsqrt, product, cast back, the
weight's product) and the residual add before it one more. A decode step of the 27-layer release runs two norms a
layer: some 400 launches of a few microseconds each for a few kilobytes of data, which is latency, not bandwidth.
:func:`add_rms_norm` does the add and the norm of one row per program.

Math, in the order ``KimiDecoderLayer`` and ``KimiRMSNorm`` compute it: ``h = x + residual`` rounded to x's dtype
(the new residual stream, returned), then ``n = h / sqrt(mean(h**2) + eps)`` in fp32 rounded to x's dtype, then
``y = weight * n`` rounded to x's dtype. Only the order of the fp32 sum of squares differs from PyTorch's, so ``y``
may differ in the last bit of a few elements.

Nothing imports this module unless :func:`kernels.add_rms_norm` chose it for CUDA tensors; ``KimiRMSNorm`` stays the
reference and the CPU path.
"""

from __future__ import annotations

import torch

try:  # in a try block, transformers' remote-code check does not ask for triton where these kernels never run
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError("the RMSNorm decode kernel needs triton: pip install triton") from exc

from . import pdl
from .pdl import launch_options  # noqa: F401  (this form: transformers copies pdl.py into checkpoints)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * rmsnorm(h), h)`` with ``h = x + residual`` (``h = x`` when ``residual`` is None).

    ``x`` and ``residual`` ``[..., D]`` and ``weight [D]`` of one dtype (bf16, fp16 or fp32); both results have x's
    shape and dtype. Without a residual, ``h`` is ``x`` itself.
    """
    dim = x.shape[-1]
    if tuple(weight.shape) != (dim,) or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"expected x [..., D], residual like x and weight [D]; got {tuple(x.shape)}, "
                         f"{None if residual is None else tuple(residual.shape)}, {tuple(weight.shape)}")
    dtypes = {x.dtype, weight.dtype} | ({residual.dtype} if residual is not None else set())
    if len(dtypes) != 1 or x.dtype not in DTYPES:
        raise ValueError(f"x, residual and weight must share one of {DTYPES}; got {sorted(map(str, dtypes))}")
    rows = x.reshape(-1, dim)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.empty_like(rows)
    if residual is None:
        h = rows
    else:
        res = residual.reshape(-1, dim).contiguous()
        h = torch.empty_like(rows)
    _launch(rows, None if residual is None else res, h, y, weight, eps, dim)
    return y.view(x.shape), (x if residual is None else h.view(x.shape))


def rms_norm_head(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``cat([weight * rmsnorm(x[..., :D]), x[..., D:]], -1)`` with ``D = len(weight)`` in one launch: MLA's cached
    latent from ``kv_a_proj_with_mqa``'s output (the compressed KV normalised, the shared key part as it is), where
    the PyTorch path is a contiguous copy of the strided head, the norm and a concatenation. ``x [..., W]`` with
    ``W > D``, rows of any stride; the result is a new contiguous tensor of x's shape and dtype."""
    dim, width = weight.shape[0], x.shape[-1]
    if weight.dim() != 1 or not 0 < dim < width:
        raise ValueError(f"expected x [..., W] and weight [D] with D < W; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in DTYPES:
        raise ValueError(f"x and weight must share one of {DTYPES}; got {x.dtype}, {weight.dtype}")
    rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch(rows, None, rows, y, weight, eps, width)
    return y.view(x.shape)


def _launch(rows: torch.Tensor, residual: torch.Tensor | None, h: torch.Tensor, y: torch.Tensor,
            weight: torch.Tensor, eps: float, width: int) -> None:
    """One program a row of ``rows [N, >= width]`` (unit last stride): the first ``len(weight)`` values normed
    (after adding ``residual``'s row, storing the sum in ``h``), the rest up to ``width`` copied, into ``y``."""
    if not rows.shape[0]:
        return
    dim = weight.shape[0]
    block = triton.next_power_of_2(dim)
    _add_rms_norm[(rows.shape[0],)](
        rows, rows if residual is None else residual, h, y, weight.contiguous(), dim, float(eps), rows.stride(0),
        width, HAS_RESIDUAL=residual is not None, BLOCK=block,
        TAIL=triton.next_power_of_2(width - dim) if width > dim else 0, num_warps=min(16, max(1, block // 256)),
        **pdl.launch_options(rows.device),
    )


@triton.jit
def _add_rms_norm(x_ptr, r_ptr, h_ptr, y_ptr, w_ptr, D, eps, stride_x, W, HAS_RESIDUAL: tl.constexpr,
                  BLOCK: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr):
    """One row: h = x + r (in x's dtype, stored), y = w * (rmsnorm_fp32(h) in x's dtype) (in x's dtype). x's rows
    are ``stride_x`` apart, y's ``W``; TAIL > 0 (no residual): the row's values ``D .. W`` are copied to y as they
    are (``W = D``, ``stride_x = D`` otherwise)."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64) * D
    x_row = x_ptr + tl.program_id(0).to(tl.int64) * stride_x
    y_row = y_ptr + tl.program_id(0).to(tl.int64) * W
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    h = tl.load(x_row + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row + cols, mask=ok, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row + cols, h, mask=ok)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / D + eps)
    n = (hf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_row + cols, (w * n).to(y_ptr.dtype.element_ty), mask=ok)
    if TAIL > 0:
        tail = D + tl.arange(0, TAIL)
        tl.store(y_row + tail, tl.load(x_row + tail, mask=tail < W, other=0.0), mask=tail < W)
