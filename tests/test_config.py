"""KimiLinearConfig: released / native layouts, validation, round trips through native transformers, presets.

Expected values are written from the released ``config.json`` facts (``reference_model.md`` sections 1-2, 1-based
layer lists) and from native transformers' ``KimiLinearConfig`` (``hf_integration.md`` section 1.2), never read
back from the code under test.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import KimiLinearConfig as NativeConfig


def _import_config_modules():
    """``KimiLinearConfig`` and ``load_preset`` without needing the model code.

    Importing ``modeling_kimi_linear.<sub>`` runs the package ``__init__``, which imports the model (and so
    ``kda_torch``). If that fails because another module is mid-edit, load the two config modules as a private
    package of their own so that these tests still run.
    """
    try:
        from modeling_kimi_linear.configuration_kimi_linear import KimiLinearConfig
        from modeling_kimi_linear.presets import load_preset

        return KimiLinearConfig, load_preset
    except ImportError:
        name = "_kimi_linear_config_only"
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "modeling_kimi_linear")]
        sys.modules[name] = pkg
        configuration = importlib.import_module(f"{name}.configuration_kimi_linear")
        presets = importlib.import_module(f"{name}.presets")
        return configuration.KimiLinearConfig, presets.load_preset


KimiLinearConfig, load_preset = _import_config_modules()

KDA, MLA = "linear_attention", "full_attention"
DENSE, SPARSE = "dense", "sparse"
RELEASED_JSON = Path(__file__).resolve().parents[1] / "configuration" / "kimi_linear_48b_a3b.json"

# ---- facts of the released Kimi-Linear-48B-A3B config.json (reference_model.md 1.1), written literally ----
RELEASED_FULL_ATTN_LAYERS_1BASED = [4, 8, 12, 16, 20, 24, 27]
RELEASED_KDA_LAYERS_1BASED = [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26]
RELEASED_FACTS = {
    "vocab_size": 163840,
    "hidden_size": 2304,
    "num_hidden_layers": 27,
    "intermediate_size": 9216,
    "hidden_act": "silu",
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "model_max_length": 1048576,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "moe_intermediate_size": 1024,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_router_activation_func": "sigmoid",
    "moe_renormalize": True,
    "routed_scaling_factor": 2.446,
    "use_grouped_topk": True,
    "num_expert_group": 1,
    "topk_group": 1,
    "num_nextn_predict_layers": 0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
}
# 0-based MLA indices derived in the test from the literal 1-based list, cross-checked with the reference's
# "Derived layer schedule" (MLA 3, 7, 11, 15, 19, 23, 26; note 23 and 26 are the last two).
RELEASED_MLA_0BASED = [n - 1 for n in RELEASED_FULL_ATTN_LAYERS_1BASED]

# Released-layout keys that Moonshot's remote code / vLLM / native transformers read.
RELEASED_KEYS = (
    "linear_attn_config", "num_experts", "num_experts_per_token", "moe_intermediate_size", "num_shared_experts",
    "first_k_dense_replace", "moe_layer_freq", "moe_router_activation_func", "moe_renormalize",
    "routed_scaling_factor", "use_grouped_topk", "num_expert_group", "topk_group", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_use_nope", "q_lora_rank", "model_max_length",
)
NATIVE_ONLY_KEYS = (
    "layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim",
    "num_local_experts", "num_experts_per_tok", "n_shared_experts", "n_group", "norm_topk_prob",
)


def tiny(**overrides) -> dict:
    """A valid 4-layer config in the released layout (KDA, KDA, KDA, MLA; layer 0 dense, 1-3 MoE)."""
    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        linear_attn_config=lac([1, 2, 3], [4]),
        num_experts=8, num_experts_per_token=2, moe_intermediate_size=32, num_shared_experts=1,
        first_k_dense_replace=1, moe_layer_freq=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


def lac(kda: list[int], full: list[int], head_dim: int = 16, num_heads: int = 4, conv: int = 4) -> dict:
    """A released-style ``linear_attn_config`` (1-based lists)."""
    return {"kda_layers": kda, "full_attn_layers": full, "head_dim": head_dim, "num_heads": num_heads,
            "short_conv_kernel_size": conv}


def schedule(config) -> tuple[list[str], list[str]]:
    return list(config.layer_types), [SPARSE if config.is_moe_layer(i) else DENSE
                                      for i in range(config.num_hidden_layers)]


# =====================================================================================================
# 1. reading the released layout
# =====================================================================================================
@pytest.mark.parametrize("source", ["json_file", "from_json_file", "preset"])
def test_released_config_json_is_read(source):
    if source == "json_file":
        config = KimiLinearConfig(**json.loads(RELEASED_JSON.read_text()))
    elif source == "from_json_file":
        config = KimiLinearConfig.from_json_file(str(RELEASED_JSON))
    else:
        config = load_preset("kimi_linear_48b_a3b")

    assert RELEASED_MLA_0BASED == [3, 7, 11, 15, 19, 23, 26]
    assert config.mla_layers == RELEASED_MLA_0BASED
    expected_kda = [i for i in range(27) if i not in RELEASED_MLA_0BASED]
    assert config.kda_layers == expected_kda and len(expected_kda) == 20
    assert [n - 1 for n in RELEASED_KDA_LAYERS_1BASED] == expected_kda
    assert config.layer_types == [MLA if i in RELEASED_MLA_0BASED else KDA for i in range(27)]
    assert [config.is_kda_layer(i) for i in range(27)] == [i not in RELEASED_MLA_0BASED for i in range(27)]

    assert config.is_moe_layer(0) is False
    assert all(config.is_moe_layer(i) for i in range(1, 27))
    assert config.mlp_layer_types == [DENSE] + [SPARSE] * 26

    assert (config.kda_num_heads, config.kda_head_dim, config.kda_conv_size) == (32, 128, 4)
    assert config.mla_latent_dim == 576  # kv_lora_rank 512 + qk_rope_head_dim 64
    for key, value in RELEASED_FACTS.items():
        assert getattr(config, key) == value, key


def test_default_config_has_the_released_schedule():
    config = KimiLinearConfig()
    assert config.mla_layers == RELEASED_MLA_0BASED
    assert len(config.kda_layers) == 20
    assert config.mlp_layer_types == [DENSE] + [SPARSE] * 26


# =====================================================================================================
# 2. reading the native transformers layout
# =====================================================================================================
NATIVE_MIX = [MLA, KDA, KDA, MLA, KDA]
NATIVE_MLP = [DENSE, DENSE, SPARSE, SPARSE, SPARSE]


def native_custom() -> NativeConfig:
    return NativeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, num_local_experts=12, num_experts_per_tok=3, n_shared_experts=2, n_group=4, topk_group=2,
        norm_topk_prob=False, routed_scaling_factor=1.5, linear_head_dim=24, linear_num_heads=6,
        linear_conv_kernel_dim=3, layer_types=list(NATIVE_MIX), mlp_layer_types=list(NATIVE_MLP),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def assert_native_custom(config):
    assert schedule(config) == (NATIVE_MIX, NATIVE_MLP)
    assert config.mla_layers == [0, 3] and config.kda_layers == [1, 2, 4]
    assert config.first_k_dense_replace == 2 and config.moe_layer_freq == 1
    assert (config.kda_num_heads, config.kda_head_dim, config.kda_conv_size) == (6, 24, 3)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (16, 16, 8, 16)
    assert (config.hidden_size, config.intermediate_size, config.moe_intermediate_size) == (64, 96, 32)
    assert (config.num_experts, config.num_experts_per_token, config.num_shared_experts) == (12, 3, 2)
    assert (config.num_expert_group, config.topk_group) == (4, 2)
    assert config.moe_renormalize is False
    assert config.routed_scaling_factor == 1.5
    assert config.mla_latent_dim == 24


def test_native_to_dict_is_read():
    native = native_custom()
    assert native.layer_types == NATIVE_MIX  # sanity: native kept what it was given
    assert_native_custom(KimiLinearConfig(**native.to_dict()))
    assert_native_custom(KimiLinearConfig.from_dict(native.to_dict()))


def test_native_saved_directory_is_read(tmp_path):
    native_custom().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == NATIVE_MIX  # sanity: this really is the native layout
    assert "linear_attn_config" not in saved
    assert_native_custom(KimiLinearConfig.from_pretrained(tmp_path))


def test_native_default_mlp_schedule_from_first_k_dense_replace():
    native = NativeConfig(**{**native_custom().to_dict(), "mlp_layer_types": None, "first_k_dense_replace": 3})
    config = KimiLinearConfig(**native.to_dict())
    assert config.mlp_layer_types == [DENSE, DENSE, DENSE, SPARSE, SPARSE]
    assert config.first_k_dense_replace == 3


# =====================================================================================================
# 3. writing the released layout
# =====================================================================================================
def test_to_dict_writes_released_layout():
    config = KimiLinearConfig(**tiny(linear_attn_config=None, layer_types=[MLA, KDA, KDA, MLA]))
    out = config.to_dict()
    for key in NATIVE_ONLY_KEYS:
        assert key not in out, key
    for key in RELEASED_KEYS:
        assert key in out, key
    assert out["linear_attn_config"]["kda_layers"] == [2, 3]
    assert out["linear_attn_config"]["full_attn_layers"] == [1, 4]
    assert (out["linear_attn_config"]["head_dim"], out["linear_attn_config"]["num_heads"],
            out["linear_attn_config"]["short_conv_kernel_size"]) == (128, 32, 4)  # documented defaults
    assert (out["num_experts"], out["num_experts_per_token"]) == (8, 2)
    assert (out["first_k_dense_replace"], out["moe_layer_freq"]) == (1, 1)


def test_to_dict_is_a_copy():
    config = KimiLinearConfig(**tiny())
    out = config.to_dict()
    out["linear_attn_config"]["kda_layers"].append(4)
    assert config.to_dict()["linear_attn_config"]["kda_layers"] == [1, 2, 3]


def test_save_pretrained_writes_released_layout(tmp_path):
    KimiLinearConfig(**json.loads(RELEASED_JSON.read_text())).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in NATIVE_ONLY_KEYS:
        assert key not in saved, key
    assert saved["linear_attn_config"]["full_attn_layers"] == RELEASED_FULL_ATTN_LAYERS_1BASED
    assert saved["linear_attn_config"]["kda_layers"] == RELEASED_KDA_LAYERS_1BASED
    assert (saved["linear_attn_config"]["head_dim"], saved["linear_attn_config"]["num_heads"],
            saved["linear_attn_config"]["short_conv_kernel_size"]) == (128, 32, 4)
    for key, value in RELEASED_FACTS.items():
        assert saved[key] == value, key
    assert saved["model_type"] == "kimi_linear"


def test_save_pretrained_writes_the_moe_schedule_of_mlp_layer_types(tmp_path):
    # layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek-V3 rule)
    kwargs = tiny(num_hidden_layers=5, linear_attn_config=lac([1, 2, 3, 5], [4]),
                  mlp_layer_types=[DENSE, DENSE, SPARSE, DENSE, SPARSE])
    del kwargs["first_k_dense_replace"], kwargs["moe_layer_freq"]  # mlp_layer_types alone sets the schedule
    KimiLinearConfig(**kwargs).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["first_k_dense_replace"], saved["moe_layer_freq"]) == (2, 2)
    assert "mlp_layer_types" not in saved
    reread = KimiLinearConfig.from_pretrained(tmp_path)
    assert reread.mlp_layer_types == [DENSE, DENSE, SPARSE, DENSE, SPARSE]


def test_all_dense_mlp_layer_types_are_written_as_no_moe_layer():
    kwargs = tiny(mlp_layer_types=[DENSE] * 4)
    del kwargs["first_k_dense_replace"], kwargs["moe_layer_freq"]
    config = KimiLinearConfig(**kwargs)
    assert [config.is_moe_layer(i) for i in range(4)] == [False] * 4
    out = config.to_dict()
    assert out["first_k_dense_replace"] >= 4  # no layer index reaches the first MoE layer
    assert KimiLinearConfig(**out).mlp_layer_types == [DENSE] * 4


def test_moe_layer_freq_schedule():
    config = KimiLinearConfig(**tiny(num_hidden_layers=6, linear_attn_config=lac([1, 2, 3, 5, 6], [4]),
                                     first_k_dense_replace=1, moe_layer_freq=2))
    assert config.mlp_layer_types == [DENSE, DENSE, SPARSE, DENSE, SPARSE, DENSE]


def test_no_experts_means_all_dense():
    config = KimiLinearConfig(**tiny(num_experts=None, num_experts_per_token=None))
    assert config.mlp_layer_types == [DENSE] * 4
    assert not any(config.is_moe_layer(i) for i in range(4))


# =====================================================================================================
# 4. round trips through native transformers
# =====================================================================================================
def _compare(a, b):
    assert schedule(a) == schedule(b)
    for key in ("kda_num_heads", "kda_head_dim", "kda_conv_size", "mla_latent_dim", "hidden_size",
                "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "q_lora_rank", "num_experts", "num_experts_per_token", "num_shared_experts", "num_expert_group",
                "topk_group", "moe_renormalize", "routed_scaling_factor", "moe_router_activation_func",
                "router_weights_include_bias", "kda_backend", "first_k_dense_replace", "moe_layer_freq",
                "rms_norm_eps", "vocab_size", "model_max_length", "tie_word_embeddings", "mla_use_nope",
                "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(a, key) == getattr(b, key), key


CUSTOM_RELEASED = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
    num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    linear_attn_config={"full_attn_layers": [2, 5], "kda_layers": [1, 3, 4], "head_dim": 24, "num_heads": 6,
                        "short_conv_kernel_size": 3},
    num_experts=12, num_experts_per_token=3, moe_intermediate_size=32, num_shared_experts=2,
    first_k_dense_replace=2, moe_layer_freq=1, num_expert_group=4, topk_group=2, moe_renormalize=False,
    routed_scaling_factor=1.25, moe_router_activation_func="softmax", router_weights_include_bias=False,
    kda_backend="torch", pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
CUSTOM_LAYER_TYPES = [KDA, MLA, KDA, KDA, MLA]
CUSTOM_MLP = [DENSE, DENSE, SPARSE, SPARSE, SPARSE]


@pytest.mark.parametrize("which", ["released_48b", "custom"])
def test_round_trip_released_ours_native_ours(which):
    released = json.loads(RELEASED_JSON.read_text()) if which == "released_48b" else dict(CUSTOM_RELEASED)
    ours = KimiLinearConfig(**released)
    native = NativeConfig(**ours.to_dict())
    if which == "released_48b":
        assert native.layer_types == [MLA if i in RELEASED_MLA_0BASED else KDA for i in range(27)]
        assert native.mlp_layer_types == [DENSE] + [SPARSE] * 26
        assert (native.linear_num_heads, native.linear_head_dim, native.linear_conv_kernel_dim) == (32, 128, 4)
        assert (native.num_local_experts, native.num_experts_per_tok, native.n_shared_experts) == (256, 8, 1)
        assert native.routed_scaling_factor == 2.446
    else:
        assert native.layer_types == CUSTOM_LAYER_TYPES
        assert native.mlp_layer_types == CUSTOM_MLP
        assert (native.linear_num_heads, native.linear_head_dim, native.linear_conv_kernel_dim) == (6, 24, 3)
        assert (native.num_local_experts, native.num_experts_per_tok, native.n_shared_experts) == (12, 3, 2)
        assert (native.n_group, native.topk_group, native.norm_topk_prob) == (4, 2, False)
        assert native.routed_scaling_factor == 1.25
    back = KimiLinearConfig(**native.to_dict())
    _compare(ours, back)
    if which == "custom":
        assert schedule(back) == (CUSTOM_LAYER_TYPES, CUSTOM_MLP)
        assert (back.moe_router_activation_func, back.router_weights_include_bias, back.kda_backend) == (
            "softmax", False, "torch")


@pytest.mark.parametrize("which", ["released_48b", "custom"])
def test_native_from_pretrained_reads_our_saved_directory(tmp_path, which):
    released = json.loads(RELEASED_JSON.read_text()) if which == "released_48b" else dict(CUSTOM_RELEASED)
    ours = KimiLinearConfig(**released)
    ours.save_pretrained(tmp_path)
    native = NativeConfig.from_pretrained(tmp_path)
    assert type(native) is NativeConfig
    if which == "released_48b":
        assert native.layer_types == [MLA if i in RELEASED_MLA_0BASED else KDA for i in range(27)]
        assert native.mlp_layer_types == [DENSE] + [SPARSE] * 26
        assert (native.linear_num_heads, native.linear_head_dim, native.linear_conv_kernel_dim) == (32, 128, 4)
        assert (native.num_local_experts, native.num_experts_per_tok) == (256, 8)
    else:
        assert native.layer_types == CUSTOM_LAYER_TYPES
        assert native.mlp_layer_types == CUSTOM_MLP
        assert (native.linear_num_heads, native.linear_head_dim, native.linear_conv_kernel_dim) == (6, 24, 3)
        assert (native.num_local_experts, native.num_experts_per_tok, native.n_group) == (12, 3, 4)
    _compare(ours, KimiLinearConfig.from_pretrained(tmp_path))
    # and back through native's own save
    native_dir = tmp_path / "native"
    native.save_pretrained(native_dir)
    _compare(ours, KimiLinearConfig.from_pretrained(native_dir))


def test_moe_layer_freq_survives_native_round_trip_or_raises():
    ours = KimiLinearConfig(**tiny(num_hidden_layers=5, linear_attn_config=lac([1, 2, 3, 5], [4]),
                                   first_k_dense_replace=1, moe_layer_freq=2))
    assert ours.mlp_layer_types == [DENSE, DENSE, SPARSE, DENSE, SPARSE]
    native_dict = NativeConfig(**ours.to_dict()).to_dict()
    assert native_dict["moe_layer_freq"] == 2  # native keeps the key ...
    assert native_dict["mlp_layer_types"] == [DENSE] + [SPARSE] * 4  # ... but ignores it
    # either the schedule survives, or the contradiction is reported
    try:
        back = KimiLinearConfig(**native_dict)
    except ValueError as err:
        assert "mlp_layer_types" in str(err) or "moe_layer_freq" in str(err)
    else:
        assert back.mlp_layer_types == [DENSE, DENSE, SPARSE, DENSE, SPARSE]


# =====================================================================================================
# 5. any layer mix
# =====================================================================================================
MIXES = {
    "all_kda": [KDA, KDA, KDA, KDA],
    "all_mla": [MLA, MLA, MLA, MLA],
    "3_to_1": [KDA, KDA, KDA, MLA],
    "mla_first": [MLA, KDA, KDA, KDA],
    "mla_last_3": [KDA, KDA, MLA],
    "single_kda": [KDA],
    "single_mla": [MLA],
}


@pytest.mark.parametrize("name", sorted(MIXES))
@pytest.mark.parametrize("via", ["layer_types", "linear_attn_config"])
def test_any_layer_mix(name, via):
    types_ = MIXES[name]
    n = len(types_)
    kda_1based = [i + 1 for i, t in enumerate(types_) if t == KDA]
    full_1based = [i + 1 for i, t in enumerate(types_) if t == MLA]
    common = tiny(num_hidden_layers=n, linear_attn_config=None)
    if via == "layer_types":
        config = KimiLinearConfig(**{**common, "layer_types": list(types_),
                                     "linear_head_dim": 16, "linear_num_heads": 4})
    else:
        config = KimiLinearConfig(**{**common, "linear_attn_config": lac(kda_1based, full_1based)})
    assert config.layer_types == types_
    assert config.kda_layers == [i for i, t in enumerate(types_) if t == KDA]
    assert config.mla_layers == [i for i, t in enumerate(types_) if t == MLA]
    assert [config.is_kda_layer(i) for i in range(n)] == [t == KDA for t in types_]
    out = config.to_dict()
    assert out["linear_attn_config"]["kda_layers"] == kda_1based
    assert out["linear_attn_config"]["full_attn_layers"] == full_1based
    assert KimiLinearConfig(**out).layer_types == types_
    assert NativeConfig(**out).layer_types == types_


def test_all_kda_needs_no_mla_sizes():
    config = KimiLinearConfig(**tiny(linear_attn_config=lac([1, 2, 3, 4], []), kv_lora_rank=None,
                                     qk_nope_head_dim=None, qk_rope_head_dim=None, v_head_dim=None))
    assert config.mla_layers == []


def test_all_mla_needs_no_kda_sizes():
    config = KimiLinearConfig(**tiny(linear_attn_config=lac([], [1, 2, 3, 4], head_dim=0, num_heads=0)))
    assert config.kda_layers == []


def test_layer_types_agreeing_with_linear_attn_config_is_accepted():
    config = KimiLinearConfig(**tiny(layer_types=[KDA, KDA, KDA, MLA]))
    assert config.mla_layers == [3]


# =====================================================================================================
# 6. validation: one ValueError naming the field
# =====================================================================================================
INVALID = {
    "overlap": (dict(linear_attn_config=lac([1, 2, 3, 4], [4])), r"kda_layers.*full_attn_layers"),
    "in_neither_list": (dict(linear_attn_config=lac([1, 2], [4])), r"neither kda_layers nor full_attn_layers"),
    "layer_zero_1based": (dict(linear_attn_config=lac([0, 1, 2, 3], [4])), r"kda_layers"),
    "layer_above_range": (dict(linear_attn_config=lac([1, 2, 3], [5])), r"full_attn_layers"),
    "layer_0based_list": (dict(linear_attn_config=lac([0, 1, 2], [3])), r"kda_layers"),
    "duplicated_layer": (dict(linear_attn_config=lac([1, 2, 2, 3], [4])), r"kda_layers"),
    "only_kda_list": (dict(linear_attn_config={"kda_layers": [1, 2, 3]}), r"full_attn_layers"),
    "only_full_list": (dict(linear_attn_config={"full_attn_layers": [4]}), r"kda_layers"),
    "layer_list_not_ints": (dict(linear_attn_config=lac([1.0, 2, 3], [4])), r"kda_layers"),
    "layer_types_too_short": (dict(linear_attn_config=None, layer_types=[KDA, KDA, MLA]), r"layer_types"),
    "layer_types_too_long": (dict(linear_attn_config=None, layer_types=[KDA] * 5), r"layer_types"),
    "layer_types_unknown": (dict(linear_attn_config=None, layer_types=[KDA, "mamba", KDA, MLA]), r"layer_types"),
    "layer_types_disagree": (dict(layer_types=[MLA, KDA, KDA, KDA]), r"layer_types"),
    "kv_heads_not_dividing": (dict(num_key_value_heads=3), r"num_key_value_heads"),
    "kv_heads_zero": (dict(num_key_value_heads=0), r"num_key_value_heads"),
    "top_k_above_experts": (dict(num_experts_per_token=9), r"num_experts_per_token"),
    "groups_not_dividing": (dict(num_expert_group=3), r"num_expert_group"),
    "topk_group_above_groups": (dict(num_expert_group=2, topk_group=3), r"topk_group"),
    "topk_group_zero": (dict(topk_group=0), r"topk_group"),
    "top_k_above_selected_groups": (dict(num_expert_group=4, topk_group=1, num_experts_per_token=4),
                                    r"num_experts_per_token"),
    "router_activation": (dict(moe_router_activation_func="relu"), r"moe_router_activation_func"),
    "hidden_act": (dict(hidden_act="not_an_activation"), r"hidden_act"),
    "kda_backend": (dict(kda_backend="cuda"), r"kda_backend"),
    "decode_kernels": (dict(decode_kernels="cuda"), r"decode_kernels"),
    "hidden_size_zero": (dict(hidden_size=0), r"hidden_size"),
    "hidden_size_negative": (dict(hidden_size=-64), r"hidden_size"),
    "vocab_size_zero": (dict(vocab_size=0), r"vocab_size"),
    "num_hidden_layers_zero": (dict(num_hidden_layers=0, linear_attn_config=None, layer_types=[]),
                               r"num_hidden_layers"),
    "num_attention_heads_zero": (dict(num_attention_heads=0, num_key_value_heads=1), r"num_attention_heads"),
    "kda_head_dim_zero": (dict(linear_attn_config=lac([1, 2, 3], [4], head_dim=0)),
                          r"linear_attn_config\.head_dim|linear_head_dim"),
    "kda_num_heads_zero": (dict(linear_attn_config=lac([1, 2, 3], [4], num_heads=0)),
                           r"linear_attn_config\.num_heads|linear_num_heads"),
    "kda_conv_zero": (dict(linear_attn_config=lac([1, 2, 3], [4], conv=0)),
                      r"short_conv_kernel_size|linear_conv_kernel_dim"),
    "kv_lora_rank_zero": (dict(kv_lora_rank=0), r"kv_lora_rank"),
    "v_head_dim_zero": (dict(v_head_dim=0), r"v_head_dim"),
    "num_experts_zero": (dict(num_experts=0), r"num_experts(?!_per)"),
    "moe_intermediate_zero": (dict(moe_intermediate_size=0), r"moe_intermediate_size"),
    "intermediate_zero_with_dense_layer": (dict(intermediate_size=0), r"intermediate_size"),
    "shared_experts_negative": (dict(num_shared_experts=-1), r"num_shared_experts"),
    "mlp_layer_types_not_expressible": (dict(mlp_layer_types=[DENSE, SPARSE, DENSE, SPARSE]), r"mlp_layer_types"),
    "mlp_layer_types_wrong_length": (dict(mlp_layer_types=[DENSE, SPARSE]), r"mlp_layer_types"),
    "mlp_layer_types_unknown": (dict(mlp_layer_types=[DENSE, "moe", SPARSE, SPARSE]), r"mlp_layer_types"),
    "sparse_without_experts": (dict(num_experts=None, num_experts_per_token=None,
                                    mlp_layer_types=[DENSE, SPARSE, SPARSE, SPARSE]), r"num_experts"),
    "moe_layer_freq_zero": (dict(moe_layer_freq=0), r"moe_layer_freq"),
    "first_k_dense_negative": (dict(first_k_dense_replace=-1), r"first_k_dense_replace"),
    "rope_scaling_set": (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), r"rope_scaling"),
    "mla_use_nope_false": (dict(mla_use_nope=False), r"mla_use_nope"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_config_raises_one_value_error(case):
    overrides, field = INVALID[case]
    with pytest.raises(ValueError, match=field) as excinfo:
        KimiLinearConfig(**tiny(**overrides))
    assert excinfo.value.__cause__ is None  # one error, not a chain


def test_released_rope_scaling_null_is_accepted():
    config = KimiLinearConfig(**tiny(rope_scaling=None))
    assert config.mla_layers == [3]


def test_valid_grouped_routing_is_accepted():
    # 8 experts in 4 groups of 2, 2 groups selected -> 4 reachable experts, top-4 is fine
    config = KimiLinearConfig(**tiny(num_expert_group=4, topk_group=2, num_experts_per_token=4))
    assert (config.num_expert_group, config.topk_group, config.num_experts_per_token) == (4, 2, 4)


# =====================================================================================================
# 7. presets
# =====================================================================================================
@pytest.fixture
def no_preset_env(monkeypatch):
    monkeypatch.delenv("KIMI_LINEAR_CONFIGS", raising=False)


def test_preset_tiny(no_preset_env):
    config = load_preset("tiny")
    assert config.num_hidden_layers == 4 and config.hidden_size == 64 and config.vocab_size == 512
    assert config.mla_layers == [3] and config.kda_layers == [0, 1, 2]
    assert config.mlp_layer_types == [DENSE, SPARSE, SPARSE, SPARSE]
    assert (config.num_experts, config.num_experts_per_token, config.num_shared_experts) == (8, 2, 1)
    assert (config.kda_num_heads, config.kda_head_dim, config.kda_conv_size) == (2, 32, 4)
    assert config.kda_backend == "auto"


def test_preset_small(no_preset_env):
    config = load_preset("small")
    assert config.num_hidden_layers == 12 and config.hidden_size == 512
    assert config.mla_layers == [3, 7, 11] and len(config.kda_layers) == 9
    assert config.mlp_layer_types == [DENSE] + [SPARSE] * 11
    assert (config.num_experts, config.num_experts_per_token, config.num_shared_experts) == (16, 2, 1)
    assert (config.kda_num_heads, config.kda_head_dim) == (4, 128)


def test_preset_48b(no_preset_env):
    config = load_preset("kimi_linear_48b_a3b")
    assert config.mla_layers == RELEASED_MLA_0BASED
    for key, value in RELEASED_FACTS.items():
        assert getattr(config, key) == value, key


def test_preset_overrides(no_preset_env):
    assert load_preset("tiny", kda_backend="torch").kda_backend == "torch"
    assert load_preset("tiny").kda_backend == "auto"  # overrides do not stick
    config = load_preset("tiny", num_experts_per_token=4, router_weights_include_bias=False,
                         linear_attn_config=lac([1, 2, 3, 4], []))
    assert config.num_experts_per_token == 4
    assert config.router_weights_include_bias is False
    assert config.layer_types == [KDA] * 4
    with pytest.raises(ValueError, match="kda_backend"):
        load_preset("tiny", kda_backend="cuda")


def test_unknown_preset_names_the_available_ones(no_preset_env):
    with pytest.raises(FileNotFoundError, match="no_such_preset") as excinfo:
        load_preset("no_such_preset")
    for name in ("tiny", "small", "kimi_linear_48b_a3b"):
        assert name in str(excinfo.value)


def test_small_preset_parameter_count(no_preset_env):
    pytest.importorskip("modeling_kimi_linear.kda_torch", exc_type=ImportError)
    from modeling_kimi_linear import KimiLinearForCausalLM
    from modeling_kimi_linear.presets import load_preset as package_load_preset

    with torch.device("meta"):
        model = KimiLinearForCausalLM(package_load_preset("small"))
    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000_000 <= n_params <= 150_000_000, n_params


# =====================================================================================================
# 8. defaults and native aliases
# =====================================================================================================
def test_defaults():
    config = KimiLinearConfig(**tiny())
    assert config.router_weights_include_bias is True
    assert config.kda_backend == "auto"
    assert config.mla_use_nope is True
    default = KimiLinearConfig()
    assert default.router_weights_include_bias is True
    assert default.kda_backend == "auto"


@pytest.mark.parametrize(
    "alias, value, attribute",
    [
        ("num_local_experts", 16, "num_experts"),
        ("num_experts_per_tok", 4, "num_experts_per_token"),
        ("n_shared_experts", 2, "num_shared_experts"),
        ("n_group", 4, "num_expert_group"),
        ("norm_topk_prob", False, "moe_renormalize"),
        ("max_position_embeddings", 4096, "model_max_length"),
    ],
)
def test_native_alias(alias, value, attribute):
    base = tiny()
    base.pop(attribute, None)
    config = KimiLinearConfig(**base, **{alias: value})
    assert getattr(config, attribute) == value
    out = config.to_dict()
    assert out[attribute] == value
    assert alias not in out


def test_all_aliases_together():
    base = {k: v for k, v in tiny().items() if k not in ("num_experts", "num_experts_per_token",
                                                          "num_shared_experts")}
    config = KimiLinearConfig(**base, num_local_experts=16, num_experts_per_tok=4, n_shared_experts=2, n_group=4,
                              topk_group=2, norm_topk_prob=False)
    assert (config.num_experts, config.num_experts_per_token, config.num_shared_experts) == (16, 4, 2)
    assert (config.num_expert_group, config.topk_group, config.moe_renormalize) == (4, 2, False)
