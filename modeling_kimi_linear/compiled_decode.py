"""Compiled CPU decode: the static decode step of :mod:`cuda_graph_decode`, ahead-of-time compiled to C++.

A batch-1 decode step of a small model on a CPU is a few hundred tiny PyTorch calls, and their dispatch, not the
arithmetic, takes most of the time. Compiled, the step becomes one generated C++ function: elementwise chains are
fused, the MoE's chosen experts and MLA's latent attention become loops that read their weights and cache rows once
(see ``KimiExperts.gathered`` and ``KimiMLAAttention.attend_latent``).

The step is traced once with ``torch.export`` as a function of tensors only (token ids, position, padding mask,
the cache's buffers; the number of cached rows it attends over is a dynamic dimension, so one program serves every
context length) and compiled by AOTInductor into a shared library. A call then runs the library directly: no
Python-level guard checks, which under ``torch.compile`` cost about as much as the step itself at the tiny size.

The library holds no weights: it reads the model's own parameters and buffers (``load_constants(...,
user_managed=True)``), so it takes no extra memory and does not depend on the weights' values. Inductor would
otherwise inline small tensors (a 1-D tensor of up to 8 values, such as the router's correction bias of an
8-expert model) into the generated code as literals: programs are compiled with ``always_keep_tensor_constants``,
and a freshly compiled program is used (and kept) only if every parameter and buffer the exported step reads is
one of its inputs; otherwise decoding falls back to op by op. Programs are kept on disk (:func:`program_dir`),
keyed on everything they do depend on - torch version, this package's source, the model's configuration, its
modules, their attributes, parameter names, shapes and dtypes (:attr:`decode_guard.ModelGuard.key`), batch size
and the CPU's vector ISA - so checkpoints of one shape (Base and Instruct, fine-tunes) share one program. The
first process with a given shape compiles (tens of seconds); later ones load the library in about a second.
Before every step the model is checked (:class:`decode_guard.ModelGuard`): a parameter replaced or cast, adapters
added, switched off, switched to another or merged, drop the loaded programs, and the next step loads (or
compiles) the one for the model as it now is.

Opt in with ``model.compile_cpu_decode = True``; ``model.warmup()`` compiles (or loads) the program up front.
If compiling fails (no C++ compiler, an unsupported platform, ...) decoding warns once and runs op by op.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .cuda_graph_decode import StaticDecodeStep, StaticDecoder
from .quantization import is_plain

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache

PROGRAM_DIR_ENV = "KIMI_LINEAR_PROGRAM_DIR"
MAX_ROWS = 1 << 24  # the largest context the program is compiled for


def program_dir() -> Path:
    """Where compiled decode programs are kept: ``$KIMI_LINEAR_PROGRAM_DIR``, else a folder in inductor's cache."""
    if os.environ.get(PROGRAM_DIR_ENV):
        return Path(os.environ[PROGRAM_DIR_ENV])
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # a torch that moved it: the system's temporary folder
        return Path(tempfile.gettempdir()) / "kimi_linear_decode"
    return Path(cache_dir()) / "kimi_linear_decode"


class StepProgram(nn.Module):
    """The model's static decode step as a function of tensors only (what ``torch.export`` traces).

    ``forward(ids [B, 1], position [1], keys_valid [B, R], *latents, *convs, *states) -> logits [B, 1, V]``, the
    flat list :func:`_step_inputs` builds: ``latents`` are the MLA layers' latent buffers of exactly the ``R`` rows
    attended over, ``convs`` / ``states`` the KDA layers' convolution tails and recurrent states, all updated in
    place.
    """

    def __init__(self, model: nn.Module, mla_layers: list[int], kda_layers: list[int]) -> None:
        super().__init__()
        self.model = model
        self.mla_layers = mla_layers
        self.kda_layers = kda_layers

    def forward(self, ids: torch.Tensor, position: torch.Tensor, keys_valid: torch.Tensor,
                *buffers: torch.Tensor) -> torch.Tensor:
        from .cache_kimi_linear import KimiLinearCache

        n_mla, n_kda = len(self.mla_layers), len(self.kda_layers)
        cache = KimiLinearCache(self.model.config)
        cache._latent = dict(zip(self.mla_layers, buffers[:n_mla]))
        cache._conv = dict(zip(self.kda_layers, buffers[n_mla : n_mla + n_kda]))
        cache._state = dict(zip(self.kda_layers, buffers[n_mla + n_kda :]))
        cache.graph_step = StaticDecodeStep(position, keys_valid, keys_valid.shape[1])
        return self.model._decode_logits(ids, cache)


