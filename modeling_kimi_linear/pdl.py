"""Programmatic dependent launch (PDL) for this package's Triton decode kernels (Hopper and later, CUDA only).

A replayed decode step is a chain of a few hundred small kernels. Between two of them the GPU normally lets the
first grid drain completely (its last, partly idle wave: the tail), then schedules the second grid, whose programs
only then issue their first loads (the ramp). With PDL, a launch attribute (``launch_pdl=True`` in Triton; kept as
an edge of that kind when a CUDA graph captures it), the next kernel may be scheduled while the running one is
still finishing: as soon as every program of the running grid has executed ``griddepcontrol.launch_dependents``
(or exited), the next grid's programs start where resources allow, and each of them blocks at
``griddepcontrol.wait`` until the previous grid has completed and its memory writes are visible.

The rules every kernel of this package launched with PDL follows (:func:`begin` and :func:`wait` below):

1. A program signals at its start (:func:`begin`) and waits (:func:`wait`) before it reads or writes any memory an
   earlier kernel of the stream may write or read: activations, caches, workspaces, counters, routing results.
2. Every program of the grid waits, unconditionally, before any early exit. A grid completes only when all of its
   programs have, so a PDL kernel's completion implies its predecessor's, and a chain of several PDL kernels stays
   ordered like an ordinary stream (kernel n+2 waiting on n+1 waits, through it, on n).
3. Before the wait a program may only read memory that no kernel of a decode step writes: the model's weights
   (fixed while decoding). The projection kernels use that time to ask L2 for their first weight tiles
   (:func:`prefetch_l2`), which overlaps part of their ramp with the previous kernel's tail.

Kernels not launched with PDL (cuBLAS, PyTorch's own) wait for the previous kernel to complete as usual, and a PDL
kernel after one of them may only start once all its programs have exited. Both instructions are no-ops in a kernel
launched without the attribute.

Switch: off by default; :data:`ENV_VAR` ``=1`` turns it on. Read at every launch; a CUDA graph captured before
keeps the launches it recorded, which compute the same values either way. On GPUs before compute capability 9.0,
and under Triton's interpreter, it stays off and the kernels are compiled without the instructions.

Measured on an H100 (2026-12-08): exact both times (``bench/gpu_check.py --only graph``: CUDA-graph decode with PDL
gave the same logits as op-by-op decoding, difference 0.0, and the same greedy tokens), and a graph step of that
4-layer check model took 0.68 ms against 0.76 without it. But through ``generate()`` on the 48B layout cut to 16
layers (``bench/gpu_scale.py --layers 16 --pdl off,on``) it was not faster: 2.45 ms a token off against 2.50 and
2.62 on (two runs) at 4K context, 4.31 against 4.42 at 1M. So it stays off until a measurement shows a gain.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # in a try block, transformers' remote-code check does not ask for triton where these kernels never run
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError("the Triton decode kernels need triton: pip install triton") from exc

ENV_VAR = "KIMI_LINEAR_PDL"
LINE_BYTES = tl.constexpr(128)  # an L2 cache line: one prefetch asks for one line


def enabled(device: torch.device) -> bool:
    """Whether kernels for tensors on ``device`` are launched with PDL: a CUDA device of compute capability >= 9.0,
    not Triton's interpreter, and switched on (``KIMI_LINEAR_PDL=1``)."""
    if device.type != "cuda" or os.environ.get(ENV_VAR, "0") != "1" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch_options(device: torch.device) -> dict:
    """The keyword arguments a launch adds: ``PDL`` (the kernels' compile-time switch) and Triton's ``launch_pdl``
    (the launch attribute); both False where :func:`enabled` is False."""
    on = enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def begin(PDL: tl.constexpr):
    """Let the next kernel of the stream be scheduled (rule 1 of the module docstring). A no-op unless PDL."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait(PDL: tl.constexpr):
    """Block until the previous kernel of the stream has completed and its writes are visible. A no-op unless
    PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(ptrs, mask, PDL: tl.constexpr):
    """Ask L2 for the cache lines holding ``ptrs`` where ``mask`` (fire and forget: nothing waits for them, nothing
    is loaded into registers); for weights only, before :func:`wait` (rule 3). A no-op unless PDL."""
    if PDL:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; } // $0", "=r,l,r",
            [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )


@triton.jit
def prefetch_rows(row_ptrs, row_ok, row_len, LINES: tl.constexpr, PDL: tl.constexpr):
    """:func:`prefetch_l2` of the first ``LINES`` cache lines of each row: ``row_ptrs`` ``[R]`` point at the rows'
    first elements, ``row_ok`` ``[R]`` says which rows exist, ``row_len`` elements of each may be read."""
    if PDL:
        step: tl.constexpr = LINE_BYTES * 8 // row_ptrs.dtype.element_ty.primitive_bitwidth  # elements in a line
        offs = tl.arange(0, LINES) * step
        prefetch_l2(row_ptrs[:, None] + offs[None, :], row_ok[:, None] & (offs[None, :] < row_len), PDL)
