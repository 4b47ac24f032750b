"""Several bias-free linear maps of a few tokens in one Triton launch (decode time, CUDA only).

At batch 1 a KDA layer's projections are nine small matrix-vector products (q, k, v, the gate's and the output
gate's two ranks, beta, o_proj). cuBLAS runs each as its own kernel, and the first H100 run of this package's
decode kernels measured the nine at 62 us a layer for 77 MB of weights: 1.2 TB/s, 40% of the copy bandwidth
(docs/benchmarks.md, "Fused KDA decode step"). Most of that is the launch and tail of each small kernel, not the
bytes. :func:`multi_linear` computes ``y_i = x_i W_i^T`` for up to :data:`MAX_SLOTS` pairs in one grid: every
program owns ``BLOCK_N`` output features of one weight and streams those rows once through a K loop, so the
weights of all slots are read by one wave of programs. A KDA layer's eight projections before its fused step take
two launches (q/k/v/f_a/beta/g_a from x, then f_b/g_b from the two ranks) instead of eight: the six from x in 38.5
us on an H100 against 50.1 for the cuBLAS calls. Its loads were scalar then (the compiler could not prove
16-byte rows); with the shared K and x stride as compile-time constants they are 3-stage cp.async copies, and the
next H100 run measured 25.3 us against 50.4 for the six (79% of the copy bandwidth), MLA's q / kv_a 12.0 against
14.7, an MLP's gate / up 6.7 against 10.5. A single projection with few output rows (o_proj, down_proj) leaves too
few programs for 132 SMs without a split over K and stays a module call for bf16 weights (``kinds`` of
:func:`kernels.linears`).

Int8 weights (torchao's weight-only layout, :func:`quantization.int8_rows`) are read as int8 by every decode
projection, one byte a weight, where torchao's own product would first write the weight out in bf16.

Math: ``y[m, n] = sum_k x[m, k] W[n, k]``, fp32 accumulation (``tl.dot`` over 16-row blocks of tokens, padded;
for fp32 inputs ``input_precision="ieee"``, never TF32), rounded once to x's dtype: what ``nn.Linear`` computes up
to the order of the fp32 sum. Nothing reads back to the host (CUDA-graph capturable).

Nothing imports this module unless :func:`kernels.linears` chose it for CUDA tensors; the modules' own calls stay
the reference and the CPU path, and serve every module that is not a plain ``nn.Linear`` (adapters, other
quantized formats, hooks: see :func:`kernels.linear_kind`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # in a try block, transformers' remote-code check does not ask for triton where these kernels never run
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError("the multi-linear decode kernel needs triton: pip install triton") from exc

from . import pdl
from .pdl import launch_options  # noqa: F401  (this form: transformers copies pdl.py into checkpoints)
from .launch_resources import arrival_counters, sm_count
from .kernels import MULTI_LINEAR_SLOTS as MAX_SLOTS  # (x, W) pairs one launch takes

BLOCK_M = 16  # tl.dot's smallest M: the tokens of a step, padded
# 64 rows x 128 of K, 3 stages: KDA's six projections from x in 38.5 us on an H100 against 49.0 for 32 x 128 x 4
# stages and 50.1 for the cuBLAS calls (gpu_check.py --only mlinear, docs/benchmarks.md) - measured before the
# shared K (K_ALL) let the loads pipeline; with it, 4 warps keep 8 bytes on the stack on sm_90 and 8 warps none,
# so 8 warps (not yet timed)
TILE = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}
# int8 weights: the same 16 KB of weight per tile and stage (64 rows x 256 one-byte values), 8 warps (no spills on
# sm_90); not yet timed on a GPU. Either tile narrows to 32 or 16 rows when the launch would otherwise leave SMs
# idle (a single o_proj or down_proj: 2304 rows = 36 tiles of 64).
INT8_TILE = {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Split over K for a single projection with few output rows and a long K (o_proj, down_proj: 2304 rows, K >= 4096):
# with 16-row tiles it is 144 programs of 128 KB (bf16) for 132 SMs, so a dozen SMs read twice what the others do.
# K is cut into SPLIT_PARTS ranges, each program adding its range into an fp32 workspace and the last one of a tile
# summing the parts (``_multi_linear``). KDA's o_proj alone on an H100 (gpu_check --only mlinear), us: int8 weights
# 18.2 unsplit, 14.6 in 4 parts with 8 warps, 10.5 in 4 parts with 4 warps (10.2 with 32-row tiles); bf16 weights
# 18.4 / 14.9 / 10.4 against 8.4 for cuBLAS (so bf16 o_proj stays a module call). The pair gate + up of the shared
# expert (K = 2304, split in 8 with 8 warps) ran 10.5 us against 6.7 unsplit: groups and short K are not split.
SPLIT_MIN_K = 4096
SPLIT_PARTS = 4
SPLIT_TILE = {"num_warps": 4}
# One token: each program multiplies its weight tile by x element by element in fp32 and sums the rows once after the
# K loop (``GEMV``), instead of padding x to 16 rows for ``tl.dot``. At batch 1 the padded dot
# spends 15 of every 16 tensor-core rows on zeros and stages x and the weight tile through shared memory; the
# element-wise form reads the weight straight into registers. Aimed at the int8 projections that run far from the
# copy bandwidth through the dot (KDA o_proj alone: 10.5 us for 9.4 MB on an H100 against 8.4 for bf16 cuBLAS over
# twice the bytes) and an int8 lm_head. Its loop is not software-pipelined by default (sm_90 SASS: plain loads into
# registers, one K block in flight a warp) and holds more registers than the dot form, so its bytes in flight come
# from the programs an SM holds; a tile's ``GEMV_STAGES`` pipelines its loads (cp.async, at the cost of layout
# shuffles in the SASS). Off until timed: ``gpu_check --only mlinear`` compares the forms.
GEMV_ONE_TOKEN = False
GEMV_STAGES = 1  # the GEMV form's pipelining depth unless the tile gives ``GEMV_STAGES`` (1: its loads unpipelined)
# Launched with programmatic dependent launch (:mod:`pdl`), each program asks L2 for the first PREFETCH_LINES
# 128-byte lines of each of its weight rows (two K blocks of bf16 weights, four of int8) while the previous kernel
# finishes; not yet timed.
PREFETCH_LINES = 4


def multi_linear(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    scales: Sequence[torch.Tensor] | None = None,
    zeros: Sequence[torch.Tensor] | None = None,
    tile: dict | None = None,
) -> list[torch.Tensor]:
    """``[x_i @ W_i.T for (x_i, W_i) in pairs]`` in one launch.

    Each ``x_i`` is ``[..., K_i]`` with the same leading shape (the tokens), each ``W_i`` a contiguous
    ``[N_i, K_i]``; x's of one dtype (bf16, fp16 or fp32) and the W's of that dtype too, or int8 with ``scales``
    (one fp32 ``[N_i]`` or ``[N_i, 1]`` per pair) and optionally ``zeros`` (int8, shaped like the scales):
    ``W = (q - zero) * scale`` per row, torchao's int8 weight-only layout. The int8 values are widened to x's dtype
    in registers (exact) and each row's fp32 sum is multiplied by its scale: one byte read a weight. Returns
    ``[..., N_i]`` tensors in x's dtype. ``tile`` overrides :data:`TILE` / :data:`INT8_TILE` (benchmarks); its
    ``"GEMV"`` key picks the element-wise form for one token (default: :data:`GEMV_ONE_TOKEN`).
    """
    if not 1 <= len(pairs) <= MAX_SLOTS:
        raise ValueError(f"multi_linear takes 1 to {MAX_SLOTS} (x, W) pairs, got {len(pairs)}")
    quant = scales is not None
    if (quant and len(scales) != len(pairs)) or (zeros is not None and (not quant or len(zeros) != len(pairs))):
        raise ValueError("scales (and zeros) must come with int8 weights, one per pair")
    lead = pairs[0][0].shape[:-1]
    dtype = pairs[0][0].dtype
    weight_dtype = torch.int8 if quant else dtype
    flat, dims = [], []
    for i, (x, w) in enumerate(pairs):
        if x.shape[:-1] != lead or w.dim() != 2 or w.shape[1] != x.shape[-1]:
            raise ValueError(f"pair {i}: expected x [..., K] with leading shape {tuple(lead)} and W [N, K]; got "
                             f"{tuple(x.shape)} and {tuple(w.shape)}")
        if x.dtype != dtype or w.dtype != weight_dtype or dtype not in DTYPES:
            raise ValueError(f"pair {i}: x must share one of {DTYPES} with the other pairs and W be {weight_dtype}; "
                             f"got {x.dtype}, {w.dtype}")
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        scale = zero = x2  # placeholders the kernel never reads
        if quant:
            scale = scales[i].reshape(-1).float().contiguous()
            zero = scale if zeros is None else zeros[i].reshape(-1).contiguous()
            if scale.numel() != w.shape[0] or zero.numel() != w.shape[0]:
                raise ValueError(f"pair {i}: expected {w.shape[0]} scales (and zero points), got {scale.numel()}")
        flat.append((x2, w.contiguous(), scale, zero))
        dims.append(w.shape[0])
    tokens = flat[0][0].shape[0]
    device = flat[0][0].device
    tile = choose_tile(dims, quant, device, tile, k=max(w.shape[1] for _, w, _, _ in flat))
    outs = [torch.empty(tokens, n, dtype=dtype, device=device) for n in dims]
    if tokens == 0:
        return [y.view(*lead, n) for y, n in zip(outs, dims)]
    ends, total = [], 0
    for n in dims:
        total += triton.cdiv(n, tile["BLOCK_N"])
        ends.append(total)
    args = []
    for i in range(MAX_SLOTS):
        j = min(i, len(flat) - 1)  # unused slots repeat the last pair; no program reaches them
        x2, w, scale, zero = flat[j]
        args += [x2, w, outs[j], scale, zero, w.shape[0], w.shape[1], x2.stride(0)]
    ends += [total] * (MAX_SLOTS - len(ends))
    precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    ks, strides = {w.shape[1] for _, w, _, _ in flat}, {x2.stride(0) for x2, _, _, _ in flat}
    gemv = tokens == 1 and bool(tile.get("GEMV", GEMV_ONE_TOKEN))
    block_m = 1 if gemv else BLOCK_M
    m_blocks, split = triton.cdiv(tokens, block_m), tile.get("SPLIT", 1)
    counters = arrival_counters(device, total * m_blocks) if split > 1 else None
    if counters is None:
        split = 1
    workspace = (torch.empty(split, m_blocks * block_m, total * tile["BLOCK_N"], dtype=torch.float32, device=device)
                 if split > 1 else outs[0])
    _multi_linear[(total, m_blocks, split)](
        *args, *ends[:-1], tokens, workspace, counters if counters is not None else outs[0],
        QUANT=quant, HAS_ZERO=zeros is not None,
        K_ALL=ks.pop() if len(ks) == 1 else 0, SX_ALL=strides.pop() if len(strides) == 1 else 0,
        BLOCK_M=block_m, BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"], SPLIT=split, PRECISION=precision,
        GEMV=gemv, LOOP_STAGES=tile.get("GEMV_STAGES", GEMV_STAGES) if gemv else tile["num_stages"],
        PREFETCH=PREFETCH_LINES, num_warps=tile["num_warps"], num_stages=tile["num_stages"],
        **pdl.launch_options(device),
    )
    return [y.view(*lead, n) for y, n in zip(outs, dims)]


def choose_tile(dims: Sequence[int], quant: bool, device: torch.device, given: dict | None = None,
                k: int | None = None) -> dict:
    """:data:`TILE` or :data:`INT8_TILE` with ``given`` on top; without a given ``BLOCK_N``, the row block halves
    (down to 16) while the launch's ``sum(ceil(N_i / BLOCK_N))`` programs would leave SMs of ``device`` idle; then,
    without a given ``SPLIT``, a single weight still in 16-row tiles with ``k >= SPLIT_MIN_K`` is split over K in
    :data:`SPLIT_PARTS` with :data:`SPLIT_TILE` (measured faster only there, see above)."""
    given = given or {}
    tile = {**(INT8_TILE if quant else TILE), "SPLIT": 1, **given}
    if "BLOCK_N" not in given:
        sms = sm_count(device)
        while tile["BLOCK_N"] > 16 and sum(triton.cdiv(n, tile["BLOCK_N"]) for n in dims) < sms:
            tile["BLOCK_N"] //= 2
    if "SPLIT" not in given and len(dims) == 1 and k is not None and k >= SPLIT_MIN_K and tile["BLOCK_N"] == 16:
        tile = {**tile, **SPLIT_TILE, "SPLIT": SPLIT_PARTS, **given}  # what the caller gave still wins
    return tile


_SLOT_ARGS = [f"{name}{i}" for i in range(MAX_SLOTS) for name in ("n", "k", "sx")] + [f"e{i}" for i in range(5)]


@triton.jit(do_not_specialize=_SLOT_ARGS + ["M"])  # sizes stay runtime ints: the slot chosen below merges them
def _multi_linear(
    x0, w0, y0, s0, z0, n0, k0, sx0, x1, w1, y1, s1, z1, n1, k1, sx1, x2, w2, y2, s2, z2, n2, k2, sx2,
    x3, w3, y3, s3, z3, n3, k3, sx3, x4, w4, y4, s4, z4, n4, k4, sx4, x5, w5, y5, s5, z5, n5, k5, sx5,
    e0, e1, e2, e3, e4, M, ws, cnt, QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, K_ALL: tl.constexpr,
    SX_ALL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    PRECISION: tl.constexpr, GEMV: tl.constexpr, LOOP_STAGES: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    """y_s[rows, feats] = x_s[rows] W_s[feats]^T for the slot s whose block range holds program_id(0) (QUANT: W_s
    = (q - z) * s per row, the scale applied to the fp32 sums). ``K_ALL`` / ``SX_ALL`` (non-zero): the K and the x
    row stride every slot shares, as compile-time constants. Only with them does the compiler know that rows start
    on 16-byte boundaries: it then loads whole vectors through pipelined asynchronous copies, where runtime sizes
    (not specialised: the slots' values are merged at run time) leave one scalar load per element and no
    pipelining (sm_90 PTX of the KDA launch: 80 ``ld.global.b16`` against ``cp.async`` copies).

    ``SPLIT > 1``: program_id(2) takes one of SPLIT ranges of whole K blocks and stores its fp32 sums in its plane
    of ``ws`` ``[SPLIT, rows, programs * BLOCK_N]``; after a barrier it counts itself in at ``cnt[tile]`` (an
    acquire-release atomic: every plane stored before a program's arrival is visible to the program that arrives
    after it). The last to arrive adds the SPLIT planes (read past L1), scales, stores y and resets the counter.

    PDL (:mod:`pdl`): the program asks L2 for the first PREFETCH lines of its weight rows, then waits for the
    previous kernel before it touches anything else.

    ``GEMV`` (one token, ``BLOCK_M == 1``): ``products[n, k] += W[n, k] * x[k]`` in fp32 over the K loop (each product
    exact: an int8 or 16-bit weight times a 16-bit x), rows summed once after it; no ``tl.dot``. ``LOOP_STAGES``: the
    K loop's software-pipelining depth, the launch's ``num_stages`` for the dot form (what a plain ``range`` gets);
    for GEMV the tile's ``GEMV_STAGES`` (default :data:`GEMV_STAGES`, 1: loads not pipelined, as a plain ``range``
    leaves them)."""
    pdl.begin(PDL)
    pid = tl.program_id(0)
    x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x0, w0, y0, s0, z0, n0, k0, sx0, e0 * 0
    if pid >= e0:
        x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x1, w1, y1, s1, z1, n1, k1, sx1, e0
    if pid >= e1:
        x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x2, w2, y2, s2, z2, n2, k2, sx2, e1
    if pid >= e2:
        x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x3, w3, y3, s3, z3, n3, k3, sx3, e2
    if pid >= e3:
        x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x4, w4, y4, s4, z4, n4, k4, sx4, e3
    if pid >= e4:
        x_ptr, w_ptr, y_ptr, s_ptr, z_ptr, N, K, sx, first = x5, w5, y5, s5, z5, n5, k5, sx5, e4
    if K_ALL > 0:
        K = K_ALL
    if SX_ALL > 0:
        sx = SX_ALL
    feats = (pid - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    feat_ok = feats < N
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * sx + kk[None, :]
    w_rows = w_ptr + feats.to(tl.int64)[:, None] * K + kk[None, :]
    k_lo, k_hi = 0, K
    if SPLIT > 1:
        k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT) * BLOCK_K
        k_lo = tl.program_id(2) * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
    pdl.prefetch_rows(w_ptr + feats.to(tl.int64) * K + k_lo, feat_ok, k_hi - k_lo, PREFETCH, PDL)
    pdl.wait(PDL)
    if HAS_ZERO:
        zero = tl.load(z_ptr + feats, mask=feat_ok, other=0).to(tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    products = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # GEMV's running products (unused otherwise)
    for k0_ in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
        k_ok = (k0_ + kk) < K
        xt = tl.load(x_rows + k0_, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + k0_, mask=feat_ok[:, None] & k_ok[None, :], other=0)
        if HAS_ZERO:
            wt = wt.to(tl.int32) - zero[:, None]
        if GEMV:
            products += wt.to(xt.dtype).to(tl.float32) * xt.to(tl.float32)  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
        else:
            acc = tl.dot(xt, tl.trans(wt.to(xt.dtype)), acc, input_precision=PRECISION)
    if GEMV:
        acc = tl.sum(products, 1)[None, :]
    dest = y_ptr + rows.to(tl.int64)[:, None] * N + feats[None, :]
    if SPLIT == 1:
        if QUANT:
            acc = acc * tl.load(s_ptr + feats, mask=feat_ok, other=0.0)[None, :]
        tl.store(dest, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & feat_ok[None, :])
    else:
        width = tl.num_programs(0) * BLOCK_N
        plane = tl.num_programs(1) * BLOCK_M * width
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        ws_tile = ws + rows.to(tl.int64)[:, None] * width + cols[None, :]
        tl.store(ws_tile + tl.program_id(2) * plane, acc)
        tl.debug_barrier()  # every thread's part stored before the arrival below releases them
        tile = pid * tl.num_programs(1) + tl.program_id(1)
        arrived = tl.atomic_add(cnt + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for part in tl.static_range(SPLIT):
                total += tl.load(ws_tile + part * plane, cache_modifier=".cg")
            if QUANT:
                total = total * tl.load(s_ptr + feats, mask=feat_ok, other=0.0)[None, :]
            tl.store(dest, total.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & feat_ok[None, :])
            tl.atomic_xchg(cnt + tile, 0)
