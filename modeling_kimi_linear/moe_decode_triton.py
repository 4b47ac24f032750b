"""Triton kernels for the mixture of experts at decode time: a few tokens (batch 1-64, one token each), CUDA only.

Nothing imports this module unless :func:`kernels.moe_decode_kernels` resolved to Triton for CUDA tensors; the
PyTorch code in :mod:`moe` (``KimiMoEGate.forward``, ``KimiExperts.forward``) is the reference and the CPU path.

What the PyTorch path launches per MoE layer for a decode step on CUDA: the router is about 11 kernels (fp32
copies of x and of the router weight, linear, sigmoid, bias add, top-k, gather, sum, add, divide, scale) and the
experts about 17 (argsort, division, zeros, scatter_add, gather of x, cumsum, cast, two ``grouped_mm`` over all E
experts, activation, product, casts, gather of the weights, product, zeros, index_add). ``grouped_mm`` walks all
256 groups, nearly all empty at batch 1, and is not built for a 1-16 row GEMV. Here the same work is 4 or 5
launches, none reading anything back to the host (CUDA-graph capturable):

* :func:`route` (1 kernel): ``_router_logits`` computes the fp32 logits from x and the router weight in their own
  dtypes (each tile is converted in registers; no fp32 copy of the weight is written); the last of its programs
  for a block of tokens (an arrival counter, :mod:`launch_resources`) then does per token what ``KimiMoEGate``
  does after the linear (``_select``): sigmoid (or softmax), + ``e_score_correction_bias``, grouped top-k (groups
  ranked by the sum of their two best biased scores, the other groups' scores replaced by 0.0), top-k, gather of
  the weights with or without the bias, renormalisation, scaling. (``_router_select``, one program a token, does
  the selection as a second launch where no counters can be had: a CUDA-graph capture that would allocate them.)
* :func:`experts` (4 kernels):

  1. ``_group_copies`` (one program): sorts the N*k token-expert copies by expert (``tl.sort`` on
     ``expert * CP + copy``), counts copies per expert (``tl.histogram``) and writes one *group* per distinct
     expert: its id, its first position in the sorted order and its number of copies. The grid of the next two
     kernels has ``G = min(N*k, E)`` group slots, fixed by the shapes; slots past the number of distinct experts
     have 0 copies and do nothing.
  2. ``_gate_up``: program ``(g, j)`` computes columns ``[j*BN, (j+1)*BN)`` of
     ``h = act(W_gate[e] x) * (W_up[e] x)`` for *all* copies of group g: the copies are the rows of a small
     matrix (M padded to 16 for ``tl.dot``; a group with more than 16 copies loops over row blocks, re-reading
     the same weight tile, then mostly from L2) and the expert's 2 x BN weight rows stream once through the
     K loop. fp32 accumulation; h is stored in x's dtype, in sorted order.
  3. ``_down``: program ``(g, j)`` computes output features ``[j*BN, (j+1)*BN)`` of ``W_down[e] h`` for all
     copies of group g, multiplies each row by its routing weight (fp32) and stores it, fp32, at the copy's
     original index ``t*k + j``.
  4. ``_sum_copies``: ``out[t] = sum_j ys[t*k + j]`` in fp32, written in x's dtype (deterministic: no atomics).

  With one token (batch-1 decode) its k distinct experts already are the groups, in copy order: ``_group_copies``
  is not launched and the two GEMV kernels read group g from ``ids[g]`` directly (``DIRECT``).

Each chosen expert's weights are read once per step however many tokens of the batch chose it.

The shared expert (a SwiGLU MLP of the routed experts' width, run on every token: :class:`SharedExpert`) can join
these launches as one more group: its N copies (one per token, routing weight 1) take the last group slot, whose
programs read its own weight tensors, and ``_sum_copies`` adds its row. Apart, it is five launches of its own
(cuBLAS gate and up, activation, product, down) plus the add; at batch 1 each of them is a few microseconds for 14 MB
of weights (docs/benchmarks.md).

Bytes at the release's width (D = 2304, I = 1024, bf16; one expert is 3 x 2304 x 1024 x 2 B = 14.16 MB): batch 1
touches 8 experts, 113.2 MB a layer (75.5 MB gate/up + 37.7 MB down): 37.7 us at an H100's ~3.0 TB/s copy
bandwidth, 26.3 us at an H200's ~4.3 TB/s. A batch of B tokens reads 14.16 MB per *distinct* expert it routes to
(uniform routing touches ``1 - (1 - 8/256)**B`` of them: 25% at B = 9, 64% at B = 32). Everything else is small:
the router weight (256 x 2304 x 2 B = 1.2 MB), x, h (N*k x I), ys (N*k x D fp32: 74 KB at batch 1).

Tiling (defaults in :data:`GATE_UP_TILE` / :data:`DOWN_TILE`; no autotuning, which could run inside a CUDA-graph
capture): gate/up 16 rows of W_gate plus the 16 matching rows of W_up per program, K blocks of 128 -> at batch 1,
8 x 64 = 512 programs of 147 KB each; down 32 rows per program, K blocks of 128 -> 8 x 72 = 576 programs of 64 KB.
Several hundred programs with 4-stage software pipelining keep enough loads in flight on 132 SMs to stream HBM;
``bench/gpu_check.py --only moe`` measures the achieved bandwidth, ``--only moetiles`` also tries a few other tiles.
The widths D and I are compile-time constants (one compilation per model width); the single-program kernels
(grouping, selection) run one warp, so their sorts and reductions are warp shuffles.

Numerics: products accumulate in fp32 (``tl.dot``; for fp32 inputs with ``input_precision="ieee"``, so never
TF32); the activation and the gate x up product are fp32 and rounded once to x's dtype (the PyTorch path rounds
each of gate, up, act(gate) and their product); the routing weight multiplies the fp32 down product (the PyTorch
path rounds it to x's dtype first). Differences to the PyTorch path are therefore of the order of x's rounding.
The router's logits are fp32 sums in a different order from cuBLAS': the expert choice is the same whenever the
scores are not within a few fp32 ulps of each other (ties are broken differently by any two implementations).

Preconditions (not checked on the device; checking would read back to the host): expert ids in ``[0, E)`` and,
per token, distinct (what top-k gives).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # in a try block, transformers' remote-code check does not ask for triton where these kernels never run
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError("the MoE decode kernels need triton: pip install triton") from exc

from . import pdl
from .pdl import launch_options  # noqa: F401  (this form: transformers copies pdl.py into checkpoints)
from .launch_resources import arrival_counters

# activations the kernels implement (names as in ``transformers.activations.ACT2FN``; both are x * sigmoid(x))
ACTIVATIONS = ("silu", "swish")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_M = 16  # copies per row block of the expert GEMVs (tl.dot's smallest M)
GATE_UP_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
DOWN_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
SUM_BLOCK = 256  # output features per program of _sum_copies
# One token (batch-1 decode: every group holds one copy): the expert kernels multiply each weight tile by the copy's
# row element by element in fp32 and sum the rows after the K loop (``GEMV``), instead of padding the row to
# BLOCK_M for ``tl.dot``, whose other 15 rows are zeros staged through shared memory with the weights. Aimed at the
# int8 weights (62% of the copy bandwidth at batch 1 on an H100 against ~80% for bf16). Its loop is not
# software-pipelined (plain loads into registers) and holds more registers (sm_90: 119 against 80 for int8
# ``_gate_up``); off until timed (``gpu_check --only moeint8`` compares the forms).
GEMV_ONE_TOKEN = False
# The K loops' software-pipelining depth in the GEMV form (the dot form takes the tile's ``num_stages``, what a plain
# ``range`` gets): 1 leaves its loads unpipelined, as a plain ``range`` does; deeper pipelines them (cp.async) at the
# cost of layout shuffles. Swept by ``gpu_check --only moeint8``.
GEMV_STAGES = 1
ROUTER_BLOCK_E = 8  # experts per program of _router_logits
# At one or two tokens: 2 experts a program and K blocks of up to 1024, so 128 programs of 3 steps for the
# release's 256 x 2304 weight. With 8 experts a program (32 programs of 9 dependent 256-wide steps) the kernel took
# 11.3 us a layer in an H100 profile for 1.2 MB of weight (~4% of the copy bandwidth: load latency, not bytes);
# the narrower tile took 9.4 us against 13.7 for the wider one (bench/gpu_check.py --only moe, H100, 2026-12-07).
ROUTER_DECODE_BLOCK_E = 2
ROUTER_DECODE_BLOCK_D = 1024
# Warps a program of the router at one or two tokens (Triton's default, 4, elsewhere). The selection that the last
# program runs is 8 serial arg-max + sum reductions over the 256 scores: with 4 warps each crosses warps through
# shared memory, 57 barriers in the sm_90 SASS; with 1 warp they are shuffles (4 barriers), and the logits' loads
# are 4x wider a thread (``bench/kernel_sass.py --kernels router``). Not yet timed: ``gpu_check --only moe`` sweeps it.
ROUTER_DECODE_WARPS = 4
# The expert selection runs in the logits kernel's last program of each block of tokens (an arrival counter) rather
# than as a second launch: one launch fewer per MoE layer and step. On an H100 (2026-12-07) it chose the same
# experts as the PyTorch path at batch 1, 8 and 32; its time apart from the logits' is not measured.
FUSED_SELECT = True


def experts_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, activation: str) -> bool:
    """Whether :func:`experts` computes what ``KimiExperts.forward`` would for these inputs: x of a floating dtype
    (bf16, fp16, fp32) and both weights of that dtype or both int8 (torchao's per-row int8 data, given with their
    scales: :mod:`quantized_experts`), an activation it implements, and no autocast to another dtype (the PyTorch
    path would cast the weights)."""
    dtype = x.dtype
    weight_dtype = dtype if gate_up.dtype != torch.int8 else torch.int8
    if dtype not in DTYPES or gate_up.dtype != weight_dtype or down.dtype != weight_dtype:
        return False
    if activation not in ACTIVATIONS:
        return False
    return not torch.is_autocast_enabled(x.device.type) or torch.get_autocast_dtype(x.device.type) == dtype


def route_supported(x: torch.Tensor) -> bool:
    """Whether :func:`route` computes what ``KimiMoEGate.forward`` would: not under autocast (which would run the
    PyTorch router's linear in the autocast dtype; :func:`route` always sums in fp32)."""
    return not torch.is_autocast_enabled(x.device.type)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


class SharedExpert(NamedTuple):
    """A shared expert for :func:`experts` to compute in the same launches as the routed ones (its output added to
    theirs in fp32): ``gate`` and ``up`` ``[I, D]``, ``down`` ``[D, I]`` (``nn.Linear`` weights), contiguous, of
    the routed weights' dtype. With int8 routed weights they are int8 too, ``scales`` their three fp32 row scales
    (``[I]``, ``[I]``, ``[D]``, any shape of that size) and ``zeros`` their zero points where the routed weights have
    them."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    zeros: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    activation: str = "silu",
    *,
    gate_up_tile: dict | None = None,
    down_tile: dict | None = None,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    gate_up_zero: torch.Tensor | None = None,
    down_zero: torch.Tensor | None = None,
    shared: SharedExpert | None = None,
) -> torch.Tensor:
    """``sum_j weights[t, j] * down[e] (act(gate[e] x_t) * up[e] x_t)`` with ``e = ids[t, j]``, fp32 accumulation,
    returned in ``x.dtype``: what ``KimiExperts.forward`` computes.

    ``x [N, D]``, ``ids [N, k]`` (integer), ``weights [N, k]``, ``gate_up [E, 2I, D]`` (gate rows first),
    ``down [E, D, I]``. ``gate_up_tile`` / ``down_tile`` override :data:`GATE_UP_TILE` / :data:`DOWN_TILE`
    (benchmarks).

    Int8 weights (torchao's per-row int8 layout, see :mod:`quantized_experts`): ``gate_up`` / ``down`` are the int8
    data and ``*_scale`` (``[E, N]`` or ``[E, N, 1]``, fp32) and optionally ``*_zero`` (int8, same shape) give
    ``W[e, n, k] = (q[e, n, k] - zero[e, n]) * scale[e, n]``. Each tile of int8 values is widened to x's dtype in
    registers (exact: integers up to 255 in magnitude are exact in bf16), the products accumulate in fp32, and
    each output row's sum is multiplied by its fp32 scale once: one byte read per weight, nothing dequantized in
    memory.

    ``shared`` (:class:`SharedExpert`) adds ``down_s (act(gate_s x_t) * up_s x_t)`` for every token: one more group
    in the same launches (what ``KimiSparseMoeBlock`` adds as a separate SwiGLU MLP of five or six launches)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not implemented here; choose from {ACTIVATIONS}")
    if x.dim() != 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"expected x [N, D], ids and weights [N, k]; got {tuple(x.shape)}, {tuple(ids.shape)}, "
                         f"{tuple(weights.shape)}")
    num_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    if x.shape[1] != hidden or two_i != 2 * inter or tuple(down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"expected gate_up [E, 2I, D] and down [E, D, I] with D = {x.shape[1]}; got "
                         f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    quant = gate_up_scale is not None
    if quant != (down_scale is not None) or (gate_up_zero is not None) != (down_zero is not None):
        raise ValueError("give scales (and zero points) for both expert weights or for neither")
    weight_dtype = torch.int8 if quant else x.dtype
    if not (gate_up.dtype == down.dtype == weight_dtype) or x.dtype not in DTYPES:
        raise ValueError(f"x must be one of {DTYPES} and the expert weights {weight_dtype} (int8 with scales); got "
                         f"{x.dtype}, {gate_up.dtype}, {down.dtype}")
    qargs = {}
    for name, rows, scale, zero in (("gate_up", two_i, gate_up_scale, gate_up_zero), ("down", hidden, down_scale,
                                                                                      down_zero)):
        if not quant:
            qargs[name] = (x, x)  # placeholders the kernels never read
            continue
        scale = scale.reshape(num_experts, rows).float().contiguous()
        zero = (scale if zero is None else zero.reshape(num_experts, rows).contiguous())
        qargs[name] = (scale, zero)
    sargs = _shared_args(shared, x, gate_up, down, weight_dtype, quant, gate_up_zero is not None)
    num_tokens, top_k = ids.shape
    copies = num_tokens * top_k
    device = x.device
    if copies == 0 and shared is None:
        return x.new_zeros(num_tokens, hidden)
    has_shared = shared is not None
    x = x.contiguous()
    flat_ids = ids.reshape(-1).contiguous()
    flat_w = weights.reshape(-1).float().contiguous()
    slots = min(copies, num_experts) + has_shared
    rows = copies + num_tokens * has_shared  # token copies, then (shared) one copy of each token
    direct = num_tokens == 1  # one token's k distinct experts are the groups already: no grouping launch
    launch = pdl.launch_options(device)
    if direct:
        order = groups = flat_ids  # placeholders the kernels never read
    else:
        order = torch.empty(rows, dtype=torch.int32, device=device)
        groups = torch.empty(3, slots, dtype=torch.int32, device=device)  # expert, first sorted position, copies
        _group_copies[(1,)](
            flat_ids, order, groups, copies, num_tokens, num_experts, slots,
            CP=_pow2(copies), EP=_pow2(num_experts + 1), GP=_pow2(slots), SHARED=has_shared, NP=_pow2(num_tokens),
            num_warps=1, **launch,
        )
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    gemv = direct and GEMV_ONE_TOKEN  # one token: every group (the shared expert's too) holds one copy
    block_m = 1 if gemv else BLOCK_M
    tile = {**GATE_UP_TILE, **(gate_up_tile or {})}
    h = torch.empty(rows, inter, dtype=x.dtype, device=device)
    _gate_up[(slots, triton.cdiv(inter, tile["BLOCK_N"]))](
        x, gate_up, *qargs["gate_up"], *sargs["gate_up"], groups, flat_ids, order, h, hidden, inter,
        slots, top_k, copies, num_tokens,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2),
        QUANT=quant, HAS_ZERO=gate_up_zero is not None, SHARED=has_shared, DIRECT=direct,
        BLOCK_M=block_m, BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"], PRECISION=precision, GEMV=gemv,
        LOOP_STAGES=GEMV_STAGES if gemv else tile["num_stages"],
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], **launch,
    )
    tile = {**DOWN_TILE, **(down_tile or {})}
    ys = torch.empty(rows, hidden, dtype=torch.float32, device=device)
    _down[(slots, triton.cdiv(hidden, tile["BLOCK_N"]))](
        h, down, *qargs["down"], *sargs["down"], groups, flat_ids, order, flat_w, ys, hidden, inter,
        slots, copies, num_tokens,
        down.stride(0), down.stride(1), down.stride(2),
        QUANT=quant, HAS_ZERO=down_zero is not None, SHARED=has_shared, DIRECT=direct,
        BLOCK_M=block_m, BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"], PRECISION=precision, GEMV=gemv,
        LOOP_STAGES=GEMV_STAGES if gemv else tile["num_stages"],
        num_warps=tile["num_warps"], num_stages=tile["num_stages"], **launch,
    )
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    _sum_copies[(num_tokens, triton.cdiv(hidden, SUM_BLOCK))](
        ys, out, hidden, copies, TOP_K=top_k, KP=_pow2(top_k), SHARED=has_shared, BLOCK=SUM_BLOCK, **launch,
    )
    return out


