"""Loading released / native-saved directories, saving the released names, dtypes, and the 48B inventory."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from modeling_kimi_linear.presets import load_preset

RELEASED_PARAMETERS = 49_122_681_728
RELEASED_TENSORS = 20_493


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _logits(model, seed=0):
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_released_dir_loads_and_matches_native(released_dir, native_model):
    ours = KimiLinearForCausalLM.from_pretrained(released_dir).eval()
    assert (_logits(ours) - _logits(native_model)).abs().max().item() <= 1e-4


def test_native_saved_dir_loads(native_dir, native_model):
    # native 5.23 saves the dense layer's MLP as block_sparse_moe.*; the release calls it mlp.*
    with safe_open(str(native_dir / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.gate_proj.weight" in f.keys()
    ours = KimiLinearForCausalLM.from_pretrained(native_dir).eval()
    assert (_logits(ours) - _logits(native_model)).abs().max().item() <= 1e-4


def test_save_writes_released_names_bit_exact(tmp_path, released_dir):
    ours = KimiLinearForCausalLM.from_pretrained(released_dir)
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    src, dst = _tensors(released_dir), _tensors(out)
    assert set(dst) == set(src)
    for key, tensor in src.items():
        assert dst[key].dtype == tensor.dtype and torch.equal(dst[key], tensor), key
    cfg = json.loads((out / "config.json").read_text())
    assert "linear_attn_config" in cfg and "layer_types" not in cfg
    assert cfg["linear_attn_config"]["kda_layers"] == [1, 2, 3]
    # and back again: released -> ours -> released -> ours gives the same weights
    again = KimiLinearForCausalLM.from_pretrained(out)
    for (k1, p1), (k2, p2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2)


def test_native_loads_what_we_save(tmp_path, released_dir, native_model):
    from transformers import KimiLinearForCausalLM as NativeModel

    ours = KimiLinearForCausalLM.from_pretrained(released_dir)
    ours.save_pretrained(tmp_path / "saved")
    native = NativeModel.from_pretrained(tmp_path / "saved").eval()
    assert (_logits(native) - _logits(native_model)).abs().max().item() <= 1e-4


def test_fp32_gate_parameters_survive_bf16(released_dir):
    ours = KimiLinearForCausalLM.from_pretrained(released_dir, dtype=torch.bfloat16)
    for name, p in ours.named_parameters():
        want = torch.float32 if name.endswith(("A_log", "dt_bias")) else torch.bfloat16
        assert p.dtype == want, name
    ours = KimiLinearForCausalLM.from_pretrained(released_dir).to(torch.bfloat16)
    kda = ours.model.layers[0].self_attn
    assert kda.A_log.dtype == torch.float32 and kda.dt_bias.dtype == torch.float32
    assert kda.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = ours(torch.randint(3, 128, (1, 70))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_pickle_weights_are_refused(tmp_path, native_model):
    (tmp_path / "config.json").write_text(json.dumps(native_model.config.to_dict()))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors|model.safetensors|no file named"):
        KimiLinearForCausalLM.from_pretrained(tmp_path)


def test_released_48b_inventory_on_meta_device():
    config = load_preset("kimi_linear_48b_a3b")
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS
    from modeling_kimi_linear.checkpoint_layout import released_key_shapes

    shapes = released_key_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert len(shapes) == RELEASED_TENSORS
    # spot checks against the released inventory (reference_model.md section 3.3)
    expected = {
        "model.embed_tokens.weight": (163840, 2304),
        "lm_head.weight": (163840, 2304),
        "model.layers.0.mlp.gate_proj.weight": (9216, 2304),
        "model.layers.0.self_attn.q_conv1d.weight": (4096, 1, 4),
        "model.layers.0.self_attn.A_log": (1, 1, 32, 1),
        "model.layers.0.self_attn.dt_bias": (4096,),
        "model.layers.0.self_attn.f_b_proj.weight": (4096, 128),
        "model.layers.0.self_attn.o_norm.weight": (128,),
        "model.layers.3.self_attn.q_proj.weight": (6144, 2304),
        "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": (576, 2304),
        "model.layers.3.self_attn.kv_b_proj.weight": (8192, 512),
        "model.layers.26.self_attn.kv_a_layernorm.weight": (512,),
        "model.layers.1.block_sparse_moe.gate.weight": (256, 2304),
        "model.layers.1.block_sparse_moe.gate.e_score_correction_bias": (256,),
        "model.layers.1.block_sparse_moe.experts.255.w1.weight": (1024, 2304),
        "model.layers.1.block_sparse_moe.experts.0.w2.weight": (2304, 1024),
        "model.layers.26.block_sparse_moe.shared_experts.down_proj.weight": (2304, 1024),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    # KDA layers hold 15 tensors, MLA layers 5 (reference_model.md: 20 x 15 + 7 x 5 attention tensors)
    attn = [k for k in shapes if ".self_attn." in k]
    per_layer = {}
    for key in attn:
        layer = int(re.match(r"model\.layers\.(\d+)\.", key).group(1))
        per_layer[layer] = per_layer.get(layer, 0) + 1
    assert sorted(set(per_layer.values())) == [5, 15]
    assert sum(1 for v in per_layer.values() if v == 15) == 20


def test_released_state_dict_round_trip(released_dir):
    from modeling_kimi_linear.checkpoint_layout import released_state_dict, state_dict_from_released

    src = _tensors(released_dir)
    ours = state_dict_from_released(src)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(released_dir))
    assert set(ours) == set(model.state_dict())
    back = released_state_dict(ours)
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_gate_up_op_fuses_each_experts_w1_and_w3_in_one_copy():
    """The loading op gives what stacking the w1's and the w3's and concatenating them gives (transformers' two
    ops), from independent per-expert tensors, and names the problem when the two lists do not pair up."""
    from modeling_kimi_linear.checkpoint_layout import _gate_up_op

    gen = torch.Generator().manual_seed(0)
    w1 = [torch.randn(3, 5, generator=gen) for _ in range(4)]
    w3 = [torch.randn(3, 5, generator=gen) for _ in range(4)]
    got = _gate_up_op().convert({"w1": list(w1), "w3": list(w3)}, ["w1", "w3"], ["gate_up_proj"])
    want = torch.cat([torch.stack(w1), torch.stack(w3)], 1)
    assert torch.equal(got["gate_up_proj"], want)
    with pytest.raises(ValueError, match="w1 and w3 differ"):
        _gate_up_op().convert({"w1": list(w1), "w3": w3[:3]}, ["w1", "w3"], ["gate_up_proj"])
