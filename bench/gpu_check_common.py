"""What the GPU checks share (bench/gpu_check.py, bench/gpu_check_kernels.py): result rows, the relative error,
the full-width test configuration, switching a model's kernels, and timing a step from CUDA-graph replays."""

from __future__ import annotations

import copy
import json
import time

import torch

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

TARGET = 1e-2
T0 = time.perf_counter()


class Rows(list):
    """Result rows, each also printed as it comes (a later failure leaves the earlier results in the log)."""

    def append(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        super().append(row)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_config(moe: bool, layers: list[str] | None = None) -> KimiLinearConfig:
    """The release's widths (hidden 2304, KDA 32 heads x 128, MLA 512 + 64 latent); 4 layers (3 KDA + 1 MLA) unless
    ``layers`` is given. Without ``moe`` every layer has a dense MLP."""
    layers = layers or ["linear_attention"] * 3 + ["full_attention"]
    return KimiLinearConfig(
        vocab_size=4096, hidden_size=2304, intermediate_size=2048, num_hidden_layers=len(layers),
        layer_types=layers, linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
        num_experts=16 if moe else None, num_experts_per_token=4, moe_intermediate_size=512, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )


def set_backend(model: KimiLinearForCausalLM, backend: str) -> KimiLinearForCausalLM:
    """``"torch"``: every kernel the PyTorch reference (fla's and this package's Triton decode kernels off);
    ``"fla"``: fla's kernels and this package's Triton decode kernels (``decode_kernels="auto"``)."""
    model.config.kda_backend = backend
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "backend"):
            layer.self_attn.backend = backend
    return set_decode_kernels(model, "torch" if backend == "torch" else "auto")


def set_decode_kernels(module: torch.nn.Module, choice: str) -> torch.nn.Module:
    """Set ``decode_kernels`` (this package's Triton decode kernels: ``"torch"``, ``"triton"`` or ``"auto"``) on
    every submodule that reads it (MLA, KDA, router, experts) and on a model's config."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "decode_kernels"):
        config.decode_kernels = choice
    for sub in module.modules():
        if hasattr(sub, "decode_kernels"):
            sub.decode_kernels = choice
    return module


def pair(dtype: torch.dtype, moe: bool = False, layers=None):
    torch.manual_seed(0)
    ref = KimiLinearForCausalLM(check_config(moe, layers)).to("cuda", dtype).eval()
    return set_backend(ref, "torch"), set_backend(copy.deepcopy(ref), "fla")


def replay_us(step, repeats: int = 20, iters: int = 50) -> float:
    """Microseconds per call of ``step()`` (CUDA work only, no host writes), from replays of a CUDA graph holding
    ``repeats`` calls in a row (as a model's graph holds its layers one after another; one call per graph would time
    the graph launch instead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * repeats)
