"""bench/gpu_profile.py's charging of kernels to the model's parts, on synthetic profiler events (the profile itself
needs a GPU): each kernel goes to the innermost labelled host range around the call that launched it, whether that
call came from an aten op or from Triton's launcher."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.gpu_profile import charge_kernels

CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def Event(name, device, start, end, corr=0, link=0, annotation=False):  # noqa: ANN001, ANN201, N802
    """The part of a Kineto event that ``charge_kernels`` reads (its accessors are methods)."""
    return SimpleNamespace(name=lambda: name, device_type=lambda: device, start_ns=lambda: start,
                           end_ns=lambda: end, duration_ns=lambda: end - start, correlation_id=lambda: corr,
                           linked_correlation_id=lambda: link, is_user_annotation=lambda: annotation)


def test_kernels_go_to_the_innermost_range_around_their_launch():
    events = [
        Event("part::experts", CPU, 0, 1000),
        Event("part::router", CPU, 100, 200),  # nested inside experts' range
        Event("cuLaunchKernel", CPU, 150, 160, corr=7),  # Triton's launch, no aten op around it
        Event("aten::mm", CPU, 300, 400, corr=7000),  # an aten op whose own id collides with nothing
        Event("cudaLaunchKernel", CPU, 310, 320, corr=8),
        Event("cudaLaunchKernel", CPU, 2000, 2010, corr=9),  # outside every range
        Event("part::router", CUDA, 5000, 5300, annotation=True),  # the GPU-side copy of a range: not a kernel
        Event("_router_select", CUDA, 5000, 5300, link=7),
        Event("gemv", CUDA, 6000, 6600, link=8),
        Event("lm_head_gemv", CUDA, 7000, 9000, link=9),
    ]
    parts, total = charge_kernels(events, steps=2)
    assert parts == {"router": 0.15, "experts": 0.3, "(no part)": 1.0}
    assert total == 1.45
