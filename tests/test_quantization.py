"""Quantized weights through transformers' ``TorchAoConfig`` (CPU, tiny preset; skipped without torchao).

The references are independent of the quantized code path: the unquantized model (for the quantization error)
and an unquantized model holding the dequantized weights, run through the ordinary PyTorch expert path (for the
arithmetic of :mod:`modeling_kimi_linear.quantized_experts` and the absorbed MLA decode).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig  # noqa: E402
from transformers import BitsAndBytesConfig, TorchAoConfig  # noqa: E402

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import load_preset  # noqa: E402
from modeling_kimi_linear.quantization import (  # noqa: E402
    HIGH_PRECISION_MODULES,
    default_key_accepted,
    int8_weight_only_bytes,
    is_plain,
    prepare_quantization_config,
)
from modeling_kimi_linear.cuda_graph_decode import StaticDecoder  # noqa: E402

INT8 = Int8WeightOnlyConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    KimiLinearForCausalLM(load_preset("tiny")).save_pretrained(path)
    return path


def load(path: Path, **kwargs) -> KimiLinearForCausalLM:
    return KimiLinearForCausalLM.from_pretrained(path, **kwargs).eval()


def quantized(path: Path, **kwargs) -> KimiLinearForCausalLM:
    return load(path, quantization_config=TorchAoConfig(INT8(), **kwargs))


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def dequantized_copy(model: KimiLinearForCausalLM, path: Path) -> KimiLinearForCausalLM:
    """An unquantized model of the same checkpoint whose weights are the quantized model's dequantized values."""
    plain = load(path)
    weights = {name: p.dequantize() if not is_plain(p) else p for name, p in model.state_dict().items()}
    plain.load_state_dict(weights)
    return plain


def test_int8_quantizes_experts_and_linears_and_keeps_the_directly_read_weights(checkpoint):
    model = quantized(checkpoint)
    params = dict(model.named_parameters())
    moe = model.model.layers[1].block_sparse_moe
    for weight in (moe.experts.gate_up_proj, moe.experts.down_proj):
        assert not is_plain(weight) and weight.qdata.dtype == torch.int8
        assert weight.scale.shape == (*weight.shape[:2], 1)  # one scale per output row of each expert
    assert not is_plain(params["model.layers.1.self_attn.q_proj.weight"])
    assert not is_plain(params["model.layers.3.block_sparse_moe.shared_experts.down_proj.weight"])
    kept = [name for name, p in params.items() if is_plain(p)]
    for name in ("self_attn.kv_b_proj.weight", "self_attn.f_a_proj.weight", "self_attn.f_b_proj.weight",
                 "self_attn.b_proj.weight", "block_sparse_moe.gate.weight", "self_attn.A_log", "self_attn.dt_bias",
                 "input_layernorm.weight", "self_attn.q_conv1d.weight"):
        assert any(k.endswith(name) for k in kept), name
    assert "lm_head.weight" in kept and "model.embed_tokens.weight" in kept


def test_quantized_arithmetic_equals_the_plain_path_on_dequantized_weights(checkpoint):
    """Prefill (experts one by one through torchao's int8 linear), cached decode (gathered, dequantized experts;
    absorbed MLA with kv_b_proj also quantized) against the ordinary path on the dequantized weights: equal to
    fp32 rounding (scales are applied after the product instead of before)."""
    model = quantized(checkpoint, modules_to_not_convert=[])  # kv_b_proj quantized too: dequantized per step
    assert not is_plain(model.model.layers[3].self_attn.kv_b_proj.weight)
    reference = dequantized_copy(model, checkpoint)
    x = ids(2, 12)
    with torch.no_grad():
        got, want = model(x), reference(x)
        scale = want.logits.abs().max().item()
        assert (got.logits - want.logits).abs().max().item() <= 1e-5 * scale
        token = want.logits[:, -1:].argmax(-1)
        cache_got, cache_want = got.past_key_values, want.past_key_values
        for _ in range(4):  # decode steps: 2 tokens x top-2 <= 8 experts, the gathered path
            a = model(token, past_key_values=cache_got).logits
            b = reference(token, past_key_values=cache_want).logits
            assert (a - b).abs().max().item() <= 1e-5 * scale
            token = b.argmax(-1)