def _source_digest() -> str:
    """Hash of this folder's Python sources (a compiled program is valid only for the code it was traced from),
    less the GPU autotuning records (data no CPU step reads: recording new ones must not recompile CPU programs)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name == "triton_tuned_configs.py":
            continue
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


# configuration entries that do not change what a decode step computes: a model loaded from another folder, or
# with use_cache switched off and on again (Trainer does), finds the same program
_UNTRACED_CONFIG = {"transformers_version", "architectures", "auto_map", "use_cache", "return_dict",
                    "output_hidden_states", "output_attentions", "output_router_logits"}


def _traced_config(config) -> dict:  # noqa: ANN001 - a KimiLinearConfig
    """The configuration entries a compiled program depends on (the key of its file, with the rest)."""
    return {key: value for key, value in config.to_dict().items()
            if key not in _UNTRACED_CONFIG and not key.startswith("_")}


def _step_inputs(ids: torch.Tensor, cache: "KimiLinearCache", mla: list[int], kda: list[int]) -> list[torch.Tensor]:
    """The program's inputs, each a whole contiguous tensor: the program reads a row ``b`` at offset
    ``b * rows * width``, so the latent buffers are exactly ``bucket`` rows long (``exact_buffers``) and the mask
    is copied."""
    step = cache.graph_step
    rows = step.bucket
    return ([ids, step.position, step.keys_valid[:, :rows].contiguous()] + [cache._latent[i] for i in mla]
            + [cache._conv[i] for i in kda] + [cache._state[i] for i in kda])


class _Program:
    """One loaded program and the model tensors it reads."""

    def __init__(self, runner, step: StepProgram) -> None:  # noqa: ANN001 - torch's AOTICompiledModel
        self.runner = runner
        self.step = step
        # the loader's flat-list entry point (the model's __call__ re-parses its input spec on every call)
        self.run: Callable[[list[torch.Tensor]], list[torch.Tensor]] = runner.loader.boxed_run
        self.fqns: list[str] = runner.get_constant_fqns()
        named = self._named()
        missing = [name for name in self.fqns if name not in named]
        if missing:
            raise RuntimeError(f"compiled decode program needs tensors the model does not have: {missing[:3]}")
        tensors = {name: named[name] for name in self.fqns}
        runner.load_constants(tensors, check_full_update=True, user_managed=True)
        # the program holds raw pointers: keep each parameter and a view of the memory it had, so that memory
        # stays alive even if the model moves the parameter elsewhere (``.to()``, ``param.data = ...``)
        self.bound = [(t, t.detach()) for t in tensors.values()]

    def _named(self) -> dict[str, torch.Tensor]:
        named = dict(self.step.named_parameters(remove_duplicate=False))
        named.update(self.step.named_buffers(remove_duplicate=False))
        return named


class CompiledDecoder(StaticDecoder):
    """:class:`StaticDecoder` whose step runs an AOTInductor program (compiled or loaded on the first step)."""

    exact_buffers = True  # the program takes whole latent buffers of exactly the rows attended over

    def __init__(self, forward_step: Callable[[torch.Tensor, "KimiLinearCache"], torch.Tensor]) -> None:
        super().__init__(forward_step, use_graph=False)
        self._programs: dict[tuple, _Program] = {}
        self._failed = False

    def __deepcopy__(self, memo: dict) -> "CompiledDecoder":
        # programs read the original model's tensors; the copy loads its own on its first step
        return CompiledDecoder(copy.deepcopy(self.forward_step, memo))

    def _model_changed(self) -> None:
        # loaded programs hold the old tensors' addresses (and may have been built for another structure)
        self._programs.clear()

    def _call(self, ids: torch.Tensor, cache: "KimiLinearCache") -> torch.Tensor:
        if self._failed:
            return self.forward_step(ids, cache)
        mla, kda = sorted(cache._latent), sorted(cache._state)
        key = (ids.shape[0], tuple(mla), tuple(kda))
        program = self._programs.get(key)
        if program is None:
            try:
                program = self._programs[key] = self._program(ids, cache, mla, kda)
            except Exception as error:  # noqa: BLE001 - no C++ compiler, an unsupported platform, ...
                # compiling fails before the step runs, so the cache is untouched: decode op by op from here on
                warnings.warn(f"compile_cpu_decode: compiling the decode step failed ({type(error).__name__}: "
                              f"{error}); decoding op by op instead", RuntimeWarning, stacklevel=2)
                self._failed = True
                return self.forward_step(ids, cache)
        return program.run(_step_inputs(ids, cache, mla, kda))[0]

    def _program(self, ids: torch.Tensor, cache: "KimiLinearCache", mla: list[int], kda: list[int]) -> _Program:
        """Load the program for this model and batch size from :func:`program_dir`, compiling it if absent."""
        if not all(is_plain(p) for p in self.model.parameters()):  # export unwraps them into names it can't bind
            raise NotImplementedError("quantized weights (torchao tensor subclasses) are not compiled")
        step = StepProgram(self.model, mla, kda)
        signature = {
            "torch": torch.__version__,
            "source": _source_digest(),
            "config": _traced_config(self.model.config),
            "model": self._guard.key,  # modules, their attributes, tensor names / shapes / dtypes
            "batch": ids.shape[0],
            "layers": [mla, kda],
            "isa": str(torch._inductor.cpu_vec_isa.pick_vec_isa()),
        }
        digest = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:32]
        path = program_dir() / f"decode-{digest}.pt2"
        runner = _load(path) if path.exists() else None
        if runner is None:
            path = _compile(step, _step_inputs(ids, cache, mla, kda), path)
            runner = _load(path, strict=True)
        return _Program(runner, step)


def _model_inputs(program: "torch.export.ExportedProgram") -> list[str]:
    """Names of the parameters and buffers an exported step reads (each must be an input of the compiled program,
    never a value baked into it). Export lifts every parameter of the module; those the step does not use (an
    inactive adapter's, say) have no users in the graph and are left out."""
    from torch.export.graph_signature import InputKind

    used = {node.name for node in program.graph.nodes if node.op == "placeholder" and node.users}
    return [spec.target for spec in program.graph_signature.input_specs
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.arg.name in used]


def _load(path: Path, strict: bool = False):  # noqa: ANN202 - torch's AOTICompiledModel
    """The program at ``path``; a file that does not load is removed (and compiled again) unless ``strict``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations while loading
            return torch._inductor.aoti_load_package(str(path))
    except Exception:
        if strict:
            raise
        path.unlink(missing_ok=True)
        return None


def _compile(step: StepProgram, inputs: list[torch.Tensor], path: Path) -> Path:
    """Export ``step`` on example ``inputs`` (rows attended over dynamic) and AOT-compile it to ``path`` (or to
    a temporary folder where ``path``'s is not writable); returns where the program is."""
    rows = torch.export.Dim("rows", min=2, max=MAX_ROWS)
    n_mla, n_kda = len(step.mla_layers), len(step.kda_layers)
    dynamic = ({}, {}, {1: rows}, ({1: rows},) * n_mla + ({},) * (2 * n_kda))  # *buffers: one entry, a tuple
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations while exporting
        # example inputs only carry shapes; clones are ordinary tensors even if the caller's are inference tensors
        example = tuple(t.clone() for t in inputs)
        program = torch.export.export(step, example, dynamic_shapes=dynamic)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        except OSError:  # no writable program folder: compile for this process only
            path = Path(tempfile.mkdtemp(prefix="kimi_linear_decode_")) / path.name
            handle, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
        os.close(handle)
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp,
                # weights stay inputs: none are written into the library, and none (however small) are inlined
                # into its code as literals
                inductor_configs={"aot_inductor.package_constants_in_so": False,
                                  "always_keep_tensor_constants": True},
            )
            baked = sorted(set(_model_inputs(program)) - set(_load(Path(tmp), strict=True).get_constant_fqns()))
            if baked:
                raise RuntimeError(f"the compiled program bakes in {len(baked)} model tensor(s) instead of reading "
                                   f"them, e.g. {baked[:3]}")
            os.replace(tmp, path)  # whole or not at all: another process may be loading it
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
