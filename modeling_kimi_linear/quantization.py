"""Quantized weights through transformers' own quantization configs: what is quantized, what is not, and why.

``KimiLinearForCausalLM.from_pretrained(path, quantization_config=...)`` passes the config through
:func:`prepare_quantization_config` first, which changes two defaults and nothing the caller set:

* **the routed experts are quantized too.** They are two fused 3-D parameters per layer (``experts.gate_up_proj
  [E, 2I, D]``, ``experts.down_proj [E, D, I]``: 94% of the 48B-A3B's weights), which transformers' torchao
  integration quantizes only when a torchao ``FqnToConfig`` names them. A plain ``TorchAoConfig(cfg)`` with an
  int8 or float8 weight-only ``cfg`` (:data:`EXPERT_CAPABLE`; torchao's int4 / intx tensors take 2-D weights only,
  so with those the experts stay in the load dtype, with a warning) becomes
  ``TorchAoConfig(FqnToConfig({"_default": cfg, EXPERTS_PATTERN: cfg}))``: every ``nn.Linear`` as before, plus the
  expert tensors, quantized one by one while the checkpoint streams in (peak memory stays about the quantized
  size). torchao stores them as ``int8 [E, 2I, D]`` + one fp32 scale (and an int8 zero point) per output row of
  each expert; :mod:`quantized_experts` runs them. A caller's own ``FqnToConfig`` is left as it is.
* **weights the math reads directly, or through an exponential, stay in high precision** (the load dtype), as
  ``modules_to_not_convert`` / ``llm_int8_skip_modules`` when the caller gave none (:data:`HIGH_PRECISION_MODULES`):
  ``kv_b_proj`` (MLA's absorbed decode folds it into the query and the output as a plain tensor), KDA's
  ``f_a_proj`` / ``f_b_proj`` (the per-channel decay, exponentiated and accumulated over the whole sequence) and
  ``b_proj`` (beta, the delta rule's step size), the router (``block_sparse_moe.gate``) and ``lm_head``. Together
  they are 0.9% of the 48B-A3B's weights (0.13% without ``lm_head``). The router, ``A_log`` / ``dt_bias``, the
  norms, the short-convolution weights and the embedding are no ``nn.Linear`` and no quantizer touches them.
  Passing ``modules_to_not_convert=[]`` quantizes every ``nn.Linear``: ``kv_b_proj`` then is dequantized on each
  decode step (:meth:`mla_layer.KimiMLAAttention.absorbed_weights`).

``BitsAndBytesConfig`` gets the same high-precision default; bitsandbytes replaces ``nn.Linear`` modules only, so
under it the routed experts stay in the load dtype (the 48B-A3B does not fit one 80 GB GPU that way).

:func:`quantize_in_place` applies the same choices to a module already in memory (torchao configs), for models
built with random weights on the device (:func:`random_weights.build_random_model` ``quantization=``).
:func:`tensor_bytes` counts what a (possibly quantized) tensor really stores; :func:`int8_weight_only_bytes`
predicts a model's weight bytes under int8 weight-only quantization from its shapes alone (meta device works).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

EXPERTS_PATTERN = r"re:.*\.experts\.(gate_up_proj|down_proj)"  # torchao FqnToConfig key for the fused experts
# torchao configs whose tensors take the 3-D experts and that quantized_experts runs (checked on a CPU: int8 in
# tests/test_quantization.py, float8 in bench/gpu_quant.py's smoke run); int4 / intx take 2-D weights only
EXPERT_CAPABLE = ("Int8WeightOnlyConfig", "Float8WeightOnlyConfig")
HIGH_PRECISION_MODULES = [
    r".*\.kv_b_proj",
    r".*\.f_a_proj",
    r".*\.f_b_proj",
    r".*\.b_proj",
    r".*\.block_sparse_moe\.gate",
    "lm_head",
]


def row_scaled(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(qdata, scale, zero point or None)`` of a quantized weight with one scale per output row - ``W = (q - zero)
    * scale``, ``qdata [..., N, K]``, ``scale [..., N, 1]``, the zero point shaped like the scale: torchao's int8
    and float8 weight-only tensors, 2-D or the experts' 3-D - else None."""
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    zero = getattr(weight, "zero_point", None)
    if not (isinstance(qdata, torch.Tensor) and isinstance(scale, torch.Tensor)) or qdata.dim() not in (2, 3):
        return None
    if tuple(scale.shape) != (*qdata.shape[:-1], 1) or not scale.is_floating_point():
        return None
    if zero is not None and (not isinstance(zero, torch.Tensor) or zero.shape != scale.shape):
        return None
    return qdata, scale, zero


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """:func:`row_scaled` for weight-only int8 tensors (torchao's ``Int8WeightOnlyConfig``), else None. Tensors that
    also quantize the activations (``act_quant_kwargs``) are not weight-only and give None: this package's Triton
    kernels read int8 weights directly (:mod:`multi_linear_triton`, :mod:`moe_decode_triton`) and compute the
    weight-only product."""
    layout = row_scaled(weight)
    if layout is None or layout[0].dtype != torch.int8 or getattr(weight, "act_quant_kwargs", None) is not None:
        return None
    return layout


