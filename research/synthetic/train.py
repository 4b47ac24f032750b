"""Train the package's model on one synthetic task (MQAR, Palindrome, Stack) with ``transformers.Trainer``.

Example (one GPU; CPU works too, slowly)::

    python -m research.synthetic.train --task mqar --seq-len 1024 --gate channel --lr 5e-4 \\
        --steps 20000 --time-budget 420 --out runs/synthetic/mqar_L1024_channel_lr5e-4

The model is the paper's synthetic-task size by default: 2 KDA layers (no MLA), 2 heads of dimension 128
(hidden size 256), a dense SwiGLU MLP of width 512 in each block, untied embeddings. ``--gate head`` swaps KDA's
per-channel forget gate for Gated DeltaNet's per-head scalar gate (``kda_gate_granularity="head"``).

Training data are generated on the fly from a seeded stream; the loss is the cross-entropy on answer tokens only.
Every ``--eval-every`` steps (and at step 0 and at the end) the model is scored on a fixed held-out set (the same
for every run with the same task knobs and ``--eval-seed``). Outputs in ``--out``:

* ``run.json``: arguments, resolved task knobs, model configuration, parameter counts, device and versions;
* ``metrics.jsonl``: one line per evaluation: ``step``, ``loss`` (mean training loss since the previous line),
  ``eval_loss``, ``accuracy`` (per answer token), ``seq_accuracy`` (all answers of a sequence right), ``lr``,
  ``elapsed_s``;
* ``final.json``: ``run.json`` plus ``steps_done``, ``stopped_by`` (``"max_steps"`` or ``"time_budget"``), the
  last and best accuracies, timings.

``--time-budget`` stops training early (keeping time for the final evaluation) so that a sweep ends on time; the
number of steps actually done is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from modeling_kimi_linear import KimiLinearForCausalLM
from modeling_kimi_linear.configuration_kimi_linear import KDA, KDA_GATE_GRANULARITIES, KimiLinearConfig
from modeling_kimi_linear.kernels import resolve_kda_backend

from .evaluation import answer_loss, autocast, evaluate
from .tasks import FILLERS, PAD, TASKS, TaskSpec, TaskStream

GATE_PARAMS = ("f_a_proj", "f_b_proj", "dt_bias", "A_log")
SCHEDULERS = ("constant_with_warmup", "cosine", "linear")


def build_config(
    vocab_size: int,
    gate: str = "channel",
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 128,
    intermediate_size: int = 512,
    conv_size: int = 4,
    backend: str = "auto",
) -> KimiLinearConfig:
    """An all-KDA :class:`KimiLinearConfig` (no MLA, no MoE: a dense SwiGLU MLP in every block)."""
    return KimiLinearConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        layer_types=[KDA] * num_layers,
        linear_attn_config={"head_dim": head_dim, "num_heads": num_heads, "short_conv_kernel_size": conv_size},
        num_experts=None,
        kda_gate_granularity=gate,
        kda_backend=backend,
        pad_token_id=PAD,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        use_cache=False,
    )


def parameter_counts(model: KimiLinearForCausalLM) -> dict[str, int]:
    """Total parameters, those of the forget-gate path (all layers), and those of the embeddings + LM head."""
    total = sum(p.numel() for p in model.parameters())
    gate = sum(p.numel() for name, p in model.named_parameters() if any(f".{g}." in f".{name}." for g in GATE_PARAMS))
    embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    return {"total": total, "forget_gate": gate, "embeddings_and_head": embed}


def environment(device: torch.device, backend: str) -> dict[str, Any]:
    """Device, kernel backend and library versions, for the run record."""
    versions = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "fla-core", "triton"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    info: dict[str, Any] = {"device": str(device), "kda_kernels": resolve_kda_backend(backend, device),
                            "versions": versions}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite a JSON-lines file atomically (a few hundred short lines at most)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


class AnswerTrainer(Trainer):
    """``Trainer`` whose loss is the answer-token cross-entropy under optional bf16 autocast, without weight decay
    on ``A_log`` / ``dt_bias`` (nor on norms and biases, as ``Trainer`` already does)."""

    def __init__(self, *args: Any, bf16_autocast: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bf16_autocast = bf16_autocast
        self._loss_sum: torch.Tensor | None = None
        self._loss_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        inner = self.accelerator.unwrap_model(model)
        ids, labels = inputs["input_ids"], inputs["labels"]
        with autocast(ids.device, self.bf16_autocast):
            loss = answer_loss(inner, ids, labels)
        if model.training:
            detached = loss.detach().float()
            self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
            self._loss_steps += 1
        return (loss, None) if return_outputs else loss

    def pop_train_loss(self) -> float | None:
        """Mean training loss since the last call (``None`` before any step)."""
        if not self._loss_steps:
            return None
        value = float(self._loss_sum) / self._loss_steps
        self._loss_sum, self._loss_steps = None, 0
        return value

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if not n.endswith(("A_log", "dt_bias"))]


class Recorder(TrainerCallback):
    """Evaluates on the held-out set at step 0, every ``every`` steps and at the end; writes ``metrics.jsonl``;
    stops training when the time budget (counted from ``start``) would otherwise be exceeded."""

    def __init__(self, trainer: AnswerTrainer, eval_batch: dict[str, torch.Tensor], every: int,
                 eval_batch_size: int, out_dir: Path, budget_s: float | None, start: float) -> None:
        self.trainer = trainer
        self.eval_batch = eval_batch
        self.every = every
        self.eval_batch_size = eval_batch_size
        self.path = out_dir / "metrics.jsonl"
        self.budget_s = budget_s
        self.start = start
        self.rows: list[dict[str, Any]] = []
        self.stopped_by = "max_steps"
        self.eval_seconds = 0.0  # evaluation time after training began
        self.last_eval_s = 0.0
        self.train_start: float | None = None
        self.step_s: float | None = None  # moving average of the step time (without evaluations)
        self._step_began = 0.0

    def record(self, step: int, model: torch.nn.Module) -> None:
        began = time.monotonic()
        metrics = evaluate(model, self.eval_batch, self.eval_batch_size, self.trainer.bf16_autocast)
        self.last_eval_s = time.monotonic() - began
        if self.train_start is not None:
            self.eval_seconds += self.last_eval_s
        scheduler = self.trainer.lr_scheduler
        row = {
            "step": step,
            "loss": self.trainer.pop_train_loss(),
            **metrics,
            "lr": scheduler.get_last_lr()[0] if scheduler is not None else None,
            "elapsed_s": round(time.monotonic() - self.start, 2),
        }
        self.rows.append(row)
        write_jsonl(self.path, self.rows)
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        print(f"[synthetic] step {step}: train loss {loss}, eval loss {row['eval_loss']:.4f}, "
              f"accuracy {row['accuracy']:.4f}, seq accuracy {row['seq_accuracy']:.4f}", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.record(state.global_step, model)
        self.train_start = self._step_began = time.monotonic()

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        took = time.monotonic() - self._step_began
        # a moving average, so that the first steps (kernel compilation on a GPU) soon stop counting
        self.step_s = took if self.step_s is None else 0.9 * self.step_s + 0.1 * took
        if state.global_step % self.every == 0:
            self.record(state.global_step, model)
        self._step_began = time.monotonic()
        if self.budget_s is not None and not control.should_training_stop:
            reserve = 1.5 * self.last_eval_s + 2.0 * self.step_s + 2.0
            if time.monotonic() - self.start + reserve >= self.budget_s:
                control.should_training_stop = True
                self.stopped_by = "time_budget"
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.rows[-1]["step"] != state.global_step:
            self.record(state.global_step, model)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m research.synthetic.train",
        description="Train the Kimi Linear model (all-KDA) on MQAR, Palindrome or Stack; per-channel (KDA) or "
        "per-head (Gated DeltaNet) forget gate. Writes run.json, metrics.jsonl and final.json to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--task", required=True, choices=TASKS)
    run.add_argument("--seq-len", type=int, required=True, help="tokens per example (the paper's training length)")
    run.add_argument("--gate", default="channel", choices=KDA_GATE_GRANULARITIES,
                     help="channel = KDA (released); head = Gated DeltaNet's per-head scalar gate")
    run.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (paper grid: 5e-5 1e-4 5e-4 1e-3)")
    run.add_argument("--steps", type=int, default=20000, help="maximum optimizer steps (the paper: up to 20000)")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--overwrite", action="store_true", help="replace the results of a finished run in --out")
    run.add_argument("--time-budget", type=float, default=None,
                     help="seconds from start after which training stops (leaving time for the final evaluation)")
    run.add_argument("--seed", type=int, default=0, help="model initialisation and training-data seed")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=32)
    opt.add_argument("--warmup-steps", type=int, default=100)
    opt.add_argument("--lr-scheduler", default="constant_with_warmup", choices=SCHEDULERS,
                     help="constant after warmup suits runs cut short by --time-budget")
    opt.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (not on norms, A_log, dt_bias)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0)

    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    ev.add_argument("--eval-size", type=int, default=256, help="sequences in the fixed held-out set")
    ev.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    ev.add_argument("--eval-seed", type=int, default=1234, help="seed of the held-out set (same for all runs)")

    task = parser.add_argument_group("task knobs (defaults: README.md)")
    task.add_argument("--vocab-size", type=int, default=8192)
    task.add_argument("--num-stacks", type=int, default=64, help="Stack: independent stacks (ids reserved always)")
    task.add_argument("--num-pairs", type=int, default=None, help="MQAR key-value pairs (default seq_len // 8)")
    task.add_argument("--num-queries", type=int, default=None, help="MQAR queries (default num_pairs)")
    task.add_argument("--filler", default="random", choices=FILLERS, help="MQAR filler between queries")
    task.add_argument("--palindrome-len", type=int, default=None, help="default (seq_len - 1) // 2")
    task.add_argument("--pop-prob", type=float, default=0.5, help="Stack: probability that an operation pops")

    model = parser.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=2)
    model.add_argument("--num-heads", type=int, default=2)
    model.add_argument("--head-dim", type=int, default=128)
    model.add_argument("--intermediate-size", type=int, default=512, help="dense SwiGLU MLP width")
    model.add_argument("--conv-size", type=int, default=4, help="short convolution width")

    dev = parser.add_argument_group("device")
    dev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    dev.add_argument("--backend", default="auto", choices=("auto", "torch", "fla"),
                     help="KDA kernels: auto = FLA on CUDA when it imports")
    dev.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                     help="auto = bf16 autocast on CUDA, fp32 on CPU")
    dev.add_argument("--workers", type=int, default=None, help="data-loader workers (default 2 on CUDA, 0 on CPU)")
    dev.add_argument("--cpu-threads", type=int, default=None,
                     help="torch intra-op threads for this run (default: torch's); 1 is fastest for tiny CPU models "
                     "on a busy machine")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    for name in ("seq_len", "steps", "batch_size", "eval_every", "eval_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.cpu_threads is not None and args.cpu_threads <= 0:
        parser.error(f"--cpu-threads must be positive, got {args.cpu_threads}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be positive, got {args.time_budget}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = torch.device("cuda" if use_cuda else "cpu")
    if args.backend == "fla" and not use_cuda:
        parser.error("--backend fla needs CUDA (FLA's kernels are Triton GPU kernels)")
    if args.precision == "bf16" and not use_cuda:
        parser.error("--precision bf16 needs CUDA (bf16 autocast is only used on the GPU)")
    args.spec = TaskSpec(
        task=args.task, seq_len=args.seq_len, vocab_size=args.vocab_size, num_stacks=args.num_stacks,
        num_pairs=args.num_pairs, num_queries=args.num_queries, filler=args.filler,
        palindrome_len=args.palindrome_len, pop_prob=args.pop_prob,
    )
    try:
        args.spec = args.spec.resolved()
    except ValueError as err:
        parser.error(f"task knobs: {err}")
    final = args.out / "final.json"
    if final.exists() and not args.overwrite:
        parser.error(f"{final} exists (a finished run); pass --overwrite or choose another --out")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run one training job; returns what it writes to ``final.json``."""
    start = time.monotonic()
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    try:
        return _run(args, start)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, start: float) -> dict[str, Any]:
    device = args.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("final.json", "metrics.jsonl"):
        (args.out / stale).unlink(missing_ok=True)

    set_seed(args.seed)
    config = build_config(
        args.spec.vocab_size, args.gate, args.hidden_size, args.num_layers, args.num_heads, args.head_dim,
        args.intermediate_size, args.conv_size, args.backend,
    )
    model = KimiLinearForCausalLM(config).to(device)
    record: dict[str, Any] = {
        "task": args.spec.to_dict(),
        "gate": args.gate,
        "lr": args.lr,
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup_steps,
        "lr_scheduler": args.lr_scheduler,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "seed": args.seed,
        "eval": {"every": args.eval_every, "size": args.eval_size, "seed": args.eval_seed},
        "time_budget_s": args.time_budget,
        "precision": "bf16-autocast" if bf16 else "fp32",
        "model": {
            "hidden_size": args.hidden_size, "num_layers": args.num_layers, "num_heads": args.num_heads,
            "head_dim": args.head_dim, "intermediate_size": args.intermediate_size, "conv_size": args.conv_size,
            "parameters": parameter_counts(model), "config": config.to_dict(),
        },
        "environment": environment(device, args.backend),
        "argv": args.argv,
    }
    write_json(args.out / "run.json", record)

    eval_batch = args.spec.batch(args.eval_size, args.eval_seed)
    training_args = TrainingArguments(
        output_dir=str(args.out / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler,
        max_grad_norm=args.max_grad_norm,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=workers,
        dataloader_pin_memory=device.type == "cuda",
        remove_unused_columns=False,
        seed=args.seed,
        disable_tqdm=args.quiet,
    )
    trainer = AnswerTrainer(model=model, args=training_args, train_dataset=TaskStream(args.spec, args.seed),
                            bf16_autocast=bf16)
    recorder = Recorder(trainer, eval_batch, args.eval_every, args.eval_batch_size or args.batch_size, args.out,
                        args.time_budget, start)
    trainer.add_callback(recorder)
    trainer.train()

    rows = recorder.rows
    best = max(rows, key=lambda r: (r["accuracy"], -r["step"]))
    steps = rows[-1]["step"]
    train_s = time.monotonic() - recorder.train_start - recorder.eval_seconds
    record.update(
        steps_done=steps,
        stopped_by=recorder.stopped_by,
        final={k: rows[-1][k] for k in ("eval_loss", "accuracy", "seq_accuracy")},
        best={"accuracy": best["accuracy"], "seq_accuracy": max(r["seq_accuracy"] for r in rows), "step": best["step"]},
        train_seconds=round(train_s, 2),
        seconds_per_1000_steps=round(1000 * train_s / steps, 2) if steps else None,
        eval_seconds=round(recorder.eval_seconds, 2),
        wall_seconds=round(time.monotonic() - start, 2),
    )
    write_json(args.out / "final.json", record)
    try:  # Trainer creates its output_dir; nothing is saved there
        (args.out / "trainer").rmdir()
    except OSError:
        pass
    print(f"[synthetic] done: {steps} steps ({recorder.stopped_by}), final accuracy {record['final']['accuracy']:.4f}, "
          f"best {record['best']['accuracy']:.4f} at step {record['best']['step']}", file=sys.stderr, flush=True)
    return record


if __name__ == "__main__":
    main()
