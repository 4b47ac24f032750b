"""Autotuning results shipped with the package, so that a fresh GPU machine compiles fla's kernels but does not
benchmark them.

fla's Triton kernels are autotuned on first use: every candidate configuration is compiled and timed, for each
kernel and key (head counts, head size, block sizes, dtypes; not the sequence length). On a fresh H200 that took
about four minutes of ``model.warmup()`` (2026-12-01) before the first token. Triton keeps the results on disk
(``cache_results``), which saves a *second* process, but not the first one on a machine.

This module records, after a run, the configuration each of fla's autotuners settled on (:func:`dump`), and
before the first kernel call of a later process writes those choices into the autotuners' in-memory caches
(:func:`apply`), so that each kernel is compiled once, with the recorded configuration, and not benchmarked. The
records are keyed on everything a choice depends on: the GPU's name, fla's version and Triton's version; a
different GPU or version finds no record and autotunes as before. A recorded configuration is used only if it is
one of the kernel's own candidates. Any of them computes the same result; the record only saves the search.

The records live in ``triton_tuned_configs.json`` next to this module (written by ``bench/gpu_scale.py`` on the
lent GPUs); ``KIMI_LINEAR_TRITON_TUNING_FILE`` names another file, ``KIMI_LINEAR_TRITON_TUNING=0`` switches them
off.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

TUNED_FILE = Path(__file__).with_name("triton_tuned_configs.json")
ENV_SWITCH = "KIMI_LINEAR_TRITON_TUNING"
ENV_FILE = "KIMI_LINEAR_TRITON_TUNING_FILE"
_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def machine_key() -> str | None:
    """``"<GPU name> | fla <version> | triton <version>"`` for the current GPU, or None without CUDA / fla."""
    try:
        import torch
        import triton

        import fla
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"{torch.cuda.get_device_name(0)} | fla {fla.__version__} | triton {triton.__version__}"


def autotuners(prefix: str = "fla.") -> dict[str, Any]:
    """Every Triton autotuner defined at module level in the imported modules under ``prefix``, by
    ``"module:attribute"`` (decorator wrappers such as ``triton.heuristics`` are looked through)."""
    try:  # (in a try: transformers' remote-code check then does not require triton where a checkpoint loads)
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return {}
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            seen = 0
            while value is not None and seen < 4:  # Heuristics(Autotuner(JITFunction)) and the like
                if isinstance(value, Autotuner):
                    found[f"{name}:{attr}"] = value
                    break
                value, seen = getattr(value, "fn", None), seen + 1
    return found


def _config_record(config: Any) -> dict:
    return {"kwargs": dict(config.kwargs), **{field: getattr(config, field, None) for field in _FIELDS}}


def _json_key(key: tuple) -> list:
    return [v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for v in key]


def _tuple_key(key: list) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in key)


def read(path: Path = TUNED_FILE) -> dict:
    """The records in ``path`` (empty if the file is absent)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def records_file() -> Path:
    """The records :func:`apply` reads: ``$KIMI_LINEAR_TRITON_TUNING_FILE``, else the file shipped here."""
    return Path(os.environ.get(ENV_FILE) or TUNED_FILE)


def apply(path: Path | None = None) -> int:
    """Fill fla's autotuners' caches with the recorded choices for this GPU and these versions (from ``path``,
    default :func:`records_file`); returns how many entries were filled (0 if none match, or with
    ``KIMI_LINEAR_TRITON_TUNING=0``)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return 0
    path = records_file() if path is None else path
    key = machine_key()
    records = read(path).get(key, {}) if key else {}
    if not records:
        return 0
    filled = 0
    for name, tuner in autotuners().items():
        for tuning_key, wanted in records.get(name, []):
            tuning_key = _tuple_key(tuning_key)
            if tuning_key in tuner.cache:
                continue
            match = next((c for c in tuner.configs if _config_record(c) == wanted), None)
            if match is not None:  # a candidate of this very kernel: nothing else is ever used
                tuner.cache[tuning_key] = match
                filled += 1
    return filled


def dump(path: Path) -> int:
    """Add this process's autotuning choices (for this GPU and these versions) to the records in ``path``,
    written atomically; returns the number of entries recorded."""
    key = machine_key()
    if key is None:
        raise RuntimeError("recording Triton autotuning results needs a CUDA GPU and fla")
    records = read(path)
    mine = records.setdefault(key, {})
    count = 0
    for name, tuner in autotuners().items():
        entries = {json.dumps(k): v for k, v in mine.get(name, [])}
        for tuning_key, config in tuner.cache.items():
            entries[json.dumps(_json_key(tuning_key))] = _config_record(config)
            count += 1
        if entries:
            mine[name] = [[json.loads(k), v] for k, v in sorted(entries.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(handle, "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return count