def test_generate_close_to_the_unquantized_model(checkpoint):
    """Done-when check: int8 weight-only, experts included, generates; every step's logits are compared with the
    unquantized (fp32) model on the same tokens. Tolerance: per-row int8 rounds each weight by at most
    max|row| / 254, about 0.5% of a row's RMS at this width, so one product carries ~0.5% relative error and the
    ~15 products on a token's path through 4 layers add up to ~2-3% (measured 2.5-2.8% over three seeds); we
    allow 6% relative RMS and a largest deviation of 10% of the largest logit. A wrong scale, expert or row would
    be off by 100%."""
    model, reference = quantized(checkpoint), load(checkpoint)
    prompt = ids(2, 12, seed=1)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    got = torch.stack(out.logits, 1)
    with torch.no_grad():
        want = reference(out.sequences).logits[:, prompt.shape[1] - 1 : -1]
    assert got.shape == want.shape == (2, 8, 512)
    assert ((got - want).norm() / want.norm()).item() <= 0.06
    assert (got - want).abs().max().item() <= 0.10 * want.abs().max().item()


def test_static_decode_step_with_quantized_weights(checkpoint):
    """The step a CUDA graph captures (run without a graph on the CPU) gives the ordinary decode's logits."""
    model = quantized(checkpoint)
    decoder = StaticDecoder(model._decode_logits, use_graph=False)
    x = ids(2, 10, seed=2)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        first = model(x, attention_mask=mask)
        ordinary, static = first.past_key_values, model(x, attention_mask=mask).past_key_values
        token = first.logits[:, -1:].argmax(-1)
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            want = model(token, attention_mask=mask, past_key_values=ordinary).logits
            got = decoder.step(token, mask, static)
            assert (want - got).abs().max().item() <= 1e-5
            token = want[:, -1:].argmax(-1)


def test_save_and_reload_keeps_the_quantized_weights(checkpoint, tmp_path):
    model = quantized(checkpoint)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    again = load(tmp_path)  # the quantization config comes from config.json
    assert not is_plain(again.model.layers[1].block_sparse_moe.experts.gate_up_proj)
    assert is_plain(again.model.layers[3].self_attn.kv_b_proj.weight)
    x = ids(1, 9, seed=3)
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert again.get_memory_footprint() == model.get_memory_footprint()


def test_memory_footprint_counts_int8_storage(checkpoint):
    """The loaded model's stored bytes equal the shape arithmetic of int8_weight_only_bytes (computed on the
    meta device), and the unquantized model's equal 4 bytes a parameter (fp32)."""
    plain, model = load(checkpoint), quantized(checkpoint)
    n = sum(p.numel() for p in plain.parameters())
    assert plain.get_memory_footprint(return_buffers=False) == 4 * n
    with torch.device("meta"):
        meta = KimiLinearForCausalLM(load_preset("tiny"))
    assert model.get_memory_footprint(return_buffers=False) == int8_weight_only_bytes(meta)
    experts = sum(p.numel() for name, p in plain.named_parameters() if ".experts." in name)
    saved = plain.get_memory_footprint(return_buffers=False) - model.get_memory_footprint(return_buffers=False)
    assert saved > 3 * experts  # 4 -> 1 byte for every expert weight, and more for the other linears


