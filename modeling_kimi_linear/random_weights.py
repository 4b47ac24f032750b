"""A model with random weights made where it will run: built on the ``meta`` device (no memory), allocated on the
target device(s) and initialised there by the model's own ``_init_weights``.

For layouts too big to hold twice or to stage on the CPU - the 48B-A3B layout is 98 GB in bf16 - this is the way to
get a full-size model for measuring decode, fine-tuning or loading paths without a checkpoint on disk. Used by
``bench/gpu_long_context.py``, ``examples/finetune.py --init-on-device`` and ``examples/multi_gpu/device_map_check.py``.
"""

from __future__ import annotations

from typing import Union

import torch

from .configuration_kimi_linear import KimiLinearConfig
from .modeling_kimi_linear import KimiLinearForCausalLM
from .presets import load_preset

Device = Union[str, int, torch.device]


def build_random_model(config: KimiLinearConfig | str, device: Device | None = None,
                       dtype: torch.dtype = torch.bfloat16,
                       device_map: dict[str, Device] | None = None) -> KimiLinearForCausalLM:
    """``KimiLinearForCausalLM(config)`` (a config or a preset name) with random weights in ``dtype`` (``A_log`` and
    ``dt_bias`` stay float32), in eval mode.

    Exactly one of ``device`` (everything there) and ``device_map`` (module name -> device, the form of
    ``model.hf_device_map``; ``""`` is the whole model, an integer a GPU index) says where the weights live. Each
    parameter is allocated there and filled by ``_init_weights`` module by module (the routed experts are fused 3-D
    tensors: no Python loop over experts). Every parameter is set to NaN first, so one that ``_init_weights`` does
    not write is caught: ``RuntimeError`` naming it. Seed with ``torch.manual_seed`` first for a repeatable draw
    (on a GPU the values depend on the device model as well).
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
    for name in sorted(placement, key=len):  # the whole model first, then the modules named inside it
        target = placement[name]
        model.get_submodule(name).to_empty(device=f"cuda:{target}" if isinstance(target, int) else target)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"device_map places no device for {len(left)} tensors, such as {left[:3]}")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # sentinel: whatever _init_weights does not write stays NaN
            p._is_hf_initialized = False  # a flag set on meta would make transformers' init functions skip it
        model.apply(model._init_weights)
        missed = [name for name, p in model.named_parameters() if p.isnan().any()]
    if missed:
        raise RuntimeError(f"_init_weights left {len(missed)} parameters uninitialised: {missed[:5]}")
    return model.eval()
