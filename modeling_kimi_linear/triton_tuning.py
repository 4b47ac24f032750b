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

The records shipped with the package live in the module ``triton_tuned_configs.py`` next to this one (written
by ``bench/gpu_scale.py --record-tuning`` on the lent GPUs). A module and not a JSON file: transformers copies a
remote-code checkpoint's Python modules (those named by ``from .name import ...`` lines) and nothing else, so a
data file would be missing where ``from_pretrained(..., trust_remote_code=True)`` runs the model. Its records are a
plain literal, read back with ``ast.literal_eval`` when :func:`dump` adds to it.
``KIMI_LINEAR_TRITON_TUNING_FILE`` names another record file (JSON, or such a module), ``KIMI_LINEAR_TRITON_TUNING=0``
switches them off.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

from .atomic_write import write_atomically
from .triton_tuned_configs import RECORDS as SHIPPED

TUNED_FILE = Path(__file__).with_name("triton_tuned_configs.py")
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
    """The records in ``path`` (empty if the file is absent): a JSON file, or a ``.py`` module as :func:`dump`
    writes it (its ``RECORDS = {...}`` literal is evaluated as a literal, never run)."""
    if not path.is_file():
        return {}
    if path.suffix != ".py":
        return json.loads(path.read_text())
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["RECORDS"]:
            return ast.literal_eval(node.value)
    raise ValueError(f"{path} has no `RECORDS = {{...}}` literal")


def _module_text(data: dict) -> str:
    """``data`` (machine -> kernel -> [key, configuration] entries) as a module: one entry a line."""
    lines = ["\"\"\"Autotuning choices of fla's Triton kernels recorded on the lent GPUs, by GPU and versions: written by",
             "``triton_tuning.dump`` (``bench/gpu_scale.py --record-tuning``); read by ``triton_tuning.apply``.\"\"\"", "",
             "RECORDS = {"]
    for machine, kernels in sorted(data.items()):
        lines.append(f"    {machine!r}: {{")
        for kernel, entries in sorted(kernels.items()):
            lines += [f"        {kernel!r}: ["] + [f"            {entry!r}," for entry in entries] + ["        ],"]
        lines.append("    },")
    return "\n".join(lines + ["}", ""])


def records() -> dict:
    """The records :func:`apply` reads: ``$KIMI_LINEAR_TRITON_TUNING_FILE``, else those shipped here."""
    path = os.environ.get(ENV_FILE)
    return read(Path(path)) if path else SHIPPED


def apply(path: Path | None = None) -> int:
    """Fill fla's autotuners' caches with the recorded choices for this GPU and these versions (from ``path``,
    default :func:`records`); returns how many entries were filled (0 if none match, or with
    ``KIMI_LINEAR_TRITON_TUNING=0``)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return 0
    key = machine_key()
    found = (records() if path is None else read(path)).get(key, {}) if key else {}
    if not found:
        return 0
    filled = 0
    for name, tuner in autotuners().items():
        for tuning_key, wanted in found.get(name, []):
            tuning_key = _tuple_key(tuning_key)
            if tuning_key in tuner.cache:
                continue
            match = next((c for c in tuner.configs if _config_record(c) == wanted), None)
            if match is not None:  # a candidate of this very kernel: nothing else is ever used
                tuner.cache[tuning_key] = match
                filled += 1
    return filled


def dump(path: Path) -> int:
    """Add this process's autotuning choices (for this GPU and these versions) to the records in ``path`` (JSON, or
    a module like ``triton_tuned_configs.py`` where ``path`` ends in ``.py``), written atomically; returns the
    number of entries recorded."""
    key = machine_key()
    if key is None:
        raise RuntimeError("recording Triton autotuning results needs a CUDA GPU and fla")
    stored = read(path)
    mine = stored.setdefault(key, {})
    count = 0
    for name, tuner in autotuners().items():
        entries = {json.dumps(k): v for k, v in mine.get(name, [])}
        for tuning_key, config in tuner.cache.items():
            entries[json.dumps(_json_key(tuning_key))] = _config_record(config)
            count += 1
        if entries:
            mine[name] = [[json.loads(k), v] for k, v in sorted(entries.items())]
    text = _module_text(stored) if path.suffix == ".py" else json.dumps(stored, indent=1, sort_keys=True)
    write_atomically(path, text.encode())
    return count
