"""bench/gpu_profile.py's charging of kernels to the model's parts, on synthetic profiler events (the profile itself
needs a GPU): each kernel goes to the innermost labelled host range around the host event it is linked to (the op
or range active at its launch, or in older traces the launch call), whether an aten op or Triton launched it."""

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


def test_kernels_linked_to_ops_and_ranges_go_to_the_innermost_range_around_them():
    events = [
        Event("part::experts", CPU, 0, 1000, corr=1),
        Event("part::router", CPU, 100, 200, corr=2),  # nested inside experts' range
        Event("aten::mm", CPU, 300, 400, corr=3),  # inside experts only
        Event("cudaLaunchKernel", CPU, 310, 320, corr=2),  # a runtime id equal to the router's op id: not used
        Event("aten::add", CPU, 2000, 2010, corr=4),  # outside every range
        Event("_router_select", CUDA, 5000, 5300, link=2),  # Triton's kernel: linked to the router's range
        Event("gemv", CUDA, 6000, 6600, link=3),
        Event("add_kernel", CUDA, 7000, 9000, link=4),
    ]
    parts, total = charge_kernels(events, steps=2)
    assert parts == {"router": 0.15, "experts": 0.3, "(no part)": 1.0}
    assert total == 1.45


def test_kernels_linked_to_launch_calls_go_to_the_innermost_range_around_their_launch():
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


class FakeEvent:
    """A CUDA event's ``elapsed_time`` over a device timestamp in milliseconds."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def elapsed_time(self, later: "FakeEvent") -> float:
        return later.ms - self.ms


def test_step_clock_splits_a_generate_step_into_device_and_host_parts():
    from bench.gpu_profile import StepClock

    clock = StepClock()
    # three replays 1.0 ms apart on the device: each replay 0.7 ms, then 0.1 ms of queued work up to the stop
    # flag's read-back, so 0.2 ms of idle; on the host the read-back returns 0.05 ms before the next launch, with
    # the model's forward, step and check 10 us apart in between
    for i in range(3):
        t = float(i)
        clock.steps.append({"start": FakeEvent(t), "end": FakeEvent(t + 0.7), "launched": 10.0 + t / 1e3})
        if i < 2:  # the last replay of a call has no stop check before a next replay
            back = 10.0 + (t + 1 - 0.05) / 1e3
            clock._stops.append((FakeEvent(t + 0.8), back, 10.0 + (t + 0.3) / 1e3))
            clock._marks += [(tag, back + (k + 1) * 1e-5) for k, tag in enumerate(StepClock.MARKS)]
    got = clock.summary()
    assert got["steps"] == 2
    want = {"replay": 700.0, "after": 100.0, "idle": 200.0, "host": 50.0, "period": 1000.0,
            "host: transformers": 10.0, "host: model before step": 10.0, "host: step before check": 10.0,
            "host: model check": 10.0, "host: check to launch": 10.0, "host: launch to stop check": 300.0}
    for key, value in want.items():
        assert abs(got[key] - value) < 0.2, (key, got[key], value)
