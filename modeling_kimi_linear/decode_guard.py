"""What a static decode step bakes in from the model, and the check that it still holds.

A captured CUDA graph (:mod:`cuda_graph_decode`) replays fixed kernels on fixed memory addresses, and a compiled
CPU program (:mod:`compiled_decode`) replays the Python-level decisions made while it was traced. Both give wrong
tokens, with no error, if the model changed after they were built in a way that eager decoding would see:

* a parameter or buffer replaced (``load_state_dict(..., assign=True)``, a new ``nn.Parameter``), moved or cast
  (``model.to(dtype)``, ``param.data = ...``): the step would read the old memory;
* modules added, removed or swapped (PEFT wrapping a projection with a LoRA layer, ``merge_and_unload()``): the
  step would run the old structure;
* a module's plain attributes changed (PEFT's ``disable_adapter()``, ``set_adapter()``, ``merge()``, a layer's
  ``backend`` switched by hand): the step would take the old branch;
* hooks added or removed (eager decoding would call them, a replayed step does not).

:class:`ModelGuard` records all of this and answers two questions: :meth:`ModelGuard.changed` (cheap, before every
step: a global counter of module/parameter/buffer registrations on the model's modules, each parameter's
address, the state of the modules this package does not know, such as adapter layers, and the autocast
state) and :meth:`ModelGuard.signature_changed` (thorough, at every new cache, i.e. every ``generate()`` call: the
same plus every module's plain attributes and hooks). A static step is rebuilt whenever either says the model changed.

:meth:`ModelGuard.key` is what a compiled program's file name covers besides the code and configuration: module
types and attributes, parameter names, shapes and dtypes (not addresses), so two checkpoints of one shape share a
program (a program reads the weights as inputs and bakes none in), and an adapter switched off finds another one.

Not covered: a module keeping a plain (non-parameter, non-buffer) tensor attribute that its forward reads, and
global switches other than autocast (for instance TF32 matmul flags). Seen only at the next cache, not before the
next step: a parameter reinterpreted in place as another dtype of the same size (``p.data = p.data.view(
torch.float16)`` on bf16 weights: same memory, so the same address). Values written in place into the same
parameters (an optimizer step, ``load_state_dict`` without ``assign``) need no rebuild: every static step reads
the parameters' current memory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import weakref
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import PreTrainedModel

_registrations = 0  # bumped by torch's global registration hooks: a module/parameter/buffer set on a watched module
_watched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # the modules of every guarded model
_hooks_installed = False


def _count_registration(module: nn.Module, *_args: Any) -> None:
    global _registrations
    if module in _watched:  # modules outside every guarded model (a step's own wrapper, say) change no step
        _registrations += 1


def registrations() -> int:
    """How many module / parameter / buffer registrations on guarded models' modules were seen so far (a value that
    changes whenever a guarded model's structure or tensors may have)."""
    return _registrations


def _install_registration_hooks() -> None:
    """Count every module / parameter / buffer registration on a module of a guarded model (``setattr`` of a
    module or parameter, ``register_buffer``, ``load_state_dict(assign=True)``...). The hooks return None, so
    registrations are unchanged; their cost is one Python call and a set lookup each."""
    global _hooks_installed
    if not _hooks_installed:
        from torch.nn.modules import module as torch_module

        torch_module.register_module_parameter_registration_hook(_count_registration)
        torch_module.register_module_buffer_registration_hook(_count_registration)
        torch_module.register_module_module_registration_hook(_count_registration)
        _hooks_installed = True


_SCALARS = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _plain(value: Any, depth: int = 0) -> Any:
    """A hashable, comparable copy of ``value`` if it is plain data (scalars, and lists / tuples / sets / dicts
    of them, two levels deep), else a marker that the attribute exists but is not tracked."""
    if isinstance(value, _SCALARS):
        return value
    if depth < 2:
        if isinstance(value, (list, tuple)):
            return tuple(_plain(v, depth + 1) for v in value)
        if isinstance(value, (set, frozenset)):
            return tuple(sorted((_plain(v, depth + 1) for v in value), key=repr))
        if isinstance(value, dict):
            return tuple(sorted(((str(k), _plain(v, depth + 1)) for k, v in value.items()), key=repr))
    return "<untracked>"


# Module attributes that hold no decision of the forward (bookkeeping of torch and transformers).
_IGNORED_ATTRIBUTES = frozenset({"_is_hf_initialized", "_compiled_call_impl", "call_super_init", "dump_patches",
                                 "_graph_decoder", "_compiled_decoder", "_grown_mask", "name_or_path"})


def module_state(module: nn.Module) -> tuple:
    """The plain attributes of ``module`` (what a forward may branch on), in a comparable form. On a transformers
    ``PreTrainedModel`` the private ones are loading bookkeeping (``_weight_conversions``, ``_use_kernels``...),
    different for a model loaded from disk and one built in memory, and are left out."""
    private_too = not isinstance(module, PreTrainedModel)
    return tuple((key, _plain(value)) for key, value in sorted(vars(module).items())
                 if not key.startswith(_STRUCTURE_ATTRIBUTES) and key not in _IGNORED_ATTRIBUTES
                 and (private_too or not key.startswith("_")))