def _shared_args(shared: SharedExpert | None, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 weight_dtype: torch.dtype, quant: bool, has_zero: bool) -> dict[str, tuple[torch.Tensor, ...]]:
    """The shared expert's kernel arguments (weights, scales, zero points; ``x`` as placeholders the kernels never
    read), after checking that it matches the routed weights (:class:`SharedExpert`)."""
    if shared is None:
        return {"gate_up": (x,) * 6, "down": (x,) * 3}
    inter, hidden = gate_up.shape[1] // 2, gate_up.shape[2]
    want = ((inter, hidden), (inter, hidden), (hidden, inter))
    got = tuple(tuple(w.shape) for w in shared[:3])
    if got != want or any(w.dtype != weight_dtype or not w.is_contiguous() for w in shared[:3]):
        raise ValueError(f"the shared expert must be contiguous {weight_dtype} gate / up {want[0]} and down "
                         f"{want[2]} (the routed experts' dtype and widths); got {got}, "
                         f"{[w.dtype for w in shared[:3]]}")
    if gate_up.stride(2) != 1 or down.stride(2) != 1:
        raise ValueError("a shared expert needs routed expert weights with contiguous rows (last stride 1)")
    if (shared.scales is not None) != quant or (shared.zeros is not None) != has_zero:
        raise ValueError("give the shared expert scales (and zero points) exactly where the routed experts have them")
    if not quant:
        return {"gate_up": (shared.gate, shared.up) + (x,) * 4, "down": (shared.down, x, x)}
    sizes = (inter, inter, hidden)
    scales = [s.reshape(n).float().contiguous() for s, n in zip(shared.scales, sizes)]
    zeros = scales if shared.zeros is None else [z.reshape(n).contiguous() for z, n in zip(shared.zeros, sizes)]
    return {"gate_up": (shared.gate, shared.up, scales[0], scales[1], zeros[0], zeros[1]),
            "down": (shared.down, scales[2], zeros[2])}


