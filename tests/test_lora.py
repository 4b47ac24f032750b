"""PEFT LoRA on our model (CPU, tiny preset): the attention and MLP projections and the fused routed experts
(``target_parameters``) train, save/reload, merge, and generate with our cache."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import load_preset  # noqa: E402

KDA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "f_a_proj", "f_b_proj", "g_a_proj", "g_b_proj"]
MLA_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]  # dense MLP and shared experts
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]  # routed experts [E, 2I, D] and [E, D, I]
# kv_b_proj is left out where the model decodes with a cache: see test_lora_on_kv_b_proj_is_ignored_by_cached_decode
DECODE_SAFE_TARGETS = sorted(set(KDA_TARGETS + MLA_TARGETS + MLP_TARGETS) - {"kv_b_proj"})


def tiny(seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    return KimiLinearForCausalLM(load_preset("tiny"))


def lora(model: KimiLinearForCausalLM, modules: list[str] | None = None, experts: bool = True, r: int = 4):
    """Wrap ``model``; lora_B starts random (not zero) so that the adapter changes the output from the start."""
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=sorted(set(modules or KDA_TARGETS + MLA_TARGETS + MLP_TARGETS)),
        target_parameters=EXPERT_PARAMETERS if experts else None,
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_model


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_projection_and_the_routed_experts_are_wrapped():
    model = lora(tiny())
    inner = model.get_base_model()
    for i, layer in enumerate(inner.model.layers):
        names = KDA_TARGETS if layer.is_kda else MLA_TARGETS
        for name in names:
            assert hasattr(getattr(layer.self_attn, name), "lora_A"), f"layer {i} self_attn.{name}"
        mlp = layer.block_sparse_moe.shared_experts if hasattr(layer, "block_sparse_moe") else layer.mlp
        for name in MLP_TARGETS:
            assert hasattr(getattr(mlp, name), "lora_A"), f"layer {i} {name}"
        if hasattr(layer, "block_sparse_moe"):
            experts = layer.block_sparse_moe.experts
            wrapped = set()
            while hasattr(experts, "parameter_name"):  # one ParamWrapper per targeted parameter, nested
                wrapped.add(experts.parameter_name)
                experts = experts.base_layer
            assert wrapped == {"gate_up_proj", "down_proj"}, f"layer {i}"
            assert type(experts).__name__ == "KimiExperts"


def test_lora_linear_is_base_plus_scaled_low_rank_product():
    """An independent formula: y = x W^T + (alpha / r) x A^T B^T for one wrapped projection."""
    model = lora(tiny()).eval()
    proj = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    a, b = proj.lora_A["default"].weight, proj.lora_B["default"].weight
    expected = x @ proj.base_layer.weight.T + (8 / 4) * (x @ a.T) @ b.T
    assert torch.allclose(proj(x), expected, atol=1e-6)


def test_lora_trains_only_the_adapters_and_the_loss_falls():
    torch.manual_seed(0)
    model = get_peft_model(
        tiny(), LoraConfig(r=8, lora_alpha=16, target_modules=DECODE_SAFE_TARGETS, target_parameters=EXPERT_PARAMETERS)
    )
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids(4, 48)
    losses = []
    for step in range(8):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == trainable
            expert_grads = [n for n in with_grad if ".experts." in n]
            assert len(expert_grads) == 2 * 2 * 3  # (lora_A, lora_B) x (gate_up, down) x 3 MoE layers
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), f"frozen weight changed: {name}"


def test_gradient_checkpointing_gives_the_same_adapter_gradients():
    model = lora(tiny()).train()
    x = ids(2, 40)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_adapter_save_and_reload_on_a_fresh_base(tmp_path):
    model = lora(tiny()).eval()
    x = ids(2, 30)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
        base_only = tiny()(input_ids=x).logits
    assert (adapted - base_only).abs().max() > 1e-2, "the adapter should change the output"
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(tiny(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, adapted)


def test_merge_and_unload_matches_the_adapter_and_saves_with_our_layout(tmp_path):
    r = 4
    model = lora(tiny(), r=r).eval()
    x = ids(2, 30)
    with torch.no_grad():
        adapted = model(input_ids=x).logits
    base = tiny()
    merged = model.merge_and_unload()
    assert type(merged) is KimiLinearForCausalLM
    with torch.no_grad():
        assert (merged(input_ids=x).logits - adapted).abs().max() < 1e-5
    # each expert's merged update is its own low-rank product: rank <= r, and non-zero
    for i in (1, 2, 3):
        merged_w = merged.model.layers[i].block_sparse_moe.experts.gate_up_proj
        delta = merged_w - base.model.layers[i].block_sparse_moe.experts.gate_up_proj
        for e in range(delta.shape[0]):
            rank = torch.linalg.matrix_rank(delta[e].double(), rtol=1e-4).item()  # fp32 rounding is ~1e-7
            assert 1 <= rank <= r, (i, e, rank)
    merged.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in keys  # released per-expert names
    reloaded = KimiLinearForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - adapted).abs().max() < 1e-5


def _greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


def _cached_decode_gap(model, tokens: torch.Tensor, prefill: int) -> float:
    """Largest |logits| difference between decoding ``tokens[:, prefill:]`` one at a time with the cache and one
    forward over all tokens without it."""
    with torch.no_grad():
        full = model(input_ids=tokens, use_cache=False).logits
        out = model(input_ids=tokens[:, :prefill], use_cache=True)
        gap = (out.logits - full[:, :prefill]).abs().max().item()
        for t in range(prefill, tokens.shape[1]):
            out = model(input_ids=tokens[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            gap = max(gap, (out.logits[:, -1] - full[:, t]).abs().max().item())
    return gap


def test_lora_model_generates_with_our_cache():
    model = lora(tiny(), modules=DECODE_SAFE_TARGETS).eval()
    prompt = ids(2, 12, seed=3)
    out = model.generate(input_ids=prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 22)
    assert torch.equal(out, _greedy_without_cache(model, prompt, 10))
    assert _cached_decode_gap(model, out, 12) < 1e-4


def test_lora_on_kv_b_proj_is_used_by_cached_decode():
    """A LoRA-wrapped kv_b_proj makes MLA decode take the expanded path, so the adapter counts there too."""
    model = lora(tiny(), modules=["kv_b_proj"], experts=False).eval()
    tokens = ids(2, 20, seed=3)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=tokens, use_cache=False).logits
    with torch.no_grad():
        adapted = model(input_ids=tokens, use_cache=False).logits
    assert (adapted - base).abs().max() > 1e-2, "the adapter should change the logits noticeably"
    assert _cached_decode_gap(model, tokens, 12) < 1e-4
