"""Logit parity with transformers' native KimiLinearForCausalLM on the same random weights (CPU, fp32),
and the released router formula checked against an independent implementation written here."""

from __future__ import annotations

import pytest
import torch

from conftest import KDA, MLA, make_native_model
from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from modeling_kimi_linear.moe import KimiSparseMoeBlock

LAYER_MIXES = {
    "3:1": [KDA, KDA, KDA, MLA],
    "mla_last_twice": [KDA, MLA, KDA, KDA, MLA],
    "all_mla": [MLA, MLA],
}


def _load_ours(native, tmp_path, **config_overrides):
    native.save_pretrained(tmp_path)
    return KimiLinearForCausalLM.from_pretrained(tmp_path, **config_overrides).eval()


@pytest.mark.parametrize("mix", list(LAYER_MIXES))
@pytest.mark.parametrize("seqlen", [20, 150])
def test_logits_equal_native(tmp_path, mix, seqlen):
    native = make_native_model(LAYER_MIXES[mix])
    ours = _load_ours(native, tmp_path)
    ids = torch.randint(3, 128, (2, seqlen), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = native(ids).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"max |ours - native| = {err:.3g} for {mix}, T={seqlen}"


def _biased_native(seed=0):
    native = make_native_model(seed=seed)
    with torch.no_grad():
        for name, buf in native.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.5)
    return native


def test_router_bias_default_differs_from_native_and_flag_matches(tmp_path):
    native = _biased_native()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    ours_default = _load_ours(native, tmp_path / "a")
    ours_raw = _load_ours(native, tmp_path / "b", router_weights_include_bias=False)
    assert ours_default.config.router_weights_include_bias is True
    with torch.no_grad():
        expected = native(ids).logits
        raw = ours_raw(ids).logits
        default = ours_default(ids).logits
    assert (raw - expected).abs().max().item() <= 1e-4
    assert (default - expected).abs().max().item() > 1e-3, "bias-weighted routing should differ from native"


def released_moe_reference(block: KimiSparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The released MoE written out token by token: sigmoid scores, `+= bias` on a view (so the weights are the
    biased scores), top-k, renormalise with +1e-20, scale, fp32 weighted sum of expert outputs, shared expert."""
    gate, experts = block.gate, block.experts
    inter = experts.intermediate_size
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n].float() @ gate.weight.float().T
        scores = torch.sigmoid(logits)
        view = scores.view(-1)
        view += gate.e_score_correction_bias.float()  # the aliasing of the released code
        idx = torch.topk(view, gate.top_k).indices
        w = scores[idx]
        w = w / (w.sum() + 1e-20) * gate.scaling
        acc = torch.zeros(x.shape[-1], dtype=torch.float32)
        for j, e in enumerate(idx.tolist()):
            w1, w3 = experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:]
            h = torch.nn.functional.silu(x[n] @ w1.T) * (x[n] @ w3.T)
            acc += w[j] * (h @ experts.down_proj[e].T).float()
        out[n] = acc.to(x.dtype)
    shared = block.shared_experts
    return out + shared.down_proj(torch.nn.functional.silu(shared.gate_proj(x)) * shared.up_proj(x))


@pytest.mark.parametrize("groups,topk_group", [(1, 1), (4, 2)])
def test_moe_block_matches_released_formula(groups, topk_group):
    torch.manual_seed(0)
    cfg = KimiLinearConfig(
        vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_experts=8, num_experts_per_token=2,
        moe_intermediate_size=16, num_expert_group=groups, topk_group=topk_group,
        linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "head_dim": 8, "num_heads": 2},
    )
    block = KimiSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(1, 17, 24)
    with torch.no_grad():
        got, _ = block(x)
        if groups == 1:
            expected = released_moe_reference(block, x[0])
            assert (got[0] - expected).abs().max().item() <= 1e-5
        # grouped top-k: every chosen expert lies in one of the topk_group best groups
        ids, _, _ = block.gate(x[0])
        biased = torch.sigmoid(x[0] @ block.gate.weight.T) + block.gate.e_score_correction_bias
        group_score = biased.view(17, groups, -1).topk(min(2, 8 // groups), -1).values.sum(-1)
        best = group_score.topk(topk_group, -1).indices
        chosen_groups = ids // (8 // groups)
        assert all(set(chosen_groups[n].tolist()) <= set(best[n].tolist()) for n in range(17))


def test_grouped_and_looped_expert_paths_agree():
    """Inference uses one grouped matmul per projection, CPU training a loop over the active experts."""
    torch.manual_seed(1)
    cfg = KimiLinearConfig(
        vocab_size=32, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, num_experts=8, num_experts_per_token=3,
        moe_intermediate_size=16, linear_attn_config={"kda_layers": [1], "full_attn_layers": [2], "head_dim": 8,
                                                       "num_heads": 2},
    )
    block = KimiSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 13, 24)
    with torch.no_grad():
        grouped, _ = block(x)
    looped, _ = block(x)  # grad enabled -> loop path on CPU
    looped.sum().backward()
    assert block.experts.gate_up_proj.grad is not None
    assert (grouped - looped.detach()).abs().max().item() <= 1e-5
