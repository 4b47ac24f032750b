"""What differs between the transformers versions we support (5.23 and later 5.x).

transformers 5.24 renamed the cache argument of every model's ``forward`` and the cache field of every model
output from ``past_key_values`` to ``cache`` (the old names still work there, with a deprecation warning).
``generate()`` of 5.24 passes ``cache=``; that of 5.23 passes ``past_key_values=``. Our forwards accept both
names and our outputs are built with the field name of the installed version, so no warning is printed on
either.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from transformers.modeling_outputs import MoeModelOutputWithPast

if TYPE_CHECKING:
    from .cache_kimi_linear import KimiLinearCache

#: Name of the cache field of model outputs in the installed transformers.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(cache: "KimiLinearCache | None", past_key_values: "KimiLinearCache | None") -> "KimiLinearCache | None":
    """The cache passed under either name; both at once is an error."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def cache_field(cache: "KimiLinearCache | None") -> dict[str, Any]:
    """``{field: cache}`` for building a model output with the installed version's field name, or for passing a
    cache to ``generate()`` under the installed version's argument name (5.24 and later warn that
    ``past_key_values`` is deprecated there)."""
    return {CACHE_FIELD: cache}


def output_cache(output: Any) -> "KimiLinearCache | None":
    """The cache of a model output (``output.cache`` on transformers >= 5.24, ``output.past_key_values`` before)."""
    return output.get(CACHE_FIELD)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def build_output(cls: type, **values: Any) -> Any:
    """``cls(**values)`` for a ``ModelOutput`` dataclass, built without its per-field checks: the same object (an
    ordered dict of the non-``None`` fields in declaration order, every field also an attribute) for a few
    microseconds instead of ~30 (``ModelOutput.__setattr__`` looks up all fields for each one it sets). Only for a
    first field that is not an iterable of ``(key, value)`` pairs (``ModelOutput`` unpacks those)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    if CACHE_FIELD != "cache" or not values.keys() <= set(names):  # old names, unknown fields: the normal path
        return cls(**values)
    out = cls.__new__(cls)
    OrderedDict.__init__(out)
    for name in names:
        value = values.get(name)
        object.__setattr__(out, name, value)
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
    return out