def is_plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is an ordinary tensor or parameter (not a quantized tensor subclass). The stand-ins that
    tracing puts in place of ordinary tensors count as ordinary: ``torch.export`` of the compiled CPU decode step
    sees a ``FakeTensor`` for each plain weight (a quantized weight stays its own subclass there), and taking it for
    a quantized one sent the traced experts down the dequantizing path."""
    kind = type(tensor)
    return kind in (torch.Tensor, nn.Parameter) or kind in _tracing_types()


@functools.cache
def _tracing_types() -> tuple[type, ...]:
    """torch's fake and functional tensor classes (what tracing substitutes for ordinary tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return (FakeTensor, FunctionalTensor)


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight as an ordinary tensor of ``dtype`` (its own ``dequantize()``); plain tensors are cast."""
    if is_plain(weight):
        return weight.to(dtype)
    dequant = getattr(weight, "dequantize", None)
    if dequant is None:
        raise TypeError(f"cannot dequantize a {type(weight).__name__}: it has no dequantize() method")
    return dequant().to(dtype)


@contextlib.contextmanager
def default_key_accepted() -> Iterator[None]:
    """Silence torchao's deprecation warning for an ``FqnToConfig`` with a ``"_default"`` entry: that key is how
    transformers' torchao integration (5.24 / 5.25) applies one config to every ``nn.Linear`` beside named
    parameters, and torchao warns again each time such a config is rebuilt from a saved ``config.json``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Config Deprecation: _default")
        yield


