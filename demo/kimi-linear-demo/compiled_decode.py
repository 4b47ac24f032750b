"""Compiled CPU decode: the static decode step of :mod:`cuda_graph_decode` through ``torch.compile`` (inductor).

A batch-1 decode step of a small model on a CPU is a few hundred tiny PyTorch calls, and their dispatch, not the
arithmetic, takes most of the time. Compiled, the step becomes one generated C++ function: elementwise chains are
fused, the MoE's chosen experts and MLA's latent attention become loops that read their weights and cache rows once
(see ``KimiExperts.gathered`` and ``KimiMLAAttention.attend_latent``), and the matrix products are called from
C++ (``cpp_wrapper``).

Opt in with ``model.compile_cpu_decode = True`` (off by default: compiling takes tens of seconds, which a short
generation would not win back). The step is compiled with dynamic shapes, so growing context lengths reuse one
graph; inductor specialises its code once more past 4096 cached rows (one more compile when a generation gets
there) and per batch size. Inductor keeps compiled code in its on-disk cache, so a later process with the same
model shapes compiles in seconds. ``model.warmup()`` compiles the first graph up front.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Callable

import torch

from .cuda_graph_decode import StaticDecoder

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache

# generated C++ calls the matrix products directly, rather than through Python (about 1 ms a step at the tiny size)
COMPILE_OPTIONS = {"cpp_wrapper": True}


class CompiledDecoder(StaticDecoder):
    """:class:`StaticDecoder` whose step runs through ``torch.compile`` (compiled on the first step)."""

    def __init__(self, forward_step: Callable[[torch.Tensor, "KimiLinearCache"], torch.Tensor]) -> None:
        super().__init__(forward_step, use_graph=False)
        self._compiled: Callable | None = None

    def __deepcopy__(self, memo: dict) -> "CompiledDecoder":
        # compiled code belongs to the original model; the copy compiles its own on its first step
        return CompiledDecoder(copy.deepcopy(self.forward_step, memo))

    def _call(self, ids: torch.Tensor, cache: "KimiLinearCache") -> torch.Tensor:
        if self._compiled is None:
            compiled = torch.compile(self.forward_step, dynamic=True, fullgraph=True, options=COMPILE_OPTIONS)
            try:
                logits = compiled(ids, cache)
            except Exception as error:  # noqa: BLE001 - no C++ compiler, an unsupported platform, ...
                # compiling fails before the step runs, so the cache is untouched: decode op by op from here on
                warnings.warn(f"compile_cpu_decode: torch.compile failed ({type(error).__name__}: {error}); "
                              "decoding op by op instead", RuntimeWarning, stacklevel=2)
                self._compiled = self.forward_step
                return self.forward_step(ids, cache)
            self._compiled = compiled
            return logits
        return self._compiled(ids, cache)