@triton.jit
def _group_copies(ids_ptr, order_ptr, groups_ptr, C, N, E, G, CP: tl.constexpr, EP: tl.constexpr,
                  GP: tl.constexpr, SHARED: tl.constexpr, NP: tl.constexpr, PDL: tl.constexpr):
    """Sort the C copies by expert (stable); one group per distinct expert, in increasing expert order, in the
    first ``G - SHARED`` slots. SHARED: the last slot is the shared expert's group (start C, N copies), and the
    sorted order goes on with the copies ``C + t`` of the N tokens."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    c = tl.arange(0, CP)
    valid = c < C
    expert = tl.load(ids_ptr + c, mask=valid, other=E).to(tl.int32)  # padding sorts last, counts in bin E
    key = tl.sort(expert * CP + c)
    tl.store(order_ptr + c, key % CP, mask=valid)
    bins = tl.arange(0, EP)
    counts = tl.where(bins < E, tl.histogram(expert, EP), 0)
    starts = tl.cumsum(counts, 0) - counts
    used = counts > 0
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    num_groups = tl.sum(used.to(tl.int32), 0)
    tl.store(groups_ptr + rank, bins, mask=used)
    tl.store(groups_ptr + G + rank, starts, mask=used)
    tl.store(groups_ptr + 2 * G + rank, counts, mask=used)
    slot = tl.arange(0, GP)
    empty = (slot >= num_groups) & (slot < G - SHARED)
    zero = tl.zeros([GP], dtype=tl.int32)
    tl.store(groups_ptr + slot, zero, mask=empty)
    tl.store(groups_ptr + G + slot, zero, mask=empty)
    tl.store(groups_ptr + 2 * G + slot, zero, mask=empty)
    if SHARED:
        t = tl.arange(0, NP)
        tl.store(order_ptr + C + t, C + t, mask=t < N)
        tl.store(groups_ptr + G - 1, 0)
        tl.store(groups_ptr + 2 * G - 1, C)
        tl.store(groups_ptr + 3 * G - 1, N)


@triton.jit
def _program_group(groups_ptr, ids_ptr, G, C, N, DIRECT: tl.constexpr, SHARED: tl.constexpr):
    """This program's group (``program_id(0)``): its expert, first sorted position and number of copies. DIRECT
    (one token: its k distinct experts are the groups, in copy order, and no grouping kernel ran): group g is copy
    g of ``ids``, and the shared expert's group (SHARED: the last) starts at C with N copies."""
    g = tl.program_id(0)
    if DIRECT:
        shared = (g == G - 1) & SHARED
        expert = tl.load(ids_ptr + tl.minimum(g, C - 1)).to(tl.int64)
        return tl.where(shared, 0, expert), tl.where(shared, C, g), tl.where(shared, N, 1)
    else:
        return tl.load(groups_ptr + g).to(tl.int64), tl.load(groups_ptr + G + g), tl.load(groups_ptr + 2 * G + g)


