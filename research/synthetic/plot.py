"""Accuracy-vs-steps plots and markdown tables from synthetic-task runs.

Example::

    python -m research.synthetic.plot runs/synthetic --out runs/synthetic

Every directory below the given ones that holds a ``run.json`` (written by :mod:`research.synthetic.train`) and
a ``metrics.jsonl`` is one run (``_warmup`` directories are ignored); unfinished runs (no ``final.json``) are
included and marked. Writes, into ``--out``:

* ``accuracy_vs_steps.png``: one panel per (task, length), one curve per (gate, learning rate);
* ``accuracy_<task>_L<length>.png``: the same panels one by one;
* ``results.md``: the best accuracy over learning rates per task, length and gate (the paper's protocol: the
  best curve of the learning-rate grid), then every run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

GATE_LABEL = {"channel": "KDA (per-channel gate)", "head": "GDN (per-head gate)"}
GATE_COLOR = {"channel": "tab:red", "head": "tab:blue"}
TASK_ORDER = ("mqar", "palindrome", "stack")
LINESTYLES = ("-", "--", ":", "-.")


def load_runs(roots: Sequence[Path]) -> list[dict[str, Any]]:
    """Every run below ``roots``: its ``run.json`` / ``final.json`` record plus ``rows`` (the metrics lines)."""
    runs = []
    seen = set()
    for root in roots:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run directory")
        for run_json in sorted(root.rglob("run.json")):
            folder = run_json.parent
            if "_warmup" in folder.parts or folder.resolve() in seen:
                continue
            seen.add(folder.resolve())
            metrics = folder / "metrics.jsonl"
            if not metrics.is_file():
                continue
            final = folder / "final.json"
            try:
                record = json.loads((final if final.is_file() else run_json).read_text())
                rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise ValueError(f"{folder}: unreadable run record ({err})") from err
            if not rows:
                continue
            record["rows"] = rows
            record["finished"] = final.is_file()
            record["dir"] = str(folder)
            runs.append(record)
    return runs


def _key(run: dict[str, Any]) -> tuple[str, int]:
    return run["task"]["task"], run["task"]["seq_len"]


def _sorted_groups(runs: list[dict[str, Any]]) -> list[tuple[tuple[str, int], list[dict[str, Any]]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[_key(run)].append(run)
    order = lambda k: (TASK_ORDER.index(k[0]) if k[0] in TASK_ORDER else len(TASK_ORDER), k[0], k[1])  # noqa: E731
    return [(k, sorted(groups[k], key=lambda r: (r["gate"], r["lr"]))) for k in sorted(groups, key=order)]


def _best(run: dict[str, Any]) -> dict[str, Any]:
    row = max(run["rows"], key=lambda r: (r["accuracy"], -r["step"]))
    return {"accuracy": row["accuracy"], "step": row["step"],
            "seq_accuracy": max(r["seq_accuracy"] for r in run["rows"])}


def _draw(ax, task: str, seq_len: int, members: list[dict[str, Any]]) -> None:  # noqa: ANN001
    lrs = sorted({r["lr"] for r in members})
    for run in members:
        steps = [r["step"] for r in run["rows"]]
        acc = [100 * r["accuracy"] for r in run["rows"]]
        style = LINESTYLES[lrs.index(run["lr"]) % len(LINESTYLES)]
        label = f"{GATE_LABEL.get(run['gate'], run['gate'])}, lr {run['lr']:g}" + ("" if run["finished"] else " *")
        ax.plot(steps, acc, style, color=GATE_COLOR.get(run["gate"]), label=label)
    ax.set_title(f"{task} L={seq_len}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:  # noqa: ANN001
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _sorted_groups(runs)
    written = []
    for (task, seq_len), members in groups:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, task, seq_len, members)
        path = out / f"accuracy_{task}_L{seq_len}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    tasks = sorted({k[0] for k, _ in groups}, key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99)
    lengths = sorted({k[1] for k, _ in groups})
    fig, axes = plt.subplots(len(tasks), len(lengths), figsize=(5.5 * len(lengths), 3.8 * len(tasks)),
                             squeeze=False)
    by_key = dict(groups)
    for i, task in enumerate(tasks):
        for j, seq_len in enumerate(lengths):
            if (task, seq_len) in by_key:
                _draw(axes[i][j], task, seq_len, by_key[(task, seq_len)])
            else:
                axes[i][j].set_axis_off()
    fig.tight_layout()
    path = out / "accuracy_vs_steps.png"
    _save(fig, path)
    plt.close(fig)
    written.append(path)
    return written


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def tables(runs: list[dict[str, Any]]) -> str:
    """Markdown: best over learning rates per (task, length, gate), then every run."""
    lines = ["## Best accuracy over the learning-rate grid (answer tokens, %)", "",
             "| task | length | KDA (channel) | lr | steps | GDN (head) | lr | steps | KDA − GDN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (task, seq_len), members in _sorted_groups(runs):
        cells = []
        best_acc = {}
        for gate in ("channel", "head"):
            candidates = [r for r in members if r["gate"] == gate]
            if not candidates:
                cells += ["–", "–", "–"]
                continue
            top = max(candidates, key=lambda r: _best(r)["accuracy"])
            best_acc[gate] = _best(top)["accuracy"]
            cells += [_pct(best_acc[gate]), f"{top['lr']:g}", str(top["rows"][-1]["step"])]
        diff = (f"{100 * (best_acc['channel'] - best_acc['head']):+.1f}" if len(best_acc) == 2 else "–")
        lines.append(f"| {task} | {seq_len} | " + " | ".join(cells) + f" | {diff} |")
    lines += ["", "## All runs", "",
              "| task | length | gate | lr | steps done | stopped by | final acc | best acc (step) | best seq acc "
              "| s / 1000 steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (task, seq_len), members in _sorted_groups(runs):
        for run in members:
            best = _best(run)
            stopped = run.get("stopped_by", "unfinished") if run["finished"] else "unfinished"
            per_k = run.get("seconds_per_1000_steps")
            lines.append(
                f"| {task} | {seq_len} | {run['gate']} | {run['lr']:g} | {run['rows'][-1]['step']} | {stopped} | "
                f"{_pct(run['rows'][-1]['accuracy'])} | {_pct(best['accuracy'])} ({best['step']}) | "
                f"{_pct(best['seq_accuracy'])} | {'–' if per_k is None else f'{per_k:.0f}'} |"
            )
    envs = {json.dumps(r.get("environment", {}).get("versions", {}), sort_keys=True) for r in runs}
    devices = sorted({r.get("environment", {}).get("gpu") or r.get("environment", {}).get("device", "?")
                      for r in runs})
    lines += ["", f"Devices: {', '.join(devices)}."]
    for env in sorted(envs):
        lines.append(f"Versions: {env}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m research.synthetic.plot",
        description="Accuracy-vs-steps PNGs and a markdown results table from research.synthetic.train runs.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders containing them")
    parser.add_argument("--out", type=Path, required=True, help="where to write the PNGs and results.md")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    if not runs:
        parser.error(f"no runs (run.json + metrics.jsonl) found under {[str(r) for r in args.runs]}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = plot(runs, args.out)
    md = args.out / "results.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(tables(runs))
    os.replace(tmp, md)
    written.append(md)
    print(f"[plot] {len(runs)} runs -> {', '.join(str(p) for p in written)}")
    return written


if __name__ == "__main__":
    main()
