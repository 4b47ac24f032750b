"""build_random_model: a preset's model made on the meta device and initialised where it lives, with the same
initialisation as the ordinary constructor (statistics per parameter kind), every parameter written."""

from __future__ import annotations

import pytest
import torch

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset
from modeling_kimi_linear.random_weights import build_random_model


def kind(name: str) -> str:
    for part in ("A_log", "dt_bias", "conv1d", "norm", "experts", "e_score_correction_bias"):
        if part in name:
            return part
    return "linear"


def stats(model) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over all parameters of each kind."""
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(kind(name), []).append(p.detach().float().flatten())
    return {k: (torch.cat(v).mean().item(), torch.cat(v).std().item()) for k, v in groups.items()}


def test_matches_the_constructors_initialisation():
    """Per kind of parameter with many entries, mean and spread as the ordinary constructor draws them; the few
    per-head decay parameters in their documented ranges; norms one, router biases zero."""
    torch.manual_seed(0)
    built = build_random_model("tiny", "cpu", torch.float32)
    torch.manual_seed(1)
    ordinary = KimiLinearForCausalLM(load_preset("tiny"))
    assert not built.training
    assert [n for n, _ in built.named_parameters()] == [n for n, _ in ordinary.named_parameters()]
    got, want = stats(built), stats(ordinary)
    for k in ("linear", "experts", "conv1d"):
        (m1, s1), (m2, s2) = got[k], want[k]
        assert abs(m1 - m2) <= 0.1 * s2 and abs(s1 - s2) <= 0.1 * s2, (k, got[k], want[k])
    for name, p in built.named_parameters():
        if name.endswith("A_log"):  # exp(A_log) in [1, 16]
            assert p.min() >= 0 and p.max() <= torch.log(torch.tensor(16.0)) + 1e-6, name
        elif name.endswith("dt_bias"):  # softplus(dt_bias) in [1e-3, 1e-1]
            dt = torch.nn.functional.softplus(p)
            assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4), name
        elif kind(name) == "norm":
            assert torch.equal(p, torch.ones_like(p)), name
        elif kind(name) == "e_score_correction_bias":
            assert torch.equal(p, torch.zeros_like(p)), name


def test_dtype_and_fp32_kept_parameters():
    model = build_random_model("tiny", torch.device("cpu"), torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16), name
        assert torch.isfinite(p).all(), name
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_device_map_places_modules_and_refuses_gaps():
    config = load_preset("tiny")
    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(config.num_hidden_layers)), "model.norm",
             "lm_head"]
    model = build_random_model(config, device_map={name: "cpu" for name in names}, dtype=torch.float32)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match="lm_head"):
        build_random_model(config, device_map={name: "cpu" for name in names[:-1]}, dtype=torch.float32)
    with pytest.raises(ValueError, match="exactly one of device and device_map"):
        build_random_model(config, "cpu", device_map={"": "cpu"})


def test_a_parameter_left_unwritten_is_named(monkeypatch):
    original = KimiLinearForCausalLM._init_weights

    def skip_norms(self, module):
        if type(module).__name__ != "KimiRMSNorm":
            original(self, module)

    monkeypatch.setattr(KimiLinearForCausalLM, "_init_weights", skip_norms)
    with pytest.raises(RuntimeError, match="uninitialised.*norm"):
        build_random_model("tiny", "cpu", torch.float32)


def test_quantization_quantizes_each_piece_as_from_pretrained_would():
    """int8 weight-only while building: every nn.Linear but the high-precision ones and the routed experts are
    torchao int8 tensors, the rest plain; the model runs and its predicted weight bytes are what it stores."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    from modeling_kimi_linear.quantization import int8_weight_only_bytes, is_plain, kept_high_precision, tensor_bytes

    torch.manual_seed(0)
    model = build_random_model("tiny", "cpu", torch.bfloat16, quantization=Int8WeightOnlyConfig())
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert is_plain(module.weight) == kept_high_precision(f"{name}.weight"), name
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(type(p).__name__ == "Int8Tensor" for p in experts)
    torch.set_default_dtype(torch.bfloat16)  # as build_random_model does: A_log / dt_bias stay float32
    try:
        with torch.device("meta"):
            shapes = KimiLinearForCausalLM(load_preset("tiny"))
    finally:
        torch.set_default_dtype(torch.float32)
    assert sum(tensor_bytes(p) for p in model.parameters()) == int8_weight_only_bytes(shapes)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 500, (1, 9))).logits.float()).all()
