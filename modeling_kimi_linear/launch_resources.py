"""What this package's Triton decode kernels size their launches by, per device: the SM count, and int32 arrival
counters for kernels whose programs hand a last step to the last one to arrive. Nothing here needs triton.

Arrival counters: a kernel that splits one output over several programs (:mod:`multi_linear_triton`'s split over
K, the fused KDA step's split over value columns in :mod:`kda_decode_triton`, the router's logits before the expert
selection in :mod:`moe_decode_triton`) has each program store its part, then count itself in with an
acquire-release atomic add on its tile's counter; the program that sees ``parts - 1`` arrivals before its own
finishes the tile (reads every part) and puts the counter back to 0. The counters are therefore zero between
launches, and one buffer per device serves every such kernel of a stream.
"""

from __future__ import annotations

import functools

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
INTERPRETER_SMS = 4  # the "SM count" a kernel may size its grid by for CPU tensors (Triton's interpreter, tests)


def arrival_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """At least ``n`` zeroed int32 counters on ``device`` (4096 at least, grown on demand, kept per device).
    Allocated outside CUDA-graph capture (the eager warm-up before a capture makes them); ``None`` if a capture would
    have to allocate them (the caller then launches unsplit). Launches sharing them must not run at once on two
    streams of a device."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device, stand_in: int = 132) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 / H200); ``stand_in`` for any other device (the
    CPU tensors of Triton's interpreter, in tests)."""
    if device.type != "cuda":
        return stand_in
    return torch.cuda.get_device_properties(device).multi_processor_count
