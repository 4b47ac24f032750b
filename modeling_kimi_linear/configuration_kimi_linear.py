"""Configuration of Kimi Linear (hybrid KDA / MLA decoder with a sigmoid-routed MoE).

The class reads two layouts:

* the released Moonshot layout (``config.json`` of ``moonshotai/Kimi-Linear-48B-A3B-*``): a
  ``linear_attn_config`` dict with 1-based ``kda_layers`` / ``full_attn_layers`` lists, ``num_experts``,
  ``num_experts_per_token``, ``first_k_dense_replace``, ...
* the transformers-native layout (``layer_types``, ``mlp_layer_types``, ``linear_head_dim``,
  ``linear_num_heads``, ``linear_conv_kernel_dim``, ``num_local_experts``, ...).

It always writes the released layout (see :meth:`KimiLinearConfig.to_dict`), which Moonshot's code, vLLM and
native transformers all read. Inconsistent values raise one ``ValueError`` naming the field.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig

KDA = "linear_attention"
MLA = "full_attention"
DENSE = "dense"
SPARSE = "sparse"

KDA_BACKENDS = ("auto", "torch", "fla")
DECODE_KERNELS = ("auto", "torch", "triton")
# "channel": KDA's per-channel forget gate (the release); "head": one scalar decay per head (Gated DeltaNet).
KDA_GATE_GRANULARITIES = ("channel", "head")
ROUTER_ACTIVATIONS = ("sigmoid", "softmax")

# Native transformers spellings accepted on input (value: our attribute).
_ALIASES = {
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
    "n_group": "num_expert_group",
    "norm_topk_prob": "moe_renormalize",
    "max_position_embeddings": "model_max_length",
    "n_routed_experts": "num_experts",
}
# Keys that native transformers derives and writes but that carry no information of their own.
_NATIVE_DERIVED_KEYS = ("qk_head_dim", "pretraining_tp", "attention_bias", "attention_dropout", "rope_parameters")


class KimiLinearConfig(PreTrainedConfig):
    r"""Configuration for :class:`KimiLinearForCausalLM`.

    Args:
        vocab_size: vocabulary size (163840 for the release).
        hidden_size: width of the residual stream.
        intermediate_size: width of the dense SwiGLU MLP used on the first ``first_k_dense_replace`` layers.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: MLA heads.
        num_key_value_heads: kept for compatibility; must divide ``num_attention_heads``.
        hidden_act: activation of every MLP (``"silu"``).
        rms_norm_eps: epsilon of the decoder / final RMSNorms and of the KDA output norm.
        q_lora_rank: ``None`` for a plain ``q_proj`` (release), else the rank of ``q_a_proj`` / ``q_b_proj``.
        kv_lora_rank: width of the cached MLA latent (512).
        qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA head sizes (128, 64, 128). The "rope" part is
            never rotated (``mla_use_nope=True``): Kimi Linear has no positional encoding.
        linear_attn_config: ``{"kda_layers": [...], "full_attn_layers": [...], "head_dim": 128,
            "num_heads": 32, "short_conv_kernel_size": 4}`` with **1-based** layer numbers.
        layer_types: alternative to the two lists, one of ``"linear_attention"`` (KDA) /
            ``"full_attention"`` (MLA) per layer.
        num_experts, num_experts_per_token, moe_intermediate_size, num_shared_experts: MoE sizes.
        first_k_dense_replace, moe_layer_freq: layer ``i`` is MoE iff ``num_experts`` is set,
            ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``.
        moe_renormalize, routed_scaling_factor, num_expert_group, topk_group, moe_router_activation_func:
            router settings (sigmoid scores, grouped top-k, renormalisation, scaling).
        router_weights_include_bias: ``True`` (default) weights the chosen experts with the bias-corrected
            scores exactly like the released code; ``False`` uses the raw scores (vLLM / native transformers).
        kda_backend: ``"auto"`` (FLA kernels for CUDA tensors when ``fla`` imports, PyTorch otherwise),
            ``"torch"`` or ``"fla"``.
        kda_gate_granularity: ``"channel"`` (default, released KDA: one forget gate per head and key channel) or
            ``"head"`` (one scalar forget gate per head, as in Gated DeltaNet; an ablation, not loadable by other
            implementations). Written to ``config.json`` only when it is not the default.
        decode_kernels: ``"auto"`` (default: this package's Triton decode kernels - MLA flash-decoding, the MoE's
            chosen experts, the fused KDA step, projections in one launch, add + RMSNorm - for CUDA tensors when
            ``triton`` imports, PyTorch otherwise),
            ``"torch"`` (always the PyTorch reference) or ``"triton"`` (CUDA tensors only; a clear error
            otherwise). Written to ``config.json`` only when it is not the default.
    """

    model_type = "kimi_linear"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {alias: name for alias, name in _ALIASES.items() if alias != "n_routed_experts"}

    def __init__(
        self,
        vocab_size: int = 163840,
        hidden_size: int = 2304,
        intermediate_size: int = 9216,
        num_hidden_layers: int = 27,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        use_cache: bool = True,
        pad_token_id: int | None = 163839,
        bos_token_id: int | None = 163584,
        eos_token_id: int | list[int] | None = 163586,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        model_max_length: int = 1048576,
        # MLA
        q_lora_rank: int | None = None,
        kv_lora_rank: int | None = 512,
        qk_nope_head_dim: int | None = 128,
        qk_rope_head_dim: int | None = 64,
        v_head_dim: int | None = 128,
        mla_use_nope: bool = True,
        # KDA
        linear_attn_config: dict[str, Any] | None = None,
        layer_types: list[str] | None = None,
        # MoE
        num_experts: int | None = 256,
        num_experts_per_token: int | None = 8,
        moe_intermediate_size: int | None = 1024,
        num_shared_experts: int = 1,
        first_k_dense_replace: int | None = None,
        moe_layer_freq: int | None = None,
        mlp_layer_types: list[str] | None = None,
        moe_renormalize: bool = True,
        routed_scaling_factor: float = 2.446,
        use_grouped_topk: bool = True,
        num_expert_group: int = 1,
        topk_group: int = 1,
        moe_router_activation_func: str = "sigmoid",
        router_weights_include_bias: bool = True,
        router_aux_loss_coef: float = 0.0,
        output_router_logits: bool = False,
        num_nextn_predict_layers: int = 0,
        # ours
        kda_backend: str = "auto",
        kda_gate_granularity: str = "channel",
        decode_kernels: str = "auto",
        **kwargs: Any,
    ) -> None:
        given = dict(
            num_experts=num_experts, num_experts_per_token=num_experts_per_token,
            num_shared_experts=num_shared_experts, num_expert_group=num_expert_group,
            moe_renormalize=moe_renormalize, model_max_length=model_max_length,
        )
        defaults = dict(num_experts=256, num_experts_per_token=8, num_shared_experts=1, num_expert_group=1,
                        moe_renormalize=True, model_max_length=1048576)
        for alias, name in _ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if given[name] != defaults[name] and given[name] != value:
                    raise ValueError(f"{alias}={value!r} (native spelling) disagrees with {name}={given[name]!r}")
                given[name] = value
        num_experts, num_experts_per_token = given["num_experts"], given["num_experts_per_token"]
        num_shared_experts, num_expert_group = given["num_shared_experts"], given["num_expert_group"]
        moe_renormalize, model_max_length = given["moe_renormalize"], given["model_max_length"]
        for key in _NATIVE_DERIVED_KEYS:
            kwargs.pop(key, None)
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r}: Kimi Linear uses no positional encoding (NoPE)")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // max(num_attention_heads, 1)
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.model_max_length = model_max_length
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.mla_use_nope = mla_use_nope
        self.num_experts = num_experts
        self.num_experts_per_token = num_experts_per_token
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.moe_renormalize = moe_renormalize
        self.routed_scaling_factor = routed_scaling_factor
        self.use_grouped_topk = use_grouped_topk
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
        self.moe_router_activation_func = moe_router_activation_func
        self.router_weights_include_bias = router_weights_include_bias
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.kda_backend = kda_backend
        self.kda_gate_granularity = kda_gate_granularity
        self.decode_kernels = decode_kernels

        self.linear_attn_config = _resolve_linear_attn_config(
            num_hidden_layers, linear_attn_config, layer_types, kwargs
        )
        self.layer_types = _layer_types_from(self.linear_attn_config, num_hidden_layers)
        self.first_k_dense_replace, self.moe_layer_freq = _moe_schedule(
            num_hidden_layers, num_experts, first_k_dense_replace, moe_layer_freq, mlp_layer_types
        )
        self.mlp_layer_types = [
            SPARSE if self.is_moe_layer(i) else DENSE for i in range(num_hidden_layers)
        ]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_kimi()

    # ------------------------------------------------------------------ layer schedule
    @property
    def kda_layers(self) -> list[int]:
        """0-based indices of the KDA (linear attention) layers."""
        return [i for i, t in enumerate(self.layer_types) if t == KDA]

    @property
    def mla_layers(self) -> list[int]:
        """0-based indices of the MLA (full attention) layers."""
        return [i for i, t in enumerate(self.layer_types) if t == MLA]

    def is_kda_layer(self, layer_idx: int) -> bool:
        """True if the 0-based ``layer_idx`` is a KDA layer (the released lists are 1-based)."""
        return self.layer_types[layer_idx] == KDA

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True if the 0-based ``layer_idx`` uses the routed MoE rather than the dense MLP."""
        return (
            self.num_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def kda_conv_size(self) -> int:
        return int(self.linear_attn_config["short_conv_kernel_size"])

    @property
    def mla_latent_dim(self) -> int:
        """Values cached per token and MLA layer: ``kv_lora_rank + qk_rope_head_dim`` (576 for the release)."""
        return int(self.kv_lora_rank) + int(self.qk_rope_head_dim)

    # ------------------------------------------------------------------ validation
    def validate_kimi(self) -> None:
        """Raise one ``ValueError`` naming the first inconsistent field."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            _positive(name, getattr(self, name))
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not a known activation")
        if self.kda_backend not in KDA_BACKENDS:
            raise ValueError(f"kda_backend={self.kda_backend!r} must be one of {KDA_BACKENDS}")
        if self.decode_kernels not in DECODE_KERNELS:
            raise ValueError(f"decode_kernels={self.decode_kernels!r} must be one of {DECODE_KERNELS}")
        if self.kda_gate_granularity not in KDA_GATE_GRANULARITIES:
            raise ValueError(
                f"kda_gate_granularity={self.kda_gate_granularity!r} must be one of {KDA_GATE_GRANULARITIES}"
            )
        if self.mla_layers:
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                _positive(name, getattr(self, name))
            if self.q_lora_rank is not None:
                _positive("q_lora_rank", self.q_lora_rank)
            if not self.mla_use_nope:
                raise ValueError("mla_use_nope=False: MLA with rotary embeddings is not part of Kimi Linear")
        if self.kda_layers:
            for key in ("head_dim", "num_heads", "short_conv_kernel_size"):
                _positive(f"linear_attn_config.{key}", self.linear_attn_config.get(key))
        if any(self.mlp_layer_types[i] == DENSE for i in range(self.num_hidden_layers)):
            _positive("intermediate_size", self.intermediate_size)
        if self.num_experts is not None:
            _positive("num_experts", self.num_experts)
            _positive("num_experts_per_token", self.num_experts_per_token)
            _positive("moe_intermediate_size", self.moe_intermediate_size)
            if self.num_shared_experts < 0:
                raise ValueError(f"num_shared_experts={self.num_shared_experts} must be >= 0")
            if self.num_experts_per_token > self.num_experts:
                raise ValueError(
                    f"num_experts_per_token={self.num_experts_per_token} exceeds num_experts={self.num_experts}"
                )
            _positive("num_expert_group", self.num_expert_group)
            if self.num_experts % self.num_expert_group:
                raise ValueError(
                    f"num_expert_group={self.num_expert_group} does not divide num_experts={self.num_experts}"
                )
            if not 1 <= self.topk_group <= self.num_expert_group:
                raise ValueError(f"topk_group={self.topk_group} must be in [1, num_expert_group={self.num_expert_group}]")
            reachable = self.topk_group * (self.num_experts // self.num_expert_group)
            if self.num_experts_per_token > reachable:
                raise ValueError(
                    f"num_experts_per_token={self.num_experts_per_token} exceeds the {reachable} experts in the "
                    f"topk_group={self.topk_group} selected groups"
                )
            if self.moe_router_activation_func not in ROUTER_ACTIVATIONS:
                raise ValueError(
                    f"moe_router_activation_func={self.moe_router_activation_func!r} must be one of "
                    f"{ROUTER_ACTIVATIONS}"
                )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Released layout: ``linear_attn_config`` with 1-based lists, no ``layer_types``/``mlp_layer_types``;
        ``kda_gate_granularity`` only when it is not the default ``"channel"`` (so default configs stay
        byte-identical to what other implementations read)."""
        out = super().to_dict()
        for key in ("layer_types", "mlp_layer_types", "rope_parameters"):
            out.pop(key, None)
        if out.get("kda_gate_granularity") == KDA_GATE_GRANULARITIES[0]:
            del out["kda_gate_granularity"]
        if out.get("decode_kernels") == DECODE_KERNELS[0]:
            del out["decode_kernels"]
        out["linear_attn_config"] = copy.deepcopy(self.linear_attn_config)
        return out


# ---------------------------------------------------------------------- helpers
def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def _resolve_linear_attn_config(
    num_layers: int,
    linear_attn_config: dict[str, Any] | None,
    layer_types: list[str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Build the released-style ``linear_attn_config`` from either layout, validating the layer lists."""
    native = {
        "head_dim": kwargs.pop("linear_head_dim", None),
        "num_heads": kwargs.pop("linear_num_heads", None),
        "short_conv_kernel_size": kwargs.pop("linear_conv_kernel_dim", None),
    }
    cfg = dict(linear_attn_config or {})
    for key, value in native.items():
        if value is not None:
            cfg.setdefault(key, value)
    cfg.setdefault("head_dim", 128)
    cfg.setdefault("num_heads", 32)
    cfg.setdefault("short_conv_kernel_size", 4)

    if linear_attn_config is not None and (
        "kda_layers" in linear_attn_config or "full_attn_layers" in linear_attn_config
    ):
        kda = linear_attn_config.get("kda_layers")
        full = linear_attn_config.get("full_attn_layers")
        if kda is None or full is None:
            missing = "kda_layers" if kda is None else "full_attn_layers"
            raise ValueError(f"linear_attn_config.{missing} is missing (both lists are required together)")
        kda, full = _check_layer_list("kda_layers", kda, num_layers), _check_layer_list("full_attn_layers", full, num_layers)
        both = sorted(set(kda) & set(full))
        if both:
            raise ValueError(f"linear_attn_config: layers {both} are in both kda_layers and full_attn_layers")
        missing = sorted(set(range(1, num_layers + 1)) - set(kda) - set(full))
        if missing:
            raise ValueError(
                f"linear_attn_config: layers {missing} (1-based) are in neither kda_layers nor full_attn_layers"
            )
        if layer_types is not None and _layer_types_from({"kda_layers": kda}, num_layers) != list(layer_types):
            raise ValueError("layer_types disagrees with linear_attn_config.kda_layers / full_attn_layers")
    else:
        if layer_types is None:
            # default: 3 KDA : 1 MLA, the last layer MLA like the release
            layer_types = [MLA if (i % 4 == 3 or i == num_layers - 1) else KDA for i in range(num_layers)]
        layer_types = list(layer_types)
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers={num_layers}")
        bad = sorted({t for t in layer_types if t not in (KDA, MLA)})
        if bad:
            raise ValueError(f"layer_types: unknown entries {bad}; use {KDA!r} (KDA) or {MLA!r} (MLA)")
        kda = [i + 1 for i, t in enumerate(layer_types) if t == KDA]
        full = [i + 1 for i, t in enumerate(layer_types) if t == MLA]
    cfg["kda_layers"] = kda
    cfg["full_attn_layers"] = full
    return cfg


def _check_layer_list(name: str, layers: Any, num_layers: int) -> list[int]:
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise ValueError(f"linear_attn_config.{name} must be a list of 1-based layer numbers, got {layers!r}")
    out_of_range = [x for x in layers if not 1 <= x <= num_layers]
    if out_of_range:
        raise ValueError(
            f"linear_attn_config.{name}: layers {out_of_range} are outside 1..num_hidden_layers={num_layers} "
            "(the lists are 1-based)"
        )
    dupes = sorted({x for x in layers if list(layers).count(x) > 1})
    if dupes:
        raise ValueError(f"linear_attn_config.{name}: layers {dupes} are listed twice")
    return sorted(layers)


def _layer_types_from(linear_attn_config: dict[str, Any], num_layers: int) -> list[str]:
    kda = set(linear_attn_config["kda_layers"])
    return [KDA if i + 1 in kda else MLA for i in range(num_layers)]


def _moe_schedule(
    num_layers: int,
    num_experts: int | None,
    first_k_dense_replace: int,
    moe_layer_freq: int,
    mlp_layer_types: list[str] | None,
) -> tuple[int, int]:
    """Return ``(first_k_dense_replace, moe_layer_freq)``, derived from ``mlp_layer_types`` when given (explicit
    values that describe another schedule are an error)."""
    if mlp_layer_types is None:
        first = 1 if first_k_dense_replace is None else first_k_dense_replace
        freq = 1 if moe_layer_freq is None else moe_layer_freq
        if not isinstance(first, int) or first < 0:
            raise ValueError(f"first_k_dense_replace={first!r} must be an integer >= 0")
        if not isinstance(freq, int) or freq < 1:
            raise ValueError(f"moe_layer_freq={freq!r} must be an integer >= 1")
        return first, freq
    types = list(mlp_layer_types)
    if len(types) != num_layers:
        raise ValueError(f"mlp_layer_types has {len(types)} entries but num_hidden_layers={num_layers}")
    bad = sorted({t for t in types if t not in (DENSE, SPARSE)})
    if bad:
        raise ValueError(f"mlp_layer_types: unknown entries {bad}; use 'dense' or 'sparse'")
    if SPARSE in types and num_experts is None:
        raise ValueError("mlp_layer_types has 'sparse' layers but num_experts is None")
    sparse = [i for i, t in enumerate(types) if t == SPARSE]

    def schedule(first: int, freq: int) -> list[int]:
        return [i for i in range(num_layers) if i >= first and i % freq == 0]

    if first_k_dense_replace is not None or moe_layer_freq is not None:
        first = 1 if first_k_dense_replace is None else first_k_dense_replace
        freq = 1 if moe_layer_freq is None else moe_layer_freq
        if schedule(first, freq) != sparse:
            raise ValueError(
                f"mlp_layer_types {types} disagrees with first_k_dense_replace={first_k_dense_replace} / "
                f"moe_layer_freq={moe_layer_freq}"
            )
    if not sparse:
        return num_layers, 1
    for freq in range(1, num_layers + 1):
        if schedule(sparse[0], freq) == sparse:
            return sparse[0], freq
    raise ValueError(
        f"mlp_layer_types {types} cannot be written as first_k_dense_replace / moe_layer_freq "
        "(layer i is MoE iff i >= first_k_dense_replace and i % moe_layer_freq == 0)"
    )


__all__ = ["KimiLinearConfig"]

KimiLinearConfig.register_for_auto_class()
