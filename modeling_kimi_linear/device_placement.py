"""Whether a model's weights sit on one device: the condition for a static decode step (CUDA graph, compiled CPU step).

A model loaded with ``device_map`` over several GPUs (``from_pretrained(..., device_map="auto")``) runs each layer
on its own device, with accelerate's hooks moving the hidden states between them; a model offloaded to the CPU or
disk keeps weights on the ``meta`` device and loads them at each forward. A CUDA graph is captured on one device
and replays the tensor addresses it saw, and the compiled CPU step reads every weight as an input: neither is shown
to be right for such a model, so decoding stays op by op there, with one warning per model.

The full look (``hf_device_map`` and the device of every parameter and buffer) is taken once and kept on the model,
keyed on what dispatching or moving a model changes: the ``hf_device_map`` object and the devices of the input
embedding and the output head. Each decode step then costs a few attribute reads.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

_ANSWER = "_one_device_answer"  # model.__dict__ entry: (key, devices or None)
_WARNED = "_one_device_warned"


def named_devices(hf_device_map: dict | None) -> set[str]:
    """The distinct devices a ``hf_device_map`` names (a GPU index ``i`` as ``cuda:i``; ``"cpu"``, ``"disk"``)."""
    names = set()
    for device in (hf_device_map or {}).values():
        if isinstance(device, int):
            names.add(f"cuda:{device}")
        elif device == "disk":
            names.add("disk")
        else:
            names.add(str(torch.device(device)))
    return names


def weight_devices(tensors: Iterable[torch.Tensor]) -> set[str]:
    """The distinct devices of ``tensors`` (``cuda`` without an index counts as the current GPU's)."""
    out = set()
    for t in tensors:
        device = t.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        out.add(str(device))
    return out


def spread_devices(model: nn.Module) -> list[str] | None:
    """The devices a model is spread over, sorted, when that is more than one (by its ``hf_device_map`` or by
    where its parameters and buffers are); ``None`` when everything is on one device."""
    devices = named_devices(getattr(model, "hf_device_map", None))
    devices |= weight_devices(list(model.parameters()) + list(model.buffers()))
    return sorted(devices) if len(devices) > 1 else None


def _placement_key(model: nn.Module) -> tuple:
    """What dispatching or moving ``model`` changes, cheap to read at every step."""
    embed = model.get_input_embeddings()
    head = getattr(model, "lm_head", None)
    return (id(getattr(model, "hf_device_map", None)), embed.weight.device,
            head.weight.device if head is not None else None)


def weights_on_one_device(model: nn.Module, what: str = "static decode steps") -> bool:
    """``True`` when every weight of ``model`` sits on one device (see the module docstring). The first ``False``
    for a model warns once, naming the devices and that ``what`` falls back to op-by-op decoding."""
    key = _placement_key(model)
    cached = model.__dict__.get(_ANSWER)
    if cached is None or cached[0] != key:
        cached = model.__dict__[_ANSWER] = (key, spread_devices(model))
    devices = cached[1]
    if devices is None:
        return True
    if not model.__dict__.get(_WARNED):
        model.__dict__[_WARNED] = True
        warnings.warn(
            f"the model's weights are spread over {', '.join(devices)} (device_map or offloading): {what} need "
            "every weight on one device, so decoding runs op by op for this model",
            stacklevel=3,
        )
    return False