def test_48b_layout_in_8_bits_fits_52_gb():
    """The released layout on the meta device: 49,122,681,728 parameters, 98.25 GB in bf16 (the roofline note's
    figures); int8 weight-only with the high-precision defaults: at most 52 GB (about 50.2 GB)."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(load_preset("kimi_linear_48b_a3b")).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    assert n == 49_122_681_728
    experts = 26 * 256 * 3 * 2304 * 1024
    assert sum(p.numel() for name, p in model.named_parameters() if ".experts." in name) == experts
    size = int8_weight_only_bytes(model)
    assert experts < size <= 52e9  # experts alone are 47.1 GB in int8


def test_caller_choices_are_kept_and_defaults_filled():
    given = TorchAoConfig(INT8())
    config = prepare_quantization_config(given)
    assert isinstance(config.quant_type, FqnToConfig)
    assert config.modules_to_not_convert == HIGH_PRECISION_MODULES
    assert isinstance(given.quant_type, INT8) and given.modules_to_not_convert is None  # the caller's is a copy
    with default_key_accepted():
        own = TorchAoConfig(FqnToConfig({"_default": INT8()}), modules_to_not_convert=["lm_head"])
    kept = prepare_quantization_config(own)
    assert kept.quant_type is own.quant_type and kept.modules_to_not_convert == ["lm_head"]
    bnb = prepare_quantization_config(BitsAndBytesConfig(load_in_8bit=True))
    assert bnb.llm_int8_skip_modules == HIGH_PRECISION_MODULES


def test_lora_on_top_of_int8_weights(checkpoint):
    peft = pytest.importorskip("peft")
    model = quantized(checkpoint)
    before = model.model.layers[1].self_attn.q_proj.weight.qdata.clone()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj",
                                                                                        "gate_proj", "up_proj"]))
    lora.train()
    x = ids(2, 16, seed=4)
    loss = lora(input_ids=x, labels=x).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    assert torch.equal(before, model.model.layers[1].self_attn.q_proj.weight.qdata)
    lora.eval()
    out = lora.generate(input_ids=x[:1, :6], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10)


def test_compile_cpu_decode_falls_back_to_op_by_op_for_quantized_weights(checkpoint):
    """Exporting a step over torchao tensors is not supported: one warning, then the ordinary decode's tokens."""
    model = quantized(checkpoint)
    prompt = ids(1, 5, seed=5)
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    model.compile_cpu_decode = True
    with pytest.warns(RuntimeWarning, match="quantized weights"):
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_a_config_without_3d_support_leaves_the_experts_and_says_so(checkpoint):
    """torchao's intx (here int4 weight-only, per group of 32) takes 2-D weights only: the linears are quantized,
    the experts stay in the load dtype with a warning, and the model generates."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    with pytest.warns(UserWarning, match="routed experts stay"):
        model = load(checkpoint, quantization_config=config)
    assert is_plain(model.model.layers[1].block_sparse_moe.experts.gate_up_proj)
    assert not is_plain(model.model.layers[1].self_attn.q_proj.weight)
    assert model.generate(ids(1, 5), max_new_tokens=3, do_sample=False).shape == (1, 8)


@pytest.mark.parametrize("path", ["gathered", "per_expert"])
def test_both_expert_paths_equal_the_plain_experts_on_dequantized_weights(checkpoint, path, monkeypatch):
    """The two quantized expert paths (the gathered one in blocks of 3 pairs, so several blocks run) against
    moe.KimiExperts' own path on the dequantized weights, for the same tokens and routing."""
    from modeling_kimi_linear import quantized_experts

    monkeypatch.setattr(quantized_experts, "GATHER_BLOCK", 3)
    model = quantized(checkpoint)
    experts = model.model.layers[2].block_sparse_moe.experts
    plain = dequantized_copy(model, checkpoint).model.layers[2].block_sparse_moe.experts
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 64, generator=gen)
    chosen = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=gen)
    run = quantized_experts._gathered if path == "gathered" else quantized_experts._per_expert
    with torch.no_grad():
        got, want = run(experts, x, chosen, weights), plain(x, chosen, weights)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@pytest.mark.parametrize("head", [False, True])
def test_quantizing_while_building_matches_from_pretrained(checkpoint, head):
    """``build_random_model(quantization=...)`` (:func:`quantization.quantize_in_place`, the 48B's way onto one
    GPU) quantizes exactly the tensors ``from_pretrained(quantization_config=...)`` does, with the default
    high-precision list and with the output head and embedding included (``include_input_output_embeddings``)."""
    from modeling_kimi_linear.random_weights import build_random_model

    kwargs = {}
    if head:
        kwargs = {"include_input_output_embeddings": True,
                  "modules_to_not_convert": [m for m in HIGH_PRECISION_MODULES if m != "lm_head"]}
    loaded = quantized(checkpoint, **kwargs)
    built = build_random_model(load_preset("tiny"), "cpu", torch.float32,
                               quantization=prepare_quantization_config(TorchAoConfig(INT8(), **kwargs)))
    kinds = {name: type(p).__name__ for name, p in loaded.named_parameters()}
    assert kinds == {name: type(p).__name__ for name, p in built.named_parameters()}
    assert (kinds["lm_head.weight"] == "Int8Tensor") == head
    assert (kinds["model.embed_tokens.weight"] == "Int8Tensor") == head
    plain = load(checkpoint)
    with torch.no_grad():
        got, want = loaded(ids(1, 12)).logits, plain(ids(1, 12)).logits
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
