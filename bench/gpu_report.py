"""What the GPU scripts in bench/ share: the device-and-versions header and writing a result as .md and .json."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def versions_header(extra: str, device: str | None = None) -> str:
    """``device: ...; torch ..., transformers ..., fla ...; <date>; <extra>`` for a result table (``device``: the
    device's name, by default the first GPU's)."""
    import transformers

    try:
        import fla

        fla_version = fla.__version__
    except ImportError:
        fla_version = "not installed"
    return (f"device: {device or torch.cuda.get_device_name(0)}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, fla {fla_version}; {datetime.date.today()}; {extra}")


def save_report(out: str | Path, stem: str, text: str, header: str, rows: list[dict]) -> None:
    """Print ``text`` and write it to ``out/stem.md``, the header and rows to ``out/stem.json``."""
    print(text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))


def markdown_table(head: str, columns: list[str], cells: list[list]) -> str:
    """``head``, a blank line and a markdown table of ``columns`` with one row per entry of ``cells``."""
    lines = [head, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in cells])


def pdl_settings(text: str) -> list[bool]:
    """``--pdl`` values: a comma-separated list of ``off`` / ``on`` -> [False, True, ...]."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("off", "on") for v in values):
        raise ValueError(f"--pdl takes a comma-separated list of 'off' and 'on', got {text!r}")
    return [v == "on" for v in values]


@contextlib.contextmanager
def pdl_env(on: bool) -> Iterator[None]:
    """Run the block with ``KIMI_LINEAR_PDL`` set to launch this package's Triton decode kernels with programmatic
    dependent launch or without (``modeling_kimi_linear/pdl.py``), the environment restored after. CUDA graphs
    captured inside keep that setting."""
    before = os.environ.get("KIMI_LINEAR_PDL")
    os.environ["KIMI_LINEAR_PDL"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KIMI_LINEAR_PDL", None)
        else:
            os.environ["KIMI_LINEAR_PDL"] = before


@contextlib.contextmanager
def programmatic_dependent_launch(model: torch.nn.Module, on: bool) -> Iterator[None]:
    """:func:`pdl_env` for ``model``, its captured CUDA graphs dropped on the way in and out (they keep the launches
    they recorded)."""
    def drop_graphs() -> None:
        decoder = model.__dict__.get("_graph_decoder")
        if decoder is not None:
            decoder.reset()

    drop_graphs()
    try:
        with pdl_env(on):
            yield
    finally:
        drop_graphs()
