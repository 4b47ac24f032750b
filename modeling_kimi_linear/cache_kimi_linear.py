"""The hybrid cache: the MLA latent per token for full-attention layers, fixed-size states for KDA layers.

Per MLA layer: ``[B, S, kv_lora_rank + qk_rope_head_dim]`` in the model dtype (576 values per token for the
release), kept in a buffer that grows by doubling so that a decode step does not re-allocate.
Per KDA layer: the raw q/k/v convolution tail ``[B, 3*H*K, W-1]`` (model dtype) and the recurrent state
``[B, H, K, V]`` (float32). Nothing else is stored.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

if TYPE_CHECKING:
    from .configuration_kimi_linear import KimiLinearConfig
    from .cuda_graph_decode import StaticDecodeStep


def cache_bytes(config: "KimiLinearConfig", context_length: int, batch_size: int = 1,
                element_size: int = 2) -> dict[str, int]:
    """Bytes :class:`KimiLinearCache` holds after ``context_length`` tokens, computed from the configuration.

    ``element_size`` is the model dtype's size (2 for bf16); KDA recurrent states are always float32. Returns the
    parts (``mla_latent``, ``kda_conv``, ``kda_state``) and their ``total``; the MLA part grows with the context,
    the KDA parts do not.
    """
    latent_width = config.mla_latent_dim
    heads, dim = config.kda_num_heads, config.kda_head_dim
    n_mla, n_kda = len(config.mla_layers), len(config.kda_layers)
    parts = {
        "mla_latent": n_mla * batch_size * context_length * latent_width * element_size,
        "kda_conv": n_kda * batch_size * 3 * heads * dim * (config.kda_conv_size - 1) * element_size,
        "kda_state": n_kda * batch_size * heads * dim * dim * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


_DATA_PTR = torch.Tensor.data_ptr
_SHAPE = operator.attrgetter("shape")


def _writable(t: torch.Tensor) -> bool:
    """Whether ``t`` may be changed in place here (an inference tensor only inside ``torch.inference_mode``)."""
    return not t.is_inference() or torch.is_inference_mode_enabled()


class KimiLinearCache(Cache):
    """Cache for :class:`KimiLinearForCausalLM`; created by the model when ``use_cache`` and none is given."""

    is_compileable = False

    def __init__(self, config: "KimiLinearConfig") -> None:
        super().__init__(layers=[])
        self.num_layers = config.num_hidden_layers
        self.mla_layers = set(config.mla_layers)
        self._latent: dict[int, torch.Tensor] = {}  # capacity buffers [B, cap, L]
        self._conv: dict[int, torch.Tensor] = {}
        self._state: dict[int, torch.Tensor] = {}
        self._seen_tokens = 0
        # Set by cuda_graph_decode while a static-shape decode step runs (eagerly for warm-up, or being captured):
        # layers then write in place at a device-side position instead of growing or replacing tensors.
        self.graph_step: "StaticDecodeStep | None" = None

    # ------------------------------------------------------------------ writes from the layers
    def append_latent(self, layer_idx: int, latent: torch.Tensor) -> torch.Tensor:
        """Append ``latent [B, T, L]`` for ``layer_idx`` and return all cached latents ``[B, S, L]`` (a view).

        In a static decode step the one new row is written at the step's device-side position and the first
        ``bucket`` rows are returned (rows past the position are masked by the step)."""
        step = self.graph_step
        if step is not None:
            buf = self._latent[layer_idx]
            buf.index_copy_(1, step.position, latent)
            return buf[:, : step.bucket]
        used = self.get_seq_length()
        buf = self._latent.get(layer_idx)
        need = used + latent.shape[1]
        if buf is None or buf.shape[1] < need or buf.shape[0] != latent.shape[0]:
            buf = self._latent[layer_idx] = self._grown(buf, latent, need)
        buf[:, used:need] = latent
        return buf[:, :need]

    def _grown(self, buf: torch.Tensor | None, like: torch.Tensor, need: int, exact: bool = False) -> torch.Tensor:
        """A buffer of at least ``need`` rows (doubling; exactly ``need`` with ``exact``), holding the used rows of
        ``buf``."""
        used = self.get_seq_length()
        cap = need if exact else max(need, 2 * (buf.shape[1] if buf is not None else 0), 16)
        # zeros, not empty: a static decode step reads unused rows with zero attention weight, and 0 * NaN garbage
        # would be NaN
        new = like.new_zeros(like.shape[0], cap, like.shape[2])
        if buf is not None and used:
            new[:, :used] = buf[:, :used]
        return new

    def reserve(self, rows: int, exact: bool = False) -> None:
        """Make every MLA latent buffer hold at least ``rows`` tokens (a static decode step reads ``bucket``
        rows, which must exist); with ``exact``, exactly ``rows`` (a compiled step takes whole buffers)."""
        for i, buf in self._latent.items():
            if buf.shape[1] < rows or (exact and buf.shape[1] != rows):
                self._latent[i] = self._grown(buf, buf, rows, exact)

    def tensors(self) -> list[torch.Tensor]:
        """Every cached tensor: the MLA latent buffers, then the KDA convolution tails and states."""
        return [*self._latent.values(), *self._conv.values(), *self._state.values()]

    def storage_key(self) -> tuple:
        """Addresses of every cached tensor: a captured CUDA graph is valid only while these stay the same."""
        tensors = self.tensors()
        # map() over C accessors: this runs before every decode step (a few microseconds for 27 layers, where a
        # generator of per-tensor tuples took ~16 us on a 2-core CPU)
        return (tuple(self._latent), tuple(self._conv), tuple(self._state), tuple(map(_DATA_PTR, tensors)),
                tuple(map(_SHAPE, tensors)))

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the KDA states and convolution tails (what a warm-up decode step changes in place)."""
        return [t.clone() for store in (self._conv, self._state) for _, t in sorted(store.items())]

    def restore(self, saved: list[torch.Tensor]) -> None:
        """Write a :meth:`snapshot` back into the same tensors."""
        tensors = [t for store in (self._conv, self._state) for _, t in sorted(store.items())]
        for t, old in zip(tensors, saved, strict=True):
            t.copy_(old)

    def latent(self, layer_idx: int) -> torch.Tensor | None:
        """Cached MLA latents ``[B, S, kv_lora_rank + qk_rope_head_dim]`` of ``layer_idx`` (a view), or None."""
        buf = self._latent.get(layer_idx)
        return None if buf is None else buf[:, : self._seen_tokens]

    def kda_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(conv tail [B, C, W-1] or None, recurrent state [B, H, K, V] fp32 or None)``."""
        return self._conv.get(layer_idx), self._state.get(layer_idx)

    def update_kda_state(self, layer_idx: int, conv: torch.Tensor, state: torch.Tensor) -> None:
        if self.graph_step is not None:  # static step: the same tensors, new contents
            self._conv[layer_idx].copy_(conv)
            self._state[layer_idx].copy_(state)
            return
        self._conv[layer_idx] = conv
        self._state[layer_idx] = state

    def advance(self, num_tokens: int) -> None:
        """Called by the model once per forward, after all layers ran (for a static decode step, by the step's
        runner after each replay instead)."""
        if self.graph_step is None:
            self._seen_tokens += num_tokens

    # ------------------------------------------------------------------ Cache API used by generate()
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (padding included); works for all-KDA models too."""
        return self._seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen_tokens + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._seen_tokens

    def __len__(self) -> int:
        return self.num_layers

    @property
    def is_initialized(self) -> bool:
        return self._seen_tokens > 0

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [i not in self.mla_layers for i in range(self.num_layers)]

    @property
    def is_croppable(self) -> bool:
        return not self._state

    @property
    def batch_size(self) -> int:
        for t in list(self._state.values()) + list(self._latent.values()):
            return t.shape[0]
        return 0

    def _map_batch(self, fn) -> None:  # noqa: ANN001
        for store in (self._latent, self._conv, self._state):
            for i, t in store.items():
                new = fn(t)
                if new.shape == t.shape and _writable(t):
                    t.copy_(new)  # same batch size (beam reordering): in place, so captured graphs stay valid
                else:
                    store[i] = new

    def make_writable(self) -> None:
        """Give every cached tensor its own writable, contiguous storage (conv tails can be views of a larger
        window; tensors made under ``torch.inference_mode`` cannot be written in place outside it)."""
        for store in (self._latent, self._conv, self._state):
            for i, t in store.items():
                if not t.is_contiguous() or not _writable(t):
                    store[i] = t.clone(memory_format=torch.contiguous_format)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx``."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """Drop cached tokens beyond ``max_length`` (negative: drop that many). Only possible before any KDA
        state exists: a recurrent state cannot be rolled back."""
        if max_length < 0:
            max_length = self._seen_tokens + max_length
        if max_length >= self._seen_tokens:
            return
        if self._state:
            raise ValueError(
                "KimiLinearCache.crop: the KDA layers keep a recurrent state that cannot be rolled back to an "
                "earlier position; re-run the prompt instead"
            )
        self._seen_tokens = max_length

    def reset(self) -> None:
        self._latent.clear()
        self._conv.clear()
        self._state.clear()
        self._seen_tokens = 0

    def memory_bytes(self) -> int:
        """Bytes of cache content: used latent rows plus KDA states (not the spare capacity of the buffers)."""
        used = self._seen_tokens
        total = sum(t[:, :used].numel() * t.element_size() for t in self._latent.values())
        total += sum(t.numel() * t.element_size() for t in self._conv.values())
        total += sum(t.numel() * t.element_size() for t in self._state.values())
        return total

    def __repr__(self) -> str:
        return (
            f"KimiLinearCache(tokens={self._seen_tokens}, mla_layers={sorted(self.mla_layers)}, "
            f"bytes={self.memory_bytes()})"
        )