def prepare_quantization_config(quantization_config: Any) -> Any:
    """A copy of a ``TorchAoConfig`` / ``BitsAndBytesConfig`` with this model's defaults filled in (see the
    module docstring); any other value (``None``, a dict, other methods) is returned unchanged."""
    kind = type(quantization_config).__name__
    if kind == "TorchAoConfig":
        try:  # (in a try: transformers' remote-code check then does not require torchao of every checkpoint)
            from torchao.quantization import FqnToConfig
        except ImportError as exc:
            raise ImportError("TorchAoConfig needs torchao: pip install torchao") from exc

        config = copy.copy(quantization_config)
        kind = type(config.quant_type).__name__
        if not isinstance(config.quant_type, FqnToConfig) and kind not in EXPERT_CAPABLE:
            warnings.warn(f"{kind}: the routed experts stay in the load dtype (torchao quantizes only 2-D weights "
                          f"with it; {', '.join(EXPERT_CAPABLE)} cover the experts too)", UserWarning, stacklevel=3)
        elif not isinstance(config.quant_type, FqnToConfig):
            with default_key_accepted():
                config.quant_type = FqnToConfig({"_default": config.quant_type, EXPERTS_PATTERN: config.quant_type})
        if config.modules_to_not_convert is None:
            config.modules_to_not_convert = list(HIGH_PRECISION_MODULES)
        return config
    if kind == "BitsAndBytesConfig":
        config = copy.copy(quantization_config)
        if config.llm_int8_skip_modules is None:
            config.llm_int8_skip_modules = list(HIGH_PRECISION_MODULES)
        return config
    return quantization_config


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores: for a tensor subclass (torchao's quantized tensors) the sum over its inner tensors
    (data, scales, zero points), which ``numel() * element_size()`` of the wrapper does not see."""
    if is_plain(tensor) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.nelement() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)


def kept_high_precision(name: str, skip: list[str] | None = None) -> bool:
    """Whether parameter or module ``name`` matches ``skip`` (default :data:`HIGH_PRECISION_MODULES`), with
    transformers' own module-boundary matching of ``modules_to_not_convert`` patterns."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(name, HIGH_PRECISION_MODULES if skip is None else skip)


def int8_weight_only_bytes(model: nn.Module, skip: list[str] | None = None) -> int:
    """Predicted weight bytes of ``model`` under :func:`prepare_quantization_config` ``(TorchAoConfig(
    Int8WeightOnlyConfig()))``, from shapes and dtypes only (a model on the meta device works).

    A quantized ``[.., rows, cols]`` weight takes ``rows * cols`` bytes of int8 plus 5 bytes a row (fp32 scale,
    int8 zero point: torchao's ``Int8Tensor``, per-row granularity); quantized are the weights of ``nn.Linear``
    modules not matched by ``skip`` (default :data:`HIGH_PRECISION_MODULES`) and the routed experts' 3-D tensors.
    Everything else keeps its dtype. Buffers are not counted."""
    skip = HIGH_PRECISION_MODULES if skip is None else skip
    experts = re.compile(EXPERTS_PATTERN[3:])
    total = 0
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            linear_weight = isinstance(module, nn.Linear) and param_name == "weight"
            quantized = (linear_weight or experts.fullmatch(full) is not None) and not kept_high_precision(full, skip)
            if quantized:
                rows = param.numel() // param.shape[-1]
                total += param.numel() + 5 * rows
            else:
                total += param.numel() * param.element_size()
    return total


def quantize_in_place(module: nn.Module, quant_type: Any, prefix: str = "") -> None:
    """Quantize ``module``'s weights in place with the torchao config ``quant_type`` (``Int8WeightOnlyConfig()``,
    say, or a ``TorchAoConfig`` whose ``quant_type``, ``modules_to_not_convert`` and
    ``include_input_output_embeddings`` are taken), as ``from_pretrained`` would on loading with
    :func:`prepare_quantization_config`: every ``nn.Linear`` but :data:`HIGH_PRECISION_MODULES` (or the config's
    own list; names matched with ``prefix`` in front), the routed experts when the config takes 3-D weights
    (:data:`EXPERT_CAPABLE`), and the embedding and ``lm_head`` only with ``include_input_output_embeddings``."""
    try:  # (in a try: transformers' remote-code check then does not require torchao of every checkpoint)
        from torchao.quantization import FqnToConfig, quantize_
    except ImportError as exc:
        raise ImportError("quantizing with a torchao config needs torchao: pip install torchao") from exc

    skip = getattr(quant_type, "modules_to_not_convert", None)
    embeddings = bool(getattr(quant_type, "include_input_output_embeddings", False))
    quant_type = getattr(quant_type, "quant_type", quant_type)
    by_name = getattr(quant_type, "fqn_to_config", None)
    if by_name is not None:  # what prepare_quantization_config builds: one config for the linears and the experts
        if set(by_name) - {"_default", EXPERTS_PATTERN} or "_default" not in by_name:
            raise ValueError("quantize_in_place takes one torchao config (or an FqnToConfig of only '_default' and "
                             f"the experts' pattern), got an FqnToConfig of {sorted(by_name)}")
        quant_type = by_name["_default"]
    experts_too = type(quant_type).__name__ in EXPERT_CAPABLE
    for name, child in list(module.named_modules()):
        full = ".".join(part for part in (prefix, name) if part)
        if full == "lm_head" and not embeddings:
            continue  # the output embedding: quantized only with include_input_output_embeddings, as on loading
        if isinstance(child, nn.Linear) and not kept_high_precision(f"{full}.weight", skip):
            quantize_(child, quant_type)
        elif isinstance(child, nn.Embedding) and embeddings:
            quantize_(child, quant_type, filter_fn=lambda m, _fqn: isinstance(m, nn.Embedding))
        elif experts_too and hasattr(child, "gate_up_proj") and hasattr(child, "down_proj") \
                and isinstance(child.gate_up_proj, nn.Parameter) and child.gate_up_proj.dim() == 3:
            for param in ("gate_up_proj", "down_proj"):
                quantize_(child, FqnToConfig({param: quant_type}), filter_fn=None)


def graph_capture_blocker(model: nn.Module) -> str | None:
    """Why a CUDA graph cannot capture ``model``'s decode step, or ``None``. bitsandbytes' 8-bit layers
    (``Linear8bitLt``, LLM.int8()) failed capture on an H100 (``cudaErrorStreamCaptureInvalidated``,
    ``bench/gpu_quant.py``, 2026-12-08): their product is not capturable as transformers runs it, so decoding stays
    op by op for such a model. Its 4-bit layers captured and replayed correctly in the same run."""
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            return f"{name} is a bitsandbytes 8-bit layer, whose LLM.int8() product CUDA graphs cannot capture"
    return None
