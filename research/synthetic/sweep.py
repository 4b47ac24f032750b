"""Launch a grid of synthetic-task runs on several GPUs in parallel, within a total time budget.

Example (4 GPUs, 6 runs at a time on each, 8 minutes in all)::

    python -m research.synthetic.sweep --out runs/synthetic --tasks mqar palindrome stack \\
        --seq-lens 1024 2048 --gates channel head --lrs 1e-4 5e-4 --gpus 0 1 2 3 --per-gpu 6 \\
        --time-budget 480 --plot -- --batch-size 32 --eval-every 100

Every run is one ``python -m research.synthetic.train`` process pinned to one GPU with ``CUDA_VISIBLE_DEVICES``
(several per GPU allowed), logging to ``OUT/<run>/train.log``. Each run gets ``--time-budget`` = the time left
until the sweep's deadline, so all of them stop on their own (recording how many steps they did); a run still
alive ``--grace`` seconds after the deadline is terminated. Runs that already have ``final.json`` are skipped
(so a sweep can be resumed) unless ``--overwrite``. Arguments after ``--`` go to every run.

Before the grid, ``--warmup`` (default on for GPUs) runs one 3-step job per sequence length, so that Triton
compilation and FLA autotuning happen once and are cached on disk instead of in every parallel run at once.

Writes ``OUT/sweep.json`` (plan, per-run status, return codes, timings) and, with ``--plot``, the plots and tables
of :mod:`research.synthetic.plot`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any, Sequence

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS = ("mqar", "palindrome", "stack")
GATES = ("channel", "head")


@dataclass
class Run:
    """One training job of the grid and what became of it."""

    name: str
    args: list[str]
    seq_len: int
    status: str = "queued"  # queued, running, done, failed, killed, skipped, finished-before
    slot: str | None = None
    returncode: int | None = None
    started_s: float | None = None
    ended_s: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    log: IO[str] | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """The JSON-able fields (not the process handles)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("proc", "log")}


def lr_name(lr: float) -> str:
    """``5e-4`` -> ``"5e-04"``: a compact, sortable, filesystem-safe spelling."""
    return f"{lr:.0e}"


def plan_runs(tasks: Sequence[str], seq_lens: Sequence[int], gates: Sequence[str], lrs: Sequence[float],
              seeds: Sequence[int], steps: int, out: Path, extra: Sequence[str]) -> list[Run]:
    """The grid, longest sequences first (they take longest), one :class:`Run` per combination."""
    runs = []
    for seq_len, task, lr, gate, seed in itertools.product(sorted(seq_lens, reverse=True), tasks, lrs, gates, seeds):
        name = f"{task}_L{seq_len}_{gate}_lr{lr_name(lr)}" + (f"_s{seed}" if len(seeds) > 1 else "")
        args = ["--task", task, "--seq-len", str(seq_len), "--gate", gate, "--lr", repr(lr), "--steps", str(steps),
                "--seed", str(seed), "--out", str(out / name), *extra]
        runs.append(Run(name=name, args=args, seq_len=seq_len))
    return runs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m research.synthetic.sweep",
        description="Run a grid of research.synthetic.train jobs on several GPUs (CUDA_VISIBLE_DEVICES per process, "
        "several per GPU) within a total time budget. Arguments after -- are passed to every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="sweep directory (one sub-directory per run)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048])
    parser.add_argument("--gates", nargs="+", default=list(GATES), choices=GATES)
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=20000, help="maximum steps per run (the budget usually ends "
                        "runs first; each records the steps it did)")
    parser.add_argument("--gpus", nargs="+", default=["0"],
                        help="GPU indices for CUDA_VISIBLE_DEVICES, or 'cpu' to run on the CPU (testing)")
    parser.add_argument("--per-gpu", type=int, default=1, help="runs at a time on each GPU")
    parser.add_argument("--time-budget", type=float, required=True, help="seconds for the whole sweep")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds after the deadline before killing a run")
    parser.add_argument("--min-run-seconds", type=float, default=60.0,
                        help="do not start a run with less time than this left (it is recorded as skipped)")
    parser.add_argument("--startup-seconds", type=float, default=10.0,
                        help="subtracted from each run's budget for process start-up before its clock begins")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="one short job per sequence length first, to fill the kernel caches (default: on GPUs)")
    parser.add_argument("--overwrite", action="store_true", help="rerun runs that already have final.json")
    parser.add_argument("--plot", action="store_true", help="write plots and tables into --out when done")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    args.extra = extra
    if args.per_gpu < 1:
        parser.error(f"--per-gpu must be >= 1, got {args.per_gpu}")
    if args.time_budget <= 0:
        parser.error(f"--time-budget must be positive, got {args.time_budget}")
    if args.steps <= 0:
        parser.error(f"--steps must be positive, got {args.steps}")
    if "cpu" in args.gpus and len(args.gpus) > 1:
        parser.error("--gpus: 'cpu' cannot be mixed with GPU indices")
    reserved = {"--task", "--seq-len", "--gate", "--lr", "--steps", "--seed", "--out", "--time-budget"}
    clash = sorted(reserved & set(extra))
    if clash:
        parser.error(f"arguments after -- may not set {clash}: the sweep sets them")
    if args.warmup is None:
        args.warmup = args.gpus != ["cpu"]
    return args