# torch's own bookkeeping (tensors, submodules, hooks: covered separately)
_STRUCTURE_ATTRIBUTES = ("_parameters", "_buffers", "_modules", "_non_persistent", "_state_dict", "_load_state_dict",
                         "_forward", "_backward", "_version")


def _untracked_inside(value: Any) -> bool:
    if isinstance(value, tuple):
        return any(_untracked_inside(v) for v in value)
    return value == "<untracked>"


class _AttributeWatch:
    """Before-every-step check of one module's plain attributes: the attributes holding plain data at
    :meth:`ModelGuard.refresh` are kept as copies and compared with ``!=`` (a few microseconds for an adapter
    layer's ~20 attributes; attributes added later are caught by the thorough check at the next cache)."""

    __slots__ = ("module", "values")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.values = {key: copy.deepcopy(value) for key, value in vars(module).items()
                       if key not in _IGNORED_ATTRIBUTES and not key.startswith(_STRUCTURE_ATTRIBUTES)
                       and not _untracked_inside(_plain(value))}

    def changed(self) -> bool:
        attributes = vars(self.module)
        return any(attributes.get(key, _MISSING) != value for key, value in self.values.items())


_MISSING = object()


def _hook_counts(module: nn.Module) -> tuple[int, ...]:
    return tuple(len(getattr(module, name, ())) for name in ("_forward_hooks", "_forward_pre_hooks",
                                                             "_backward_hooks", "_backward_pre_hooks"))


def _global_hook_counts() -> tuple[int, ...]:
    from torch.nn.modules import module as torch_module

    return tuple(len(getattr(torch_module, name, ())) for name in ("_global_forward_hooks",
                                                                   "_global_forward_pre_hooks",
                                                                   "_global_backward_hooks",
                                                                   "_global_backward_pre_hooks"))


def _known_types() -> tuple[type, ...]:
    """Module types whose forward depends only on their tensors and on attributes fixed at construction: their
    attributes are compared at every new cache, not before every step."""
    from transformers.activations import ACT2CLS

    from . import kda_layer, mla_layer, modeling_kimi_linear, moe, norms

    ours = [cls for mod in (kda_layer, mla_layer, modeling_kimi_linear, moe, norms) for cls in vars(mod).values()
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == mod.__name__]
    torch_types = [nn.Linear, nn.Embedding, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict,
                   nn.Sequential, nn.Identity, nn.Dropout, nn.SiLU, nn.GELU]
    activations = [cls[0] if isinstance(cls, tuple) else cls for cls in ACT2CLS.values()]
    return tuple(ours + torch_types + [cls for cls in activations if isinstance(cls, type)])


