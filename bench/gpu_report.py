"""What the GPU scripts in bench/ share: the device-and-versions header and writing a result as .md and .json."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch


def versions_header(extra: str, device: str | None = None) -> str:
    """``device: ...; torch ..., transformers ..., fla ...; <date>; <extra>`` for a result table (``device``: the
    device's name, by default the first GPU's), noting ``KIMI_LINEAR_PDL=1`` where it turned programmatic dependent
    launch on (``modeling_kimi_linear/pdl.py``)."""
    import os

    import transformers

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    return (f"device: {device or torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, fla {fla_version}; {datetime.date.today()}; {extra}"
            + ("; KIMI_LINEAR_PDL=1" if os.environ.get("KIMI_LINEAR_PDL") == "1" else ""))


def save_report(out: str | Path, stem: str, text: str, header: str, rows: list[dict]) -> None:
    """Print ``text`` and write it to ``out/stem.md``, the header and rows to ``out/stem.json``."""
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
