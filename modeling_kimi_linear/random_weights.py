"""A model with random weights made where it will run: built on the ``meta`` device (no memory), allocated on the
target device(s) and initialised there by the model's own ``_init_weights``.

For layouts too big to hold twice or to stage on the CPU - the 48B-A3B layout is 98 GB in bf16 - this is the way to
get a full-size model for measuring decode, fine-tuning or loading paths without a checkpoint on disk. Used by
``bench/gpu_long_context.py``, ``examples/finetune.py --init-on-device`` and ``examples/multi_gpu/device_map_check.py``.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from .configuration_kimi_linear import KimiLinearConfig
from .modeling_kimi_linear import KimiLinearForCausalLM
from .presets import load_preset

Device = Union[str, int, torch.device]


def build_random_model(config: KimiLinearConfig | str, device: Device | None = None,
                       dtype: torch.dtype = torch.bfloat16,
                       device_map: dict[str, Device] | None = None,
                       quantization: Any = None) -> KimiLinearForCausalLM:
    """``KimiLinearForCausalLM(config)`` (a config or a preset name) with random weights in ``dtype`` (``A_log`` and
    ``dt_bias`` stay float32), in eval mode.

    Exactly one of ``device`` (everything there) and ``device_map`` (module name -> device, the form of
    ``model.hf_device_map``; ``""`` is the whole model, an integer a GPU index) says where the weights live. The
    model is made piece by piece (embedding, each decoder layer, final norm, head): each piece's parameters are
    allocated where they go and filled by ``_init_weights`` (the routed experts are fused 3-D tensors: no Python
    loop over experts) before the next piece is allocated. Every parameter is set to NaN first, so one that
    ``_init_weights`` does not write is caught: ``RuntimeError`` naming it. Seed with ``torch.manual_seed`` first
    for a repeatable draw (on a GPU the values depend on the device model as well).

    ``quantization`` (a torchao config such as ``Int8WeightOnlyConfig()``, or a ``TorchAoConfig``) quantizes each
    piece before the next is allocated (:func:`quantization.quantize_in_place`: the choices ``from_pretrained``
    makes with that config), so the peak is about the quantized size plus one layer in ``dtype``: the 48B-A3B in
    int8 (50 GB) on one 80 GB GPU, which its 98 GB in bf16 could never pass through.
    """
    if (device is None) == (device_map is None):
        raise ValueError("pass exactly one of device and device_map")
    if isinstance(config, str):
        config = load_preset(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained does: A_log / dt_bias are made float32 explicitly
    try:
        with torch.device("meta"):
            model = KimiLinearForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    placement = {"": device} if device_map is None else dict(device_map)
    pieces = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(len(model.model.layers))), "model.norm",
              "lm_head"]
    named = [n for n, _ in list(model.named_parameters()) + list(model.named_buffers())]
    outside = [n for n in named if not any(n.startswith(p + ".") for p in pieces)]
    if outside:  # a structure this function does not know
        raise RuntimeError(f"tensors outside the pieces built one by one: {outside[:3]}")
    with torch.no_grad():
        for piece in pieces:
            _allocate(model, piece, placement)
            module = model.get_submodule(piece)
            left = [f"{piece}.{n}" for n, t in list(module.named_parameters()) + list(module.named_buffers())
                    if t.is_meta]
            if left:
                raise ValueError(f"device_map places no device for {len(left)} tensors, such as {left[:3]}")
            for p in module.parameters():
                p.fill_(float("nan"))  # sentinel: whatever _init_weights does not write stays NaN
                p._is_hf_initialized = False  # a flag set on meta would make transformers' init functions skip it
            module.apply(model._init_weights)
            missed = [f"{piece}.{name}" for name, p in module.named_parameters() if p.isnan().any()]
            if missed:
                raise RuntimeError(f"_init_weights left {len(missed)} parameters uninitialised: {missed[:5]}")
            if quantization is not None:
                from .quantization import quantize_in_place

                quantize_in_place(module, quantization, prefix=piece)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the piece's high-precision weights, for the next piece to reuse
    return model.eval()


def _allocate(model: KimiLinearForCausalLM, piece: str, placement: dict[str, Device]) -> None:
    """Allocate module ``piece`` (uninitialised) where ``placement`` puts it: the entry naming the piece or the
    nearest module around it, then entries naming modules inside it. Tensors placed nowhere stay on ``meta``."""
    around = [n for n in placement if n == "" or piece == n or piece.startswith(n + ".")]
    inside = [n for n in placement if n.startswith(piece + ".")]
    for name in ([max(around, key=len)] if around else []) + sorted(inside, key=len):
        target = placement[name]
        module = model.get_submodule(piece if name in around else name)
        module.to_empty(device=f"cuda:{target}" if isinstance(target, int) else target)