class ModelGuard:
    """The parts of ``model`` a static decode step depends on, and whether they changed since :meth:`refresh`."""

    def __init__(self, model: nn.Module) -> None:
        _install_registration_hooks()
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Record the model as it is now."""
        known = _known_types()
        self._registrations = _registrations
        self._autocast = _autocast_state()
        named = list(self.model.named_parameters(remove_duplicate=False))
        named += list(self.model.named_buffers(remove_duplicate=False))
        tensors = [t for _, t in named]
        self._plain = [t for t in tensors if type(t) in (torch.Tensor, nn.Parameter)]
        self._plain_addresses = [t.data_ptr() for t in self._plain]
        self._plain_indices = list(range(len(self._plain)))
        self._wrapped = _InnerTensors([t for t in tensors if type(t) not in (torch.Tensor, nn.Parameter)])
        modules = list(self.model.named_modules(remove_duplicate=False))
        _watched.update(m for _, m in modules)
        self._foreign = [_AttributeWatch(m) for _, m in modules if not isinstance(m, known)]
        self._signature = self._full_signature(named, modules)
        self._key = hashlib.sha256(json.dumps(self._portable(named, modules), default=str).encode()).hexdigest()

    @property
    def key(self) -> str:
        """A digest of everything but memory addresses (the compiled-program cache key's share of the model)."""
        return self._key

    def changed(self) -> bool:
        """Cheap check before every step: registrations, parameter addresses, the state of modules this package
        does not know (adapter layers), autocast. Dtypes are left to :meth:`signature_changed`: a cast needs new
        memory, so its address changes. (The check took ~120 us a step on the H100 host with dtypes read, of the
        ~400 us the host spends between two decode steps; on a 2-core VM reading the 577 dtypes was 33 of its
        75 us. The module docstring names the one case left to the next cache.)"""
        if _registrations != self._registrations or _autocast_state() != self._autocast:
            return True
        if not pointers_equal(self._plain, self._plain_addresses, self._plain_indices):
            return True
        if self._wrapped.changed():
            return True
        return any(watch.changed() for watch in self._foreign)

    def signature_changed(self) -> bool:
        """Thorough check (every module's attributes and hooks too), for every new cache."""
        if self.changed():
            return True
        named = list(self.model.named_parameters(remove_duplicate=False))
        named += list(self.model.named_buffers(remove_duplicate=False))
        return self._full_signature(named, list(self.model.named_modules(remove_duplicate=False))) != self._signature

    def _portable(self, named: list, modules: list) -> list:
        return [
            [(name, type(m).__module__ + "." + type(m).__qualname__, module_state(m), _hook_counts(m))
             for name, m in modules],
            [(name, list(t.shape), list(t.stride()), str(t.dtype), t.device.type) for name, t in named],
            _global_hook_counts(),
        ]

    def _full_signature(self, named: list, modules: list) -> tuple:
        portable = self._portable(named, modules)
        addresses = [(id(t), _address(t), str(t.device)) for _, t in named]
        return json.dumps(portable, default=str), tuple(addresses), tuple(id(m) for _, m in modules)


_DATA_PTR = torch.Tensor.data_ptr
# torch's C++ comparison of many tensors' data pointers (CUDA builds; what torch.compile's CUDA graphs check their
# static inputs with), used where present in place of a Python pass (0.06-0.15 us a tensor on the 2-core VM). Its
# own cost per tensor is not known: the H100 host's profile (2026-12-08) still charged 71 us a step to the model
# check of the 16-layer cut (343 tensors) with it; ``bench/gpu_check.py --only guard`` times both passes.
_C_POINTERS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def pointers_equal(tensors: list[torch.Tensor], addresses: list[int], indices: list[int]) -> bool:
    """Whether ``tensors[i].data_ptr() == addresses[i]`` for every ``i`` in ``indices`` (all of them)."""
    if _C_POINTERS_EQUAL is not None:
        return _C_POINTERS_EQUAL(tensors, addresses, indices)
    return list(map(_DATA_PTR, tensors)) == addresses


class _InnerTensors:
    """Before-every-step check of wrapper tensors (quantized weights: torchao's ``Int8Tensor`` holds ``qdata``,
    ``scale``, ``zero_point``; its own ``data_ptr()`` is 0): that each still holds the same inner tensor objects,
    and that those still have the same memory.

    The inner tensors are listed once, at :meth:`ModelGuard.refresh`; a step then costs one C-level pass of
    ``getattr`` + ``id`` over the list and one C-level pointer comparison. (Calling ``__tensor_flatten__`` for every
    wrapper at every step took ~4.5 us a weight on the 2-core VM: the 16-layer cut of the 48B in int8, ~200 weights,
    decoded at 3.55 ms a token against 2.50 in bf16 on an H100, where its kernels alone took the same time.)"""

    __slots__ = ("owners", "names", "ids", "leaves", "addresses", "indices")

    def __init__(self, wrappers: list[torch.Tensor]) -> None:
        self.owners: list[torch.Tensor] = []
        self.names: list[str] = []
        stack = list(wrappers)
        while stack:  # a wrapper may hold wrappers: walk down to plain tensors
            wrapper = stack.pop()
            if not hasattr(wrapper, "__tensor_flatten__"):
                continue
            for name in wrapper.__tensor_flatten__()[0]:
                inner = getattr(wrapper, name)
                self.owners.append(wrapper)
                self.names.append(name)
                if inner is not None and type(inner) not in (torch.Tensor, nn.Parameter):
                    stack.append(inner)
        inner = list(map(getattr, self.owners, self.names))
        self.ids = list(map(id, inner))
        self.leaves = [t for t in inner if type(t) in (torch.Tensor, nn.Parameter)]
        self.addresses = [t.data_ptr() for t in self.leaves]
        self.indices = list(range(len(self.leaves)))

    def changed(self) -> bool:
        if list(map(id, map(getattr, self.owners, self.names))) != self.ids:
            return True  # an inner tensor replaced by another object (the old one is still alive: held here)
        return not pointers_equal(self.leaves, self.addresses, self.indices)


def _address(tensor: torch.Tensor) -> int | tuple:
    """Where a tensor's data lives: its data pointer, or for a wrapper subclass (a quantized weight, whose own
    ``data_ptr()`` is 0) the addresses of the tensors it wraps."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return tuple(_address(getattr(tensor, name)) for name in names)
    return tensor.data_ptr()


def _autocast_state() -> tuple:
    """Autocast on/off and dtype for the device types the model can run on (a step traced without autocast must
    not be replayed under it, nor the other way round)."""
    state = []
    for device_type in ("cpu", "cuda"):
        enabled = torch.is_autocast_enabled(device_type)
        state.append((enabled, torch.get_autocast_dtype(device_type) if enabled else None))
    return tuple(state)