@triton.jit
def _copy_index(order_ptr, start, rows, row_ok, DIRECT: tl.constexpr):
    """The copies at sorted positions ``start + rows`` (DIRECT: the positions themselves)."""
    if DIRECT:
        return start + rows
    else:
        return tl.load(order_ptr + start + rows, mask=row_ok, other=0)


@triton.jit
def _gate_up(
    x_ptr, w_ptr, scale_ptr, zero_ptr, sw_gate_ptr, sw_up_ptr, s_scale_gate_ptr, s_scale_up_ptr, s_zero_gate_ptr,
    s_zero_up_ptr, groups_ptr, ids_ptr, order_ptr, h_ptr, D: tl.constexpr, I: tl.constexpr,
    G, TOP_K, C, N,
    stride_x, stride_we, stride_wn, stride_wk,
    QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, SHARED: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr,
    LOOP_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """h[sorted copy, cols] = silu(W_gate[e] x) * (W_up[e] x) for the copies of one group and BLOCK_N columns
    (QUANT: W = (q - zero) * scale per row, the scale applied to the fp32 sums). SHARED: the last group is the
    shared expert (contiguous ``[I, D]`` gate and up weights of their own, scales and zero points likewise), whose
    copy ``C + t`` is token t. GEMV (one copy a group, ``BLOCK_M == 1``): fp32 element-wise products of each weight
    tile with the row, summed after the K loop, instead of ``tl.dot``."""
    pdl.begin(PDL)
    pdl.wait(PDL)  # the expert ids are the router's output: nothing to prefetch before them
    expert, start, count = _program_group(groups_ptr, ids_ptr, G, C, N, DIRECT, SHARED)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    kk = tl.arange(0, BLOCK_K)
    w_gate = w_ptr + expert * stride_we + cols[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
    w_up = w_gate + I * stride_wn
    row_gate = expert * 2 * I + cols  # [E, 2I] index of each column's gate row (its up row is I further)
    if QUANT:
        scale_gate = tl.load(scale_ptr + row_gate, mask=col_ok, other=0.0)
        scale_up = tl.load(scale_ptr + row_gate + I, mask=col_ok, other=0.0)
    if HAS_ZERO:
        zero_gate = tl.load(zero_ptr + row_gate, mask=col_ok, other=0).to(tl.int32)
        zero_up = tl.load(zero_ptr + row_gate + I, mask=col_ok, other=0).to(tl.int32)
    if SHARED:
        if tl.program_id(0) == G - 1:
            w_gate = sw_gate_ptr + cols[:, None].to(tl.int64) * D + kk[None, :]
            w_up = sw_up_ptr + cols[:, None].to(tl.int64) * D + kk[None, :]
            if QUANT:
                scale_gate = tl.load(s_scale_gate_ptr + cols, mask=col_ok, other=0.0)
                scale_up = tl.load(s_scale_up_ptr + cols, mask=col_ok, other=0.0)
            if HAS_ZERO:
                zero_gate = tl.load(s_zero_gate_ptr + cols, mask=col_ok, other=0).to(tl.int32)
                zero_up = tl.load(s_zero_up_ptr + cols, mask=col_ok, other=0).to(tl.int32)
    m0 = 0
    while m0 < count:  # row blocks of BLOCK_M copies (while: Triton's interpreter cannot range() to a loaded bound)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < count
        copy = _copy_index(order_ptr, start, rows, row_ok, DIRECT)
        token = tl.where(copy < C, copy // TOP_K, copy - C)
        x_rows = x_ptr + token.to(tl.int64)[:, None] * stride_x + kk[None, :]
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        prod_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # GEMV's running products (unused otherwise)
        prod_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, D, BLOCK_K, num_stages=LOOP_STAGES):
            k_ok = (k0 + kk) < D
            xt = tl.load(x_rows + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = col_ok[:, None] & k_ok[None, :]
            wg = tl.load(w_gate + k0 * stride_wk, mask=w_ok, other=0)
            wu = tl.load(w_up + k0 * stride_wk, mask=w_ok, other=0)
            if HAS_ZERO:
                wg = wg.to(tl.int32) - zero_gate[:, None]
                wu = wu.to(tl.int32) - zero_up[:, None]
            if GEMV:  # int8 widened through x's dtype (exact), then fp32
                prod_gate += wg.to(xt.dtype).to(tl.float32) * xt.to(tl.float32)
                prod_up += wu.to(xt.dtype).to(tl.float32) * xt.to(tl.float32)
            else:
                acc_gate = tl.dot(xt, tl.trans(wg.to(xt.dtype)), acc_gate, input_precision=PRECISION)
                acc_up = tl.dot(xt, tl.trans(wu.to(xt.dtype)), acc_up, input_precision=PRECISION)
        if GEMV:
            acc_gate = tl.sum(prod_gate, 1)[None, :]
            acc_up = tl.sum(prod_up, 1)[None, :]
        if QUANT:
            acc_gate = acc_gate * scale_gate[None, :]
            acc_up = acc_up * scale_up[None, :]
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
        dest = h_ptr + (start + rows).to(tl.int64)[:, None] * I + cols[None, :]
        tl.store(dest, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        m0 += BLOCK_M


@triton.jit
def _down(
    h_ptr, w_ptr, scale_ptr, zero_ptr, sw_ptr, s_scale_ptr, s_zero_ptr, groups_ptr, ids_ptr, order_ptr, weights_ptr,
    ys_ptr, D: tl.constexpr, I: tl.constexpr,
    G, C, N,
    stride_we, stride_wn, stride_wk,
    QUANT: tl.constexpr, HAS_ZERO: tl.constexpr, SHARED: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, GEMV: tl.constexpr,
    LOOP_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """ys[copy, feats] = weight[copy] * (W_down[e] h[copy])[feats], fp32, for the copies of one group (QUANT, GEMV:
    as in _gate_up). SHARED: the last group is the shared expert (its own contiguous ``[D, I]`` weight), routing
    weight 1."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    expert, start, count = _program_group(groups_ptr, ids_ptr, G, C, N, DIRECT, SHARED)
    feats = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    feat_ok = feats < D
    kk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + expert * stride_we + feats[:, None].to(tl.int64) * stride_wn + kk[None, :] * stride_wk
    if QUANT:
        scale = tl.load(scale_ptr + expert * D + feats, mask=feat_ok, other=0.0)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + expert * D + feats, mask=feat_ok, other=0).to(tl.int32)
    if SHARED:
        if tl.program_id(0) == G - 1:
            w_rows = sw_ptr + feats[:, None].to(tl.int64) * I + kk[None, :]
            if QUANT:
                scale = tl.load(s_scale_ptr + feats, mask=feat_ok, other=0.0)
            if HAS_ZERO:
                zero = tl.load(s_zero_ptr + feats, mask=feat_ok, other=0).to(tl.int32)
    m0 = 0
    while m0 < count:  # row blocks of BLOCK_M copies (while: Triton's interpreter cannot range() to a loaded bound)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < count
        h_rows = h_ptr + (start + rows).to(tl.int64)[:, None] * I + kk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        products = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # GEMV's running products (unused otherwise)
        for k0 in tl.range(0, I, BLOCK_K, num_stages=LOOP_STAGES):
            k_ok = (k0 + kk) < I
            ht = tl.load(h_rows + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_rows + k0 * stride_wk, mask=feat_ok[:, None] & k_ok[None, :], other=0)
            if HAS_ZERO:
                w = w.to(tl.int32) - zero[:, None]
            if GEMV:
                products += w.to(ht.dtype).to(tl.float32) * ht.to(tl.float32)
            else:
                acc = tl.dot(ht, tl.trans(w.to(ht.dtype)), acc, input_precision=PRECISION)
        if GEMV:
            acc = tl.sum(products, 1)[None, :]
        if QUANT:
            acc = acc * scale[None, :]
        copy = _copy_index(order_ptr, start, rows, row_ok, DIRECT)
        routing = tl.load(weights_ptr + copy, mask=row_ok & (copy < C), other=1.0)  # shared copies: weight 1
        dest = ys_ptr + copy.to(tl.int64)[:, None] * D + feats[None, :]
        tl.store(dest, acc * routing[:, None], mask=row_ok[:, None] & feat_ok[None, :])
        m0 += BLOCK_M


@triton.jit
def _sum_copies(ys_ptr, out_ptr, D, C, TOP_K: tl.constexpr, KP: tl.constexpr, SHARED: tl.constexpr,
                BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[t, feats] = sum over the token's k copies of ys (fp32; SHARED: plus its shared-expert row C + t), in
    out's dtype."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    feats = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, KP)
    ok = (j[:, None] < TOP_K) & (feats[None, :] < D)
    ys = tl.load(ys_ptr + (t * TOP_K + j)[:, None] * D + feats[None, :], mask=ok, other=0.0)
    total = tl.sum(ys, 0)
    if SHARED:
        total += tl.load(ys_ptr + (C + t) * D + feats, mask=feats < D, other=0.0)
    tl.store(out_ptr + t * D + feats, total.to(out_ptr.dtype.element_ty), mask=feats < D)


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    num_groups: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    activation: str = "sigmoid",
    weights_include_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``KimiMoEGate.forward`` computes, in two kernels: ``x [N, D]`` (any float dtype), router ``weight
    [E, D]`` (any float dtype, read as it is), ``bias [E]`` (``e_score_correction_bias``) -> ``(expert ids [N, k]
    int64, fp32 weights [N, k], fp32 logits [N, E])``. ``activation`` is ``"sigmoid"`` or ``"softmax"``."""
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"router activation {activation!r} must be 'sigmoid' or 'softmax'")
    num_tokens, hidden = x.shape
    num_experts = weight.shape[0]
    if tuple(weight.shape) != (num_experts, hidden) or tuple(bias.shape) != (num_experts,):
        raise ValueError(f"expected router weight [E, {hidden}] and bias [E]; got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if num_experts % num_groups or not 1 <= topk_group <= num_groups or top_k > num_experts:
        raise ValueError(f"bad routing: {num_experts} experts, {num_groups} groups, topk_group {topk_group}, "
                         f"top_k {top_k}")
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    block_m = min(_pow2(num_tokens), 16)
    block_e = ROUTER_DECODE_BLOCK_E if num_tokens <= 2 else ROUTER_BLOCK_E
    block_d = max(32, min(ROUTER_DECODE_BLOCK_D if num_tokens <= 2 else 256, 4096 // (block_m * block_e)))
    launch = pdl.launch_options(x.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=x.device)
    out = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    select = dict(EP=_pow2(num_experts), TOP_K=top_k, KP=_pow2(top_k), NUM_GROUPS=num_groups,
                  NGP=_pow2(num_groups), TOPK_GROUP=topk_group, GROUP_SIZE=num_experts // num_groups,
                  SOFTMAX=activation == "softmax", INCLUDE_BIAS=bool(weights_include_bias),
                  RENORMALIZE=bool(renormalize) and top_k > 1)
    grid = (triton.cdiv(num_experts, block_e), triton.cdiv(num_tokens, block_m))
    counters = arrival_counters(x.device, grid[1]) if FUSED_SELECT else None
    _router_logits[grid](
        x, weight, logits, num_tokens, hidden, num_experts, bias, ids, out, float(scaling),
        counters if counters is not None else ids,
        BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_D=block_d,
        LINES=_pow2(triton.cdiv(hidden * weight.element_size(), pdl.LINE_BYTES.value)), SELECT=counters is not None,
        num_warps=ROUTER_DECODE_WARPS if num_tokens <= 2 else 4, **select, **launch,
    )
    if counters is None:  # a CUDA-graph capture that would have to allocate the counters: a second launch
        _router_select[(num_tokens,)](logits, bias, ids, out, num_experts, float(scaling), **select, num_warps=1,
                                      **launch)
    return ids, out, logits


@triton.jit
def _router_logits(x_ptr, w_ptr, out_ptr, N, D: tl.constexpr, E, bias_ptr, ids_ptr, weights_ptr, scaling, cnt_ptr,
                   BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, LINES: tl.constexpr,
                   SELECT: tl.constexpr, EP: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr,
                   NUM_GROUPS: tl.constexpr, NGP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   SOFTMAX: tl.constexpr, INCLUDE_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, PDL: tl.constexpr):
    """logits[rows, experts] = x W^T in fp32 (each tile converted in registers; plain fp32 FMAs, never TF32).
    PDL: the program asks L2 for its experts' whole weight rows (``LINES`` lines each) before it waits.

    SELECT: then each program counts itself in at ``cnt[program_id(1)]`` (acquire-release, after its logits are
    stored); the last of a block of tokens to arrive selects their experts (:func:`_select`, reading the logits
    past L1) and resets the counter, so that the selection needs no launch of its own."""
    pdl.begin(PDL)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    pdl.prefetch_rows(w_ptr + experts.to(tl.int64) * D, experts < E, D, LINES, PDL)
    pdl.wait(PDL)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + dd) < D
        xt = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + (d0 + dd)[None, :],
                     mask=(rows[:, None] < N) & d_ok[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + experts.to(tl.int64)[:, None] * D + (d0 + dd)[None, :],
                     mask=(experts[:, None] < E) & d_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xt[:, None, :] * wt[None, :, :], 2)
    ok = (rows[:, None] < N) & (experts[None, :] < E)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * E + experts[None, :], acc, mask=ok)
    if SELECT:
        tl.debug_barrier()  # every thread's logits stored before the arrival below releases them
        if tl.atomic_add(cnt_ptr + tl.program_id(1), 1, sem="acq_rel") == tl.num_programs(0) - 1:
            for i in range(BLOCK_M):
                t = tl.program_id(1) * BLOCK_M + i
                if t < N:
                    _select(t, out_ptr, bias_ptr, ids_ptr, weights_ptr, E, scaling, EP, TOP_K, KP, NUM_GROUPS, NGP,
                            TOPK_GROUP, GROUP_SIZE, SOFTMAX, INCLUDE_BIAS, RENORMALIZE, True)
            tl.atomic_xchg(cnt_ptr + tl.program_id(1), 0)


@triton.jit
def _router_select(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, E, scaling,
    EP: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, NUM_GROUPS: tl.constexpr, NGP: tl.constexpr,
    TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, SOFTMAX: tl.constexpr, INCLUDE_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, PDL: tl.constexpr,
):
    """One token a program: :func:`_select` (where the logits kernel could not select itself)."""
    pdl.begin(PDL)
    pdl.wait(PDL)
    _select(tl.program_id(0), logits_ptr, bias_ptr, ids_ptr, weights_ptr, E, scaling, EP, TOP_K, KP, NUM_GROUPS, NGP,
            TOPK_GROUP, GROUP_SIZE, SOFTMAX, INCLUDE_BIAS, RENORMALIZE, False)


@triton.jit
def _select(
    t, logits_ptr, bias_ptr, ids_ptr, weights_ptr, E, scaling,
    EP: tl.constexpr, TOP_K: tl.constexpr, KP: tl.constexpr, NUM_GROUPS: tl.constexpr, NGP: tl.constexpr,
    TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, SOFTMAX: tl.constexpr, INCLUDE_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr, PAST_L1: tl.constexpr,
):
    """Token t: scores, bias, grouped top-k, top-k, weights (as ``KimiMoEGate``). PAST_L1: the logits were stored
    by other programs of the running kernel, so they are read from L2."""
    t = t.to(tl.int64)
    e = tl.arange(0, EP)
    valid = e < E
    if PAST_L1:
        logits = tl.load(logits_ptr + t * E + e, mask=valid, other=float("-inf"), cache_modifier=".cg")
    else:
        logits = tl.load(logits_ptr + t * E + e, mask=valid, other=float("-inf"))
    if SOFTMAX:
        p = tl.where(valid, tl.exp(logits - tl.max(logits, 0)), 0.0)
        scores = p / tl.sum(p, 0)
    else:
        scores = tl.sigmoid(logits)
    biased = scores + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, biased, float("-inf"))
    if NUM_GROUPS > 1:
        group = e // GROUP_SIZE
        gid = tl.arange(0, NGP)
        group_score = tl.full([NGP], float("-inf"), tl.float32)
        for gi in tl.static_range(NUM_GROUPS):
            member = tl.where(valid & (group == gi), biased, float("-inf"))
            best = tl.max(member, 0)
            if GROUP_SIZE > 1:  # the sum of the group's two best biased scores
                second = tl.max(tl.where(e == tl.argmax(member, 0), float("-inf"), member), 0)
                best = best + second
            group_score = tl.where(gid == gi, best, group_score)
        kept_group = gid < 0  # all False
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.argmax(group_score, 0)
            kept_group = kept_group | (gid == top)
            group_score = tl.where(gid == top, float("-inf"), group_score)
        kept = e < 0
        for gi in tl.static_range(NUM_GROUPS):
            is_kept = tl.sum(tl.where(kept_group & (gid == gi), 1, 0), 0) > 0
            kept = kept | ((group == gi) & is_kept)
        choice = tl.where(valid, tl.where(kept, biased, 0.0), float("-inf"))
    if INCLUDE_BIAS:
        source = biased
    else:
        source = scores
    j = tl.arange(0, KP)
    chosen = tl.zeros([KP], dtype=tl.int32)
    picked = tl.zeros([KP], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        best = tl.argmax(choice, 0)
        chosen = tl.where(j == slot, best, chosen)
        picked = tl.where(j == slot, tl.sum(tl.where(e == best, source, 0.0), 0), picked)
        choice = tl.where(e == best, float("-inf"), choice)
    if RENORMALIZE:
        picked = picked / (tl.sum(picked, 0) + 1e-20)
    tl.store(ids_ptr + t * TOP_K + j, chosen.to(tl.int64), mask=j < TOP_K)
    tl.store(weights_ptr + t * TOP_K + j, picked * scaling, mask=j < TOP_K)
