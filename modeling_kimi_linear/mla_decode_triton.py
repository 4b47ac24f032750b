"""MLA decode in latent space as one flash-decoding Triton kernel (plus a small combine kernel).

Math (one new token per sequence, the key/value up-projections absorbed as in
:meth:`mla_layer.KimiMLAAttention.attend_latent`): for query ``q [H, L]`` (``L = value_dim + rope``) and the cached
latent rows ``c_s [L]`` of one sequence,

    score[h, s] = scale * <q[h], c_s>            (all L values: the latent part and the shared "rope" key part)
    p[h, :]     = softmax over the rows s where mask[s] is True
    out[h]      = sum_s p[h, s] * c_s[:value_dim]

All ``H`` heads share the same keys and values (multi-query attention in latent space), so a thread block reads each
of its latent rows once, for every head: ``scores = q @ tile^T`` is one ``tl.dot`` on the value part and one on the
rope part (``tl.arange`` needs powers of two: 512 + 64, not 576), and ``p @ tile[:, :value_dim]`` reuses the same
tile.

Split-KV ("flash-decoding"): one sequence's tiles of rows are dealt out in turn to ``num_splits`` thread blocks per
sequence (split ``k`` takes tiles ``k, k + num_splits, ...``), so that a single long sequence still fills every SM,
and so that when a static decode step attends over a bucket of rows of which only ``position + 1`` are filled
(``row_limit``, read on the device) every block skips an equal share instead of some blocks idling while others
do all the work. Each block runs an online softmax over its rows (running max ``m``, running sum ``l``, accumulator ``acc [H, value_dim]``, all fp32) and writes its normalised
partial result ``acc / l`` and its log-sum-exp ``m + log2 l`` (base 2: the kernel works with ``exp2``) to an fp32
workspace. The combine kernel weights the partial results by ``2 ** (lse_split - max lse)``. Combining in fp32
matters: the partial results are themselves averages over thousands of rows, and rounding each to bf16 before
the weighted sum would add one more bf16 rounding on top of the one the output gets. The number of splits is a
host-side function of ``S``, ``B``, the SM count and the tile size only (no device data is read), so a CUDA graph
captured for one bucket size replays the same launch.

Bytes per call: ``B * S * L * elem`` latent bytes (1.2 GB for ``S = 2**20`` rows of 576 bf16 values), read once, plus
the workspace ``B * splits * H * (value_dim + 1) * 4`` bytes, written once and read back once (17 MB at ``B = 1``
and 264 splits: 1.4 % of the latent each way), and the small ``q`` / ``out``. The kernel does about 60 flop per
latent byte (bf16 tensor-core products), well under what a Hopper GPU computes per byte it reads, so it is memory
bound, and its speed is measured as latent bytes / time against the copy bandwidth
(``bench/gpu_check.py --only mla``).

Rows whose whole mask is False give 0 (the PyTorch path gives NaN there: a softmax over nothing); a decode row
always sees at least its own new token. The PyTorch path (``attend_latent``) is the reference and the CPU path;
this module is imported only when :func:`kernels.resolve_decode_kernels` chose ``"triton"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

try:  # transformers' remote-code check skips imports inside try: a checkpoint must load where triton is absent
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("modeling_kimi_linear.mla_decode_triton needs triton: pip install triton") from err

from . import pdl
from .pdl import launch_options  # noqa: F401  (this form: transformers copies pdl.py into checkpoints)
from .launch_resources import INTERPRETER_SMS, sm_count

SPLITS_PER_SM = 2  # thread blocks per SM aimed at over the whole batch (2 full waves, or 1 at 2 blocks per SM)
# a split covers at least this many tiles. One: at 4K context the kernel (split + combine, in a CUDA graph, latents
# from memory) took 14.2 us with 64 one-tile splits against 14.8 / 20.8 / 33.3 us for 2 / 4 / 8 tiles a split; at
# 128K all of 1, 2, 4 gave 100.5 us (H100, bench/gpu_check.py --only mla, 2026-12-08)
MIN_TILES_PER_SPLIT = 1
MAX_SPLITS = 1024  # per sequence
COMBINE_BLOCK = 128  # value columns per combine program (on a GPU; the interpreter takes all in one program)
COMBINE_SPLITS = 32  # splits loaded at a time by the combine kernel


@dataclass(frozen=True)
class MLADecodeConfig:
    """Launch parameters of the split kernel.

    ``block_s`` rows per tile; ``kv_major``: the products are written with the tile's rows (``scores^T = tile @
    q^T``) and the value columns (``acc^T = tile^T @ p^T``) as the ``tl.dot`` M dimension, which Hopper's wgmma
    wants as a multiple of 64, instead of the heads (32); ``num_warps`` / ``num_stages`` as in Triton.
    """

    block_s: int = 32
    kv_major: bool = False
    num_warps: int = 8
    num_stages: int = 4


# The few configurations the GPU check times (``bench/gpu_check.py --only mla``); the first is the default for
# 16-bit latents. Compiled for sm_90 (``bench/mla_kernel_compile_check.py``, no GPU needed): 128-170 registers a
# thread at 8 warps, no spills, 127-184 KB of shared memory, so one block per SM, and the loads must overlap the
# arithmetic through the pipeline's stages. Triton keeps ``num_stages - 1`` tiles in shared memory (one more for
# ``kv_major``, whose asynchronous wgmma holds its operand) and waits for the current tile while the next ones are
# in flight; with 2 stages it waits for every copy before computing (no overlap), and 64-row ``kv_major`` tiles
# need 256 KB at 3 stages (too much), so those are left out. A tile is block_s * 576 * 2 bytes (36 KB at 32 rows).
CONFIGS: tuple[MLADecodeConfig, ...] = (
    MLADecodeConfig(block_s=64, kv_major=False, num_warps=8, num_stages=3),  # 1 large tile in flight
    MLADecodeConfig(block_s=32, kv_major=False, num_warps=8, num_stages=4),  # 2 tiles in flight, mma.sync
    MLADecodeConfig(block_s=32, kv_major=True, num_warps=8, num_stages=5),  # 3 in flight, wgmma for p @ tile
    MLADecodeConfig(block_s=16, kv_major=False, num_warps=8, num_stages=6),  # 4 small tiles in flight
)
# Measured at 1M rows on an H100 (bench/gpu_check.py --only mla, 2026-12-07; copy bandwidth 3.02 TB/s), in this
# order: 552 / 791 / 849 / 1303 us, i.e. 72% / 51% / 47% / 31% of the copy bandwidth: the first is the default.
FP32_CONFIG = MLADecodeConfig(block_s=16, kv_major=False, num_warps=8, num_stages=3)  # fp32 rows are twice as wide


def default_config(dtype: torch.dtype) -> MLADecodeConfig:
    """The launch configuration for latents of ``dtype`` (fixed per dtype: nothing to autotune at start-up)."""
    return FP32_CONFIG if dtype == torch.float32 else CONFIGS[0]


def split_plan(rows: int, batch: int, sm_count: int, block_s: int) -> int:
    """Splits per sequence for ``rows`` cached rows: about ``SPLITS_PER_SM * sm_count`` blocks over the batch, each
    with at least ``MIN_TILES_PER_SPLIT`` tiles. Depends on its integer arguments only (a captured CUDA graph
    replays the same plan); tiles are dealt to the splits in turn (see the kernel)."""
    target = max(1, -(-SPLITS_PER_SM * sm_count // batch))
    most = max(1, -(-rows // (MIN_TILES_PER_SPLIT * block_s)))
    return max(1, min(target, most, MAX_SPLITS))


@triton.jit
def _mla_decode_split_kernel(
    q_ptr, qr_ptr, kv_ptr, mask_ptr, limit_ptr, part_ptr, lse_ptr,
    S, H, qk_scale,
    stride_qb, stride_qh, stride_rb, stride_rh,
    stride_kb, stride_ks,
    stride_mb, stride_ms,
    stride_pb, stride_ps, stride_ph,
    stride_lb, stride_ls,
    DV: tl.constexpr, DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_S: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_LIMIT: tl.constexpr, KV_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    """One (split, sequence): online softmax over the tiles ``split, split + splits, split + 2 * splits, ...`` of
    the rows ``[0, min(S, limit))`` (tiles dealt out in turn, so every split keeps an equal share when the limit
    cuts the rows short). The query's value-space part is read at ``q_ptr``, its shared-key part at ``qr_ptr``."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    split = tl.program_id(0)
    splits = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    dtype = kv_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)
    offs_v = tl.arange(0, BLOCK_DV)
    offs_r = tl.arange(0, BLOCK_DR)
    offs_s = tl.arange(0, BLOCK_S)
    h_ok = offs_h < H
    # column masks only where a width is not a power of two: a mask along the contiguous axis would stop the
    # loads from being vectorised (and from becoming asynchronous copies that the pipeliner can prefetch)
    v_ok = offs_v < DV if DV != BLOCK_DV else offs_v >= 0
    r_ok = offs_r < DR if DR != BLOCK_DR else offs_r >= 0

    q_base = q_ptr + b * stride_qb
    qr_base = qr_ptr + b * stride_rb
    kv_base = kv_ptr + b * stride_kb
    end = S
    if HAS_LIMIT:  # rows past the decode position of a static step: never read
        end = tl.minimum(end, tl.load(limit_ptr).to(tl.int32))
    start = split * BLOCK_S
    step = splits * BLOCK_S
    if KV_MAJOR:  # q^T [D, H]: the heads are the dots' N dimension
        q_v = tl.load(q_base + offs_v[:, None] + offs_h[None, :] * stride_qh, mask=v_ok[:, None] & h_ok[None, :],
                      other=0.0).to(dtype)
        q_r = tl.load(qr_base + offs_r[:, None] + offs_h[None, :] * stride_rh,
                      mask=r_ok[:, None] & h_ok[None, :], other=0.0).to(dtype)
        acc = tl.zeros([BLOCK_DV, BLOCK_H], dtype=tl.float32)  # acc^T
    else:  # q [H, D]: the heads are the dots' M dimension
        q_v = tl.load(q_base + offs_h[:, None] * stride_qh + offs_v[None, :], mask=h_ok[:, None] & v_ok[None, :],
                      other=0.0).to(dtype)
        q_r = tl.load(qr_base + offs_h[:, None] * stride_rh + offs_r[None, :],
                      mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(dtype)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    # The mask is prefetched one tile ahead by hand: Triton's pipeliner makes asynchronous copies only of loads
    # that feed a tl.dot, and a plain load in the loop would wait a full memory latency every tile.
    mask_base = mask_ptr + b * stride_mb
    keep = tl.zeros([BLOCK_S], dtype=tl.int8)
    if HAS_MASK:
        keep = tl.load(mask_base + (start + offs_s).to(tl.int64) * stride_ms, mask=start + offs_s < end, other=0)

    for s0 in range(start, end, step):
        rows = s0 + offs_s
        row_ok = rows < end
        row_off = rows.to(tl.int64) * stride_ks
        tile = tl.load(kv_base + row_off[:, None] + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :], other=0.0)
        tile_r = tl.load(kv_base + row_off[:, None] + DV + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                         other=0.0)
        valid = row_ok
        if HAS_MASK:
            valid = valid & (keep != 0)
            ahead = rows + step
            keep = tl.load(mask_base + ahead.to(tl.int64) * stride_ms, mask=ahead < end, other=0)
        if KV_MAJOR:  # scores^T [BLOCK_S, H]; softmax down the columns
            s = tl.dot(tile, q_v, input_precision=PRECISION) + tl.dot(tile_r, q_r, input_precision=PRECISION)
            s = tl.where(valid[:, None], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp2 away from -inf - -inf
            p = tl.exp2(s - m_safe[None, :])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = tl.dot(tl.trans(tile), p.to(dtype), acc * alpha[None, :], input_precision=PRECISION)
        else:  # scores [H, BLOCK_S]; softmax along the rows
            s = tl.dot(q_v, tl.trans(tile), input_precision=PRECISION)
            s += tl.dot(q_r, tl.trans(tile_r), input_precision=PRECISION)
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(dtype), tile, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    seen = l_i > 0
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    part_base = part_ptr + b * stride_pb + split * stride_ps
    if KV_MAJOR:
        tl.store(part_base + offs_v[:, None] + offs_h[None, :] * stride_ph, acc * inv_l[None, :],
                 mask=v_ok[:, None] & h_ok[None, :])
    else:
        tl.store(part_base + offs_h[:, None] * stride_ph + offs_v[None, :], acc * inv_l[:, None],
                 mask=h_ok[:, None] & v_ok[None, :])
    tl.store(lse_ptr + b * stride_lb + split * stride_ls + offs_h, lse, mask=h_ok)


@triton.jit
def _mla_decode_combine_kernel(
    part_ptr, lse_ptr, out_ptr,
    num_splits, H,
    stride_pb, stride_ps, stride_ph,
    stride_lb, stride_ls,
    stride_ob, stride_oh,
    DV: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_CHUNK: tl.constexpr, PDL: tl.constexpr,
):
    """One (sequence, head, block of value columns): ``sum_k w_k part_k / sum_k w_k``, ``w_k = 2**(lse_k - max)``."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < DV
    offs_k = tl.arange(0, SPLIT_CHUNK)
    lse_base = lse_ptr + b * stride_lb + h
    top = tl.full([SPLIT_CHUNK], float("-inf"), dtype=tl.float32)
    for k0 in range(0, num_splits, SPLIT_CHUNK):
        top = tl.maximum(top, tl.load(lse_base + (k0 + offs_k) * stride_ls, mask=k0 + offs_k < num_splits,
                                      other=float("-inf")))
    top_all = tl.max(top, 0)
    top_all = tl.where(top_all == float("-inf"), 0.0, top_all)  # every row masked: all weights 0, output 0
    den = tl.zeros([SPLIT_CHUNK], dtype=tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    part_base = part_ptr + b * stride_pb + h * stride_ph
    for k0 in range(0, num_splits, SPLIT_CHUNK):
        k_ok = k0 + offs_k < num_splits
        w = tl.exp2(tl.load(lse_base + (k0 + offs_k) * stride_ls, mask=k_ok, other=float("-inf")) - top_all)
        part = tl.load(part_base + (k0 + offs_k)[:, None] * stride_ps + offs_c[None, :],
                       mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        den += w
        acc += tl.sum(w[:, None] * part, 0)
    total = tl.sum(den, 0)
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty), mask=c_ok)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def mla_decode_attention(
    q_lat: torch.Tensor,
    latent: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    value_dim: int,
    *,
    config: MLADecodeConfig | None = None,
    num_splits: int | None = None,
    row_limit: torch.Tensor | None = None,
    q_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence over cached MLA latent rows, in latent space.

    Args:
        q_lat: ``[B, H, L]`` absorbed queries, any float dtype (cast to the latent's dtype for the products); or,
            with ``q_rope``, only their first ``value_dim`` values ``[B, H, value_dim]``. Any batch and head strides.
        latent: ``[B, S, L]`` cached rows (bf16, fp16 or fp32), last dimension contiguous; any batch and row
            strides (``buffer[:, :rows]`` of a larger preallocated buffer works as it is).
        mask: ``[B, S]`` or ``[1, S]`` bool (True = attend), or ``None`` (every row).
        scale: softmax scale applied to ``q_lat @ latent^T``.
        value_dim: the first ``value_dim`` values of a row are the values (the rest are the shared key part).
        config: launch parameters (default :func:`default_config` of the latent's dtype).
        num_splits: override the number of splits per sequence (tests); default :func:`split_plan`.
        row_limit: optional one-element integer tensor on the device: rows at and past it are neither read nor
            attended (a static decode step attends over a bucket of rows, of which only ``position + 1`` are
            filled); read on the device, so a CUDA graph replays it with the step's current value.
        q_rope: optional ``[B, H, L - value_dim]``, the queries' last values (against the rows' shared key part),
            given apart so that the two parts need not be concatenated first.

    Returns:
        ``[B, H, value_dim]`` in the latent's dtype: ``softmax(scale * q_lat @ latent^T) @ latent[..., :value_dim]``
        per sequence and head; 0 for a sequence whose mask is all False.
    """
    if q_lat.dim() != 3 or latent.dim() != 3 or (q_rope is not None and (q_rope.dim() != 3
                                                                       or q_rope.shape[:2] != q_lat.shape[:2])):
        raise ValueError(f"q_lat must be [B, H, L] (or [B, H, value_dim] with q_rope [B, H, L - value_dim]) and "
                         f"latent [B, S, L]; got {tuple(q_lat.shape)}, "
                         f"{None if q_rope is None else tuple(q_rope.shape)} and {tuple(latent.shape)}")
    if q_rope is None:
        q_lat, q_rope = q_lat[..., :value_dim], q_lat[..., value_dim:]
    bsz, heads = q_lat.shape[:2]
    width = q_lat.shape[2] + q_rope.shape[2]
    if latent.shape[0] != bsz or latent.shape[2] != width:
        raise ValueError(f"latent {tuple(latent.shape)} does not match q_lat {tuple(q_lat.shape)} ([B, S, L])")
    rows = latent.shape[1]
    if rows == 0:
        raise ValueError("latent has no rows to attend over")
    if not 0 < value_dim < width or q_lat.shape[2] != value_dim:
        raise ValueError(f"value_dim={value_dim} must be between 1 and L-1={width - 1} (values, then key-only part)"
                         f" and the width of q_lat's value part ({q_lat.shape[2]})")
    if latent.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"latent dtype {latent.dtype} is not bf16, fp16 or fp32")
    if latent.stride(-1) != 1:
        latent = latent.contiguous()
    if q_lat.stride(-1) != 1:
        q_lat = q_lat.contiguous()
    if q_rope.stride(-1) != 1:
        q_rope = q_rope.contiguous()
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] not in (1, bsz) or mask.shape[1] != rows:
            raise ValueError(f"mask must be bool [B or 1, S] = [{bsz} or 1, {rows}], got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        mask = mask.expand(bsz, rows).view(torch.uint8)
    config = config or default_config(latent.dtype)
    splits = split_plan(rows, bsz, sm_count(latent.device, INTERPRETER_SMS), config.block_s)
    if num_splits is not None:
        splits = max(1, min(num_splits, triton.cdiv(rows, config.block_s)))
    if row_limit is not None and (row_limit.numel() != 1 or row_limit.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"row_limit must be a one-element integer tensor, got {row_limit.dtype} "
                         f"{tuple(row_limit.shape)}")
    rope = width - value_dim
    part = torch.empty(bsz, splits, heads, value_dim, device=latent.device, dtype=torch.float32)
    lse = torch.empty(bsz, splits, heads, device=latent.device, dtype=torch.float32)
    out = torch.empty(bsz, heads, value_dim, device=latent.device, dtype=latent.dtype)
    mask_arg = mask if mask is not None else latent  # never read without HAS_MASK
    launch = pdl.launch_options(latent.device)
    limit_arg = row_limit if row_limit is not None else latent  # never read without HAS_LIMIT
    _mla_decode_split_kernel[(splits, bsz)](
        q_lat, q_rope, latent, mask_arg, limit_arg, part, lse,
        rows, heads, scale * math.log2(math.e),
        q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1),
        mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        DV=value_dim, DR=rope,
        BLOCK_H=_pow2(heads), BLOCK_DV=_pow2(value_dim), BLOCK_DR=_pow2(rope), BLOCK_S=config.block_s,
        HAS_MASK=mask is not None, HAS_LIMIT=row_limit is not None, KV_MAJOR=config.kv_major,
        PRECISION="ieee" if latent.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **launch,
    )
    # the interpreter's cost is per program: one per (sequence, head) there
    block_c = COMBINE_BLOCK if latent.is_cuda else _pow2(value_dim)
    _mla_decode_combine_kernel[(bsz * heads, triton.cdiv(value_dim, block_c))](
        part, lse, out,
        splits, heads,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        DV=value_dim, BLOCK_C=block_c, SPLIT_CHUNK=COMBINE_SPLITS,
        num_warps=4, **launch,
    )
    return out
