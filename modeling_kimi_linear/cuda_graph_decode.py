"""CUDA-graph decode: one new token per sequence, replayed from a captured graph instead of launched op by op.

A decode step of a batch-1 model launches a few hundred small kernels; launched one by one from Python, the GPU
waits on the host most of the time. Here the step is captured once per *bucket* of cache lengths and replayed:

* the step is written with static shapes: every MLA layer writes its new latent row at a device-side position
  (``index_copy_``) and attends over the first ``bucket`` rows of its cache buffer, rows past the position
  masked; KDA layers update their recurrent states and convolution tails in place;
* buckets are 4 per doubling of the context (256, 320, 384, 448, 512, 640, ...), so attention reads at most 25%
  more rows than needed and a long generation captures a new graph only every few hundred tokens;
* the inputs (token ids, position, the padding mask) are copied into static tensors before each replay, and the
  Python-side token count is advanced after it.

A graph is valid only while the cache keeps the same tensors: when a cache buffer grows, when the batch size
changes, or for a new cache (each ``generate()`` call), graphs are captured again (a warm-up step and a
capture, a few tens of ms per bucket). It is equally valid only while the model is the one it was captured from:
a :class:`~modeling_kimi_linear.decode_guard.ModelGuard` is checked before every step (parameters replaced or
cast, modules added or swapped, adapters switched on, off or merged) and at every new cache (any module attribute,
hooks); a change drops every graph. :class:`~modeling_kimi_linear.KimiLinearForCausalLM` uses this path for
CUDA decode steps unless ``model.cuda_graph_decode`` is set to false (checked against op-by-op decoding on an
H200: ``bench/gpu_check.py --only graph``); the same static step also runs
without a graph (``use_graph=False``), which is how CPU tests check it against the ordinary decode.
"""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .decode_guard import ModelGuard

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache

MIN_BUCKET = 256
STEPS_PER_DOUBLING = 4