def _child_env(slot_gpu: str, total_slots: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(total_slots, 1)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if slot_gpu == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env["CUDA_VISIBLE_DEVICES"] = slot_gpu
    return env


def _launch(run: Run, gpu: str, budget: float, total_slots: int, t0: float) -> None:
    out_dir = Path(run.args[run.args.index("--out") + 1])
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "research.synthetic.train", *run.args, "--time-budget", f"{budget:.1f}",
            "--overwrite", "--quiet"]
    if gpu == "cpu":
        args += ["--device", "cpu"]
    run.log = open(out_dir / "train.log", "w")  # noqa: SIM115 - closed in _reap when the process ends
    run.proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_child_env(gpu, total_slots), stdout=run.log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    run.status, run.started_s = "running", round(time.monotonic() - t0, 1)


def _reap(run: Run, t0: float) -> bool:
    """Update a running job; True when it has ended."""
    code = run.proc.poll()
    if code is None:
        return False
    run.log.close()
    run.returncode = code
    if run.status == "running":
        run.status = "done" if code == 0 else "failed"
    run.ended_s = round(time.monotonic() - t0, 1)
    run.proc = run.log = None
    return True


def _stop(run: Run) -> None:
    """Terminate a job we started (its process group: the trainer and its data-loader workers)."""
    run.status = "killed"
    try:
        os.killpg(run.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def execute(runs: list[Run], gpus: list[str], per_gpu: int, deadline_s: float, grace: float, min_run_s: float,
            startup_s: float, t0: float, desc: str = "runs") -> None:
    """Run ``runs`` on ``per_gpu`` slots of each GPU until done or out of time (``deadline_s`` after ``t0``)."""
    total_slots = len(gpus) * per_gpu
    busy: dict[str, int] = {g: 0 for g in gpus}
    queue = [r for r in runs if r.status == "queued"]
    running: list[Run] = []
    killed_at: dict[str, float] = {}
    with tqdm(total=len(queue), desc=desc, unit="run") as bar:
        while queue or running:
            now = time.monotonic() - t0
            for run in list(running):
                if _reap(run, t0):
                    running.remove(run)
                    busy[run.slot] -= 1
                    bar.update(1)
                    tqdm.write(f"[sweep] {run.name}: {run.status} (rc={run.returncode}) at {run.ended_s:.0f}s")
                elif now > deadline_s + grace and run.name not in killed_at:
                    _stop(run)
                    killed_at[run.name] = now
                elif run.name in killed_at and now > killed_at[run.name] + 10:
                    try:
                        os.killpg(run.proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            while queue:
                gpu = min(gpus, key=lambda g: busy[g])
                if busy[gpu] >= per_gpu:
                    break
                left = deadline_s - (time.monotonic() - t0) - startup_s
                run = queue.pop(0)
                if left < min_run_s:
                    run.status = "skipped"
                    bar.update(1)
                    tqdm.write(f"[sweep] {run.name}: skipped, {left:.0f}s left")
                    continue
                run.slot = gpu
                busy[gpu] += 1
                _launch(run, gpu, left, total_slots, t0)
                running.append(run)
                tqdm.write(f"[sweep] {run.name}: started on {'CPU' if gpu == 'cpu' else 'GPU ' + gpu} "
                           f"with {left:.0f}s")
            time.sleep(0.5)


def write_summary(path: Path, args: argparse.Namespace, runs: list[Run], warmups: list[Run], t0: float) -> None:
    summary = {
        "argv": sys.argv[1:],
        "time_budget_s": args.time_budget,
        "wall_s": round(time.monotonic() - t0, 1),
        "gpus": args.gpus,
        "per_gpu": args.per_gpu,
        "extra_train_args": args.extra,
        "warmup": [r.record() for r in warmups],
        "runs": [r.record() for r in runs],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> list[Run]:
    """Run the sweep; returns the runs with their final status."""
    args = parse_args(argv)
    t0 = time.monotonic()
    runs = plan_runs(args.tasks, args.seq_lens, args.gates, args.lrs, args.seeds, args.steps, args.out, args.extra)
    for run in runs:
        if (args.out / run.name / "final.json").exists() and not args.overwrite:
            run.status = "finished-before"
    todo = [r for r in runs if r.status == "queued"]
    print(f"[sweep] {len(runs)} runs ({len(todo)} to do) on {args.gpus} x {args.per_gpu}, "
          f"budget {args.time_budget:.0f}s", file=sys.stderr)
    if args.dry_run:
        for run in runs:
            print(f"{run.status:16s} {run.name}: python -m research.synthetic.train {' '.join(run.args)}")
        return runs
    args.out.mkdir(parents=True, exist_ok=True)

    warmups: list[Run] = []
    if args.warmup and todo:
        lengths = sorted({r.seq_len for r in todo}, reverse=True)
        sample = todo[0].args
        for i, seq_len in enumerate(lengths):
            warm_args = list(sample)
            warm_args[warm_args.index("--seq-len") + 1] = str(seq_len)
            warm_args[warm_args.index("--steps") + 1] = "3"
            warm_args[warm_args.index("--out") + 1] = str(args.out / "_warmup" / f"L{seq_len}")
            warm_args += ["--eval-every", "3"]
            warmups.append(Run(name=f"_warmup_L{seq_len}", args=warm_args, seq_len=seq_len))
        execute(warmups, args.gpus, 1, args.time_budget / 3, 0.0, 0.0, 0.0, t0, desc="warm-up")

    execute(runs, args.gpus, args.per_gpu, args.time_budget, args.grace, args.min_run_seconds,
            args.startup_seconds, t0)
    write_summary(args.out / "sweep.json", args, runs, warmups, t0)
    if args.plot:
        from .plot import main as plot_main

        plot_main([str(args.out), "--out", str(args.out)])
    counts = {s: sum(r.status == s for r in runs) for s in sorted({r.status for r in runs})}
    print(f"[sweep] finished in {time.monotonic() - t0:.0f}s: {counts}", file=sys.stderr)
    return runs


if __name__ == "__main__":
    main()
