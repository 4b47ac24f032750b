"""Configuration presets shipped in the repository's ``configuration/`` folder (released 48B-A3B, small, tiny)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .configuration_kimi_linear import KimiLinearConfig


def preset_dirs() -> list[Path]:
    """Where presets are looked up: ``$KIMI_LINEAR_CONFIGS``, the source tree, then the installed data files."""
    dirs = []
    if os.environ.get("KIMI_LINEAR_CONFIGS"):
        dirs.append(Path(os.environ["KIMI_LINEAR_CONFIGS"]))
    dirs.append(Path(__file__).resolve().parent.parent / "configuration")
    dirs.append(Path(sys.prefix) / "share" / "kimi-linear" / "configuration")
    return dirs


def available_presets() -> list[str]:
    """Names of the presets that can be loaded."""
    return sorted({p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.json")})


def preset_path(name: str) -> Path:
    """Path of preset ``name`` (``"tiny"``, ``"small"``, ``"kimi_linear_48b_a3b"``)."""
    for d in preset_dirs():
        path = d / f"{name}.json"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no configuration preset {name!r}; available: {available_presets()}")


def load_preset(name: str, **overrides: Any) -> KimiLinearConfig:
    """Build a :class:`KimiLinearConfig` from a preset, with keyword overrides."""
    config_dict = KimiLinearConfig._dict_from_json_file(preset_path(name))
    config_dict.update(overrides)
    return KimiLinearConfig(**config_dict)