def decode_bucket(rows: int) -> int:
    """Smallest bucket ``>= rows``: a multiple of ``2**(floor(log2(rows)) - 2)`` (four buckets per doubling)."""
    if rows <= MIN_BUCKET:
        return MIN_BUCKET
    grain = 2 ** (math.floor(math.log2(rows)) - int(math.log2(STEPS_PER_DOUBLING)))
    return -(-rows // grain) * grain


@dataclass
class StaticDecodeStep:
    """The device-side inputs of a static decode step, read by the layers through ``cache.graph_step``."""

    position: torch.Tensor  # [1] long: index of the new token (= tokens already cached)
    keys_valid: torch.Tensor  # [B, capacity] bool: False at padded positions
    bucket: int  # cache rows an MLA layer attends over

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(token_mask [B, 1], attention mask [B, 1, 1, bucket])`` for the new token, built on the device."""
        rows = torch.arange(self.bucket, device=self.position.device)
        keys = self.keys_valid[:, : self.bucket] & (rows <= self.position)
        token = self.keys_valid.gather(1, self.position.expand(self.keys_valid.shape[0], 1))
        return token, keys[:, None, None, :]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    logits: torch.Tensor


class StaticDecoder:
    """Runs decode steps of one model through :class:`StaticDecodeStep`, captured as CUDA graphs when
    ``use_graph`` (CUDA tensors only).

    ``forward_step(input_ids, cache) -> logits [B, 1, V]`` is the model's own forward for one token; it must read
    its masks from ``cache.graph_step`` (the model does).
    """

    exact_buffers = False  # latent buffers of at least the bucket's rows (a graph reads the first ``bucket``)

    def __init__(self, forward_step: Callable[[torch.Tensor, "KimiLinearCache"], torch.Tensor],
                 use_graph: bool = True) -> None:
        self.forward_step = forward_step
        self.use_graph = use_graph
        self._graphs: dict[tuple, _Captured] = {}
        self._storage: tuple | None = None
        self._cache_tensors: tuple[bool, list] = (False, [])  # inference mode, weak references (_same_tensors)
        self._position: int | None = None  # what the device position holds after the last step
        self._keys: tuple | None = None  # what keys_valid holds (_write_keys); None: unknown
        self._inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._pool = None
        self._guard: ModelGuard | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The model whose step this runs (``forward_step`` is its bound method)."""
        return self.forward_step.__self__

    def __deepcopy__(self, memo: dict) -> "StaticDecoder":
        # graphs belong to the original's tensors; the step function is re-bound to the copied model
        return StaticDecoder(copy.deepcopy(self.forward_step, memo), self.use_graph)

    def reset(self) -> None:
        """Drop every captured graph and static input."""
        self._drop_graphs()
        self._storage = self._inputs = None
        self._cache_tensors = (False, [])
        self._position = self._keys = None

    def _drop_graphs(self) -> None:
        # a memory pool whose graphs are all gone is released by PyTorch: later captures need a new one
        self._graphs.clear()
        self._pool = None

    def _model_changed(self) -> None:
        """The model changed under the static step (see :mod:`decode_guard`): nothing built from it may run."""
        self._drop_graphs()

    def _check_model(self, new_cache: bool) -> None:
        """Rebuild what was built from the model if it changed: the cheap check every step, the thorough one at
        every new cache."""
        guard = self._guard
        if guard is None:
            self._guard = ModelGuard(self.model)
            return
        if guard.signature_changed() if new_cache else guard.changed():
            guard.refresh()
            self._model_changed()

    def _same_tensors(self, cache: "KimiLinearCache") -> bool:
        """Whether ``cache`` holds the same tensor objects as at the last full look (which made them writable and
        read their addresses), under the same inference mode. A few microseconds, where the full look (every
        tensor's contiguity, inference flag, address and shape) is ~20 us before every step on a slow host: the
        host's time between steps is time the GPU waits in ``generate()``."""
        mode, refs = self._cache_tensors
        tensors = cache.tensors()
        return (mode == torch.is_inference_mode_enabled() and len(refs) == len(tensors)
                and all(ref() is t for ref, t in zip(refs, tensors)))

    def _static_inputs(self, input_ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
        bsz = input_ids.shape[0]
        if self._inputs is None or self._inputs[0].shape[0] != bsz or self._inputs[2].shape[1] < capacity:
            self.reset()
            device = input_ids.device
            self._inputs = (
                torch.zeros(bsz, 1, dtype=torch.long, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                torch.ones(bsz, max(capacity, 2 * MIN_BUCKET), dtype=torch.bool, device=device),
            )
        return self._inputs

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             cache: "KimiLinearCache", grown_from: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``input_ids [B, 1]`` with ``cache`` (already holding a prompt); returns logits ``[B, 1, V]``
        and advances the cache by one token. ``grown_from``: the mask ``attention_mask`` was made from by appending
        one column of ones, if the caller knows it (the model's ``generate()`` update does)."""
        past = cache.get_seq_length()
        bucket = decode_bucket(past + 1)
        cache.reserve(bucket, exact=self.exact_buffers)
        ids, position, keys_valid = self._static_inputs(input_ids, bucket)
        if self._storage is not None and self._same_tensors(cache):
            cache_key = self._storage[0]  # the very tensors of the last step: writable, and the same memory
        else:
            cache.make_writable()
            self._cache_tensors = (torch.is_inference_mode_enabled(), [weakref.ref(t) for t in cache.tensors()])
            cache_key = cache.storage_key()
        storage = (cache_key, keys_valid.data_ptr())
        new_storage = storage != self._storage
        if new_storage:  # new cache, grown buffers, other batch: every graph is stale
            self._drop_graphs()
            self._storage = storage
        self._check_model(new_cache=new_storage)
        ids.copy_(input_ids)
        if self._position != past:  # each step leaves the device position one further (see _advanced_run)
            position.fill_(past)
        self._write_keys(keys_valid, attention_mask, past, grown_from)
        step = StaticDecodeStep(position, keys_valid, bucket)
        if not (self.use_graph and ids.is_cuda):
            logits = self._advanced_run(step, ids, cache)
        else:
            captured = self._graphs.get(bucket)
            if captured is None:
                captured = self._graphs[bucket] = self._capture(step, ids, cache)
            captured.graph.replay()
            logits = captured.logits.clone()
        self._position = past + 1
        cache.advance(1)
        return logits

    def _write_keys(self, keys_valid: torch.Tensor, attention_mask: torch.Tensor | None, past: int,
                    grown_from: torch.Tensor | None) -> None:
        """Make ``keys_valid[:, :past + 1]`` the step's mask, every column after it True, with as few device
        operations as the last step allows: none when the mask is the last step's grown by one column of ones
        (``grown_from``, from ``generate()``'s own update) or when there is no mask and none was written. On the
        H100 host each eager operation costs the GPU ~30 us of waiting between two graph replays."""
        state = self._keys
        if attention_mask is None:
            if state != ("ones",):
                keys_valid.fill_(True)
            self._keys = ("ones",)
            return
        columns = attention_mask.shape[1]
        if columns == past + 1:
            seen = state[1]() if state is not None and state[0] == "mask" else None
            if grown_from is None or seen is None or grown_from is not seen:
                keys_valid[:, : past + 1].copy_(attention_mask)
                keys_valid[:, past + 1 :].fill_(True)
            self._keys = ("mask", weakref.ref(attention_mask))
        elif columns == 1:  # the new token's column only
            keys_valid.fill_(True)
            keys_valid[:, past : past + 1].copy_(attention_mask)
            self._keys = None
        else:
            raise ValueError(f"attention_mask has {columns} columns; expected {past + 1} (cached + new tokens)")

    def _advanced_run(self, step: StaticDecodeStep, ids: torch.Tensor, cache: "KimiLinearCache") -> torch.Tensor:
        """One step, then the device position moved on by one (so the next step need not write it)."""
        logits = self._run(step, ids, cache)
        step.position.add_(1)
        return logits

    def _run(self, step: StaticDecodeStep, ids: torch.Tensor, cache: "KimiLinearCache") -> torch.Tensor:
        cache.graph_step = step
        try:
            return self._call(ids, cache)
        finally:
            cache.graph_step = None

    def _call(self, ids: torch.Tensor, cache: "KimiLinearCache") -> torch.Tensor:
        """One static step with ``cache.graph_step`` set (a subclass may run it compiled)."""
        return self.forward_step(ids, cache)

    def _capture(self, step: StaticDecodeStep, ids: torch.Tensor, cache: "KimiLinearCache") -> _Captured:
        """Warm up (kernels compile and tune outside the capture; the cache's states are restored after) and
        capture one step."""
        saved = cache.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run(step, ids, cache)
        torch.cuda.current_stream().wait_stream(side)
        cache.restore(saved)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._advanced_run(step, ids, cache)
        return _Captured(graph, logits)
