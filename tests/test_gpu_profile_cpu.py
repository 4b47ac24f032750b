"""bench/gpu_profile.py's charging of kernels to the model's parts, on synthetic profiler events shaped as an H100
run's event dump showed them (the profile itself needs a GPU): a kernel's ``correlation_id`` is its launch call's
(``cuLaunchKernelEx`` for Triton, ``cudaLaunchKernel`` for aten), its ``linked_correlation_id`` the aten op around
that call, or 0 for Triton. Each kernel goes to the innermost labelled range around its launch."""

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


def test_kernels_go_to_the_innermost_range_around_their_launch_call():
    events = [
        Event("part::experts", CPU, 0, 1000, corr=1, annotation=True),
        Event("part::router", CPU, 100, 200, corr=2, annotation=True),  # nested inside experts' range
        Event("cuLaunchKernelEx", CPU, 150, 160, corr=17),  # Triton's launch: no aten op around it
        Event("aten::mm", CPU, 300, 400, corr=3),  # an op id; launch ids are another numbering
        Event("cudaLaunchKernel", CPU, 310, 320, corr=2),  # a launch id equal to the router range's op id
        Event("cudaLaunchKernel", CPU, 2000, 2010, corr=40),  # outside every range
        Event("part::router", CUDA, 5000, 5300, corr=2, annotation=True),  # the range's GPU-side copy: no kernel
        Event("_router_select", CUDA, 5000, 5300, corr=17, link=0),
        Event("gemv", CUDA, 6000, 6600, corr=2, link=3),
        Event("lm_head_gemv", CUDA, 7000, 9000, corr=40, link=0),
    ]
    parts, total = charge_kernels(events, steps=2)
    assert parts == {"router": 0.15, "experts": 0.3, "(no part)": 1.0}
    assert total == 1.45


def test_a_kernel_without_a_recorded_launch_call_goes_by_its_aten_op():
    events = [
        Event("part::mla", CPU, 0, 1000, corr=1, annotation=True),
        Event("aten::bmm", CPU, 300, 400, corr=5),
        Event("bmm_kernel", CUDA, 6000, 6400, corr=99, link=5),  # its launch call fell outside the profile
        Event("lost_kernel", CUDA, 7000, 7200, corr=98, link=0),
    ]
    parts, _ = charge_kernels(events, steps=1)
    assert parts == {"mla": 0.4, "(no part)": 0.2}


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


def test_part_bytes_count_what_quantized_weights_store():
    """``--weights int8``: the parts' byte counts are the int8 data and scales, the high-precision router and
    lm_head unchanged (the same tiny model built both ways)."""
    import pytest

    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    from bench.gpu_profile import part_bytes
    from modeling_kimi_linear.random_weights import build_random_model

    bf16 = part_bytes(build_random_model("tiny", "cpu", torch.bfloat16), 256)
    int8 = part_bytes(build_random_model("tiny", "cpu", torch.bfloat16, quantization=Int8WeightOnlyConfig()), 256)
    assert int8["router"] == bf16["router"] and int8["lm_head"] == bf16["lm_head"]
    for part in ("kda: output projection", "experts (routed + shared)", "dense MLP"):
        assert 0.5 * bf16[part] < int8[part] < 0.6 * bf16[part], (part, int8[part], bf16[part])
