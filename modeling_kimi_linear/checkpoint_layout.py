"""Mapping between the released tensor names and the in-memory layout.

The only difference is the routed experts: the release stores ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``
per expert; in memory they are ``block_sparse_moe.experts.gate_up_proj [E, 2I, D]`` (w1 rows, then w3 rows) and
``block_sparse_moe.experts.down_proj [E, D, I]``. Directories saved by native transformers 5.23 also name the
dense layer's MLP ``block_sparse_moe.{gate,up,down}_proj``; the release (and we) call it ``mlp.*``.

Loading uses transformers' own weight-conversion machinery (stacking happens tensor by tensor, per layer),
registered for our class only while our ``from_pretrained`` runs, so a native ``kimi_linear`` model loaded in the
same process keeps its own mapping. Saving uses :func:`released_state_dict` (views, no copies).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

_EXPERTS = re.compile(r"^(.*\.block_sparse_moe\.experts)\.(gate_up_proj|down_proj)$")


def load_transforms() -> list:
    """transformers weight transforms: released / native-saved names -> in-memory names."""
    from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming

    transforms: list = [
        WeightRenaming(source_patterns=rf"block_sparse_moe\.{name}\.", target_patterns=f"mlp.{name}.")
        for name in ("gate_proj", "up_proj", "down_proj")
    ]
    transforms += [
        WeightConverter(
            source_patterns=["block_sparse_moe.experts.*.w1.weight", "block_sparse_moe.experts.*.w3.weight"],
            target_patterns="block_sparse_moe.experts.gate_up_proj",
            operations=[_gate_up_op()],
        ),
        WeightConverter(
            source_patterns="block_sparse_moe.experts.*.w2.weight",
            target_patterns="block_sparse_moe.experts.down_proj",
            operations=[MergeModulelist(dim=0)],
        ),
    ]
    return transforms


def _gate_up_op():  # noqa: ANN202 - a transformers ConversionOps
    """The op that builds ``gate_up_proj [E, 2I, D]`` from the per-expert ``w1`` and ``w3`` (each ``[I, D]``).

    transformers' own ``MergeModulelist`` + ``Concatenate`` stack the w1's and the w3's into two ``[E, I, D]``
    tensors and then concatenate them: every byte of the largest tensors is copied twice. This op allocates the
    fused tensor once and copies each expert's two matrices into their rows. Loading a 2-layer checkpoint of the
    release's width (5.4 GB) on the 2-core VM: the concatenation alone took 4.9 of the 8.5 s of ``from_pretrained``
    (``python -m cProfile``); on an H100 host the same load took 17 s of a 21.8 s second-process start."""
    from transformers.core_model_loading import ConversionOps

    class FuseGateUp(ConversionOps):
        @torch.no_grad()
        def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str],
                    **kwargs) -> dict[str, torch.Tensor]:
            w1, w3 = (input_dict.pop(pattern) for pattern in source_patterns)
            if len(w1) != len(w3) or any(a.shape != w1[0].shape or b.shape != w1[0].shape for a, b in zip(w1, w3)):
                raise ValueError(f"{target_patterns[0]}: the experts' w1 and w3 differ in number or shape")
            inter = w1[0].shape[0]
            fused = torch.empty(len(w1), 2 * inter, *w1[0].shape[1:], dtype=w1[0].dtype, device=w1[0].device)
            for e, (gate, up) in enumerate(zip(w1, w3)):
                fused[e, :inter].copy_(gate)
                fused[e, inter:].copy_(up)
            return {target_patterns[0]: fused}

    return FuseGateUp()


@contextlib.contextmanager
def conversion_registered(class_name: str) -> Iterator[None]:
    """Register :func:`load_transforms` under ``class_name`` for the duration of one ``from_pretrained``."""
    from transformers import conversion_mapping as cm

    previous = cm.get_checkpoint_conversion_mapping(class_name)
    was_user = class_name in cm.USER_REGISTERED_MAPPINGS
    cm.register_checkpoint_conversion_mapping(class_name, load_transforms(), overwrite=True)
    try:
        yield
    finally:
        cache = cm._checkpoint_conversion_mapping_cache
        if previous is None:
            cache.pop(class_name, None)
        else:
            cache[class_name] = previous
        if not was_user:
            cm.USER_REGISTERED_MAPPINGS.discard(class_name)


def released_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory state dict -> released names; expert tensors become per-expert views (no copies)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        match = _EXPERTS.match(key)
        if match is None:
            out[key] = tensor
            continue
        prefix, kind = match.groups()
        if kind == "gate_up_proj":
            inter = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = tensor[e, :inter]
                out[f"{prefix}.{e}.w3.weight"] = tensor[e, inter:]
        else:
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = tensor[e]
    return out


def released_key_shapes(named_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Same renaming as :func:`released_state_dict` but on shapes only (works on the meta device)."""
    fake = {k: torch.empty(s, device="meta") for k, s in named_shapes.items()}
    return {k: tuple(v.shape) for k, v in released_state_dict(fake).items()}


def state_dict_from_released(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released names -> in-memory names (stacks the per-expert tensors; the inverse of
    :func:`released_state_dict`). Keys of a native-saved directory (dense MLP under ``block_sparse_moe``) are
    accepted too."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    pattern = re.compile(r"^(.*\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
    dense = re.compile(r"^(.*)\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.weight$")
    for key, tensor in released.items():
        match = pattern.match(key)
        if match is not None:
            prefix, e, w = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[w] = tensor
            continue
        match = dense.match(key)
        out[f"{match.group(1)}.mlp.{match.group(2)}.weight" if match else key] = tensor
    for prefix, per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise ValueError(f"{prefix}: expert indices {ids[:5]}... are not 0..{len(ids) - 1}")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["w1"], per_expert[e]["w3"]], 0) for e in ids]
        )
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["w2"] for e in ids])
    return out
