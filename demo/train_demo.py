"""Reproduce the embedded demo model: corpus, tokenizer, training with ``Trainer``, validation loss.

One command builds everything into a work directory, reusing what is already there::

    python demo/train_demo.py --work runs/demo --layout hybrid --time-budget 360 --out demo/kimi-linear-demo
    python demo/train_demo.py --work runs/demo --layout all-mla --time-budget 360 --out runs/demo/all-mla

Steps (each skipped when its output exists in ``--work``):

1. ``corpus/``: the Python standard library's source (``demo/corpus.py``), train and validation files.
2. ``tokenizer/``: a byte-fallback BPE sentencepiece model trained on the training split, saved as a
   ``KimiSentencePieceTokenizer`` directory.
3. ``tokens.safetensors``: both splits encoded, each file between BOS and EOS.
4. Training from random initialisation (``configuration/demo.json``; ``--layout all-mla`` makes every layer MLA
   at the same width for the comparison run) on random windows of ``--seq-len`` tokens, AdamW, cosine schedule
   over ``--max-steps`` or over the wall-clock ``--time-budget`` (the schedule then follows elapsed time and the
   number of steps done is recorded), bf16 autocast on GPU.
5. Validation loss (mean token cross-entropy over consecutive windows of the held-out files), then the model
   (bf16) and tokenizer are saved to ``--out`` with ``train_metrics.json``: config, weights and tokenizer files,
   without the package modules ``save_pretrained`` copies (``kimi-linear demo --export DIR`` writes that
   self-contained form from the saved files).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import SEPARATOR, build_corpus  # noqa: E402

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import preset_path  # noqa: E402


def build_tokenizer(work: Path, vocab_size: int) -> Path:
    """Train the sentencepiece model on the training split and save a tokenizer directory."""
    from modeling_kimi_linear.tokenization_kimi_sp import KimiSentencePieceTokenizer, train_sentencepiece

    out = work / "tokenizer"
    if (out / "tokenizer_config.json").is_file():
        return out
    tmp = work / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_file = train_sentencepiece([work / "corpus" / "train.txt"], tmp / "spm", vocab_size=vocab_size)
    tokenizer = KimiSentencePieceTokenizer(vocab_file=str(model_file))
    tokenizer.register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(tmp / "saved")
    os.replace(tmp / "saved", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def encode_corpus(work: Path, tokenizer) -> dict[str, torch.Tensor]:
    """Token ids of both splits (int16 when the vocabulary allows, else int32), each document as BOS, its text,
    EOS (the way the tokenizer encodes a prompt: with BOS); cached in ``tokens.safetensors``."""
    from safetensors.torch import load_file, save_file

    path = work / "tokens.safetensors"
    if path.is_file():
        return load_file(path)
    from tqdm.auto import tqdm

    out = {}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for split in ("train", "valid"):
        docs = (work / "corpus" / f"{split}.txt").read_text(encoding="utf-8").split(SEPARATOR)
        ids: list[int] = []
        for doc in tqdm(docs, desc=f"encoding {split}", unit="file", mininterval=5):
            ids += [bos] + tokenizer.encode(doc, add_special_tokens=False) + [eos]
        out[split] = torch.tensor(ids, dtype=torch.int16 if len(tokenizer) <= 2**15 else torch.int32)
    tmp = work / ".tokens.safetensors.tmp"
    save_file(out, str(tmp))
    os.replace(tmp, path)
    return out


class RandomWindows(IterableDataset):
    """Endless random windows of ``seq_len`` tokens from one long token stream (seeded, per worker)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        gen = torch.Generator().manual_seed(self.seed + (info.id if info else 0))
        high = len(self.tokens) - self.seq_len
        while True:
            start = int(torch.randint(0, high, (1,), generator=gen))
            row = self.tokens[start : start + self.seq_len].long()
            yield {"input_ids": row, "labels": row.clone()}


def demo_config(layout: str, tokenizer) -> KimiLinearConfig:
    """The demo preset, with token ids from the tokenizer; ``all-mla`` turns every layer into MLA."""
    data = KimiLinearConfig._dict_from_json_file(preset_path("demo"))
    data.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    if layout == "all-mla":
        n = data["num_hidden_layers"]
        data["linear_attn_config"] = dict(data["linear_attn_config"], full_attn_layers=list(range(1, n + 1)), kda_layers=[])
    elif layout != "hybrid":
        raise ValueError(f"--layout must be 'hybrid' or 'all-mla', got {layout!r}")
    return KimiLinearConfig(**data)


def cosine(progress: float, warmup: float) -> float:
    """Learning-rate factor at ``progress`` in [0, 1]: linear warmup over ``warmup``, then cosine to 10%."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    p = min((progress - warmup) / max(1 - warmup, 1e-9), 1.0)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


@torch.no_grad()
def validation_loss(model: KimiLinearForCausalLM, tokens: torch.Tensor, seq_len: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over consecutive windows of the validation stream."""
    model.eval()
    device = next(model.parameters()).device
    n = (len(tokens) - 1) // seq_len
    windows = tokens[: n * seq_len].long().view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/demo", help="work directory for corpus, tokenizer and token cache")
    parser.add_argument("--out", required=True, help="where the trained checkpoint and tokenizer are saved")
    parser.add_argument("--layout", default="hybrid", choices=["hybrid", "all-mla"])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.05, help="warmup fraction of the schedule")
    parser.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: use --time-budget)")
    parser.add_argument("--time-budget", type=float, default=0.0, help="seconds of training when --max-steps is 0")
    parser.add_argument("--router-aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepare-only", action="store_true", help="build corpus, tokenizer and token cache, then stop")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.prepare_only and args.max_steps <= 0 and args.time_budget <= 0:
        raise SystemExit("train_demo: give --max-steps or --time-budget")
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    work = Path(args.work)
    if not (work / "corpus" / "manifest.json").is_file():
        build_corpus(work / "corpus")
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(work, args.vocab_size), trust_remote_code=True)
    tokens = encode_corpus(work, tokenizer)
    print(f"corpus: {len(tokens['train']):,} training tokens, {len(tokens['valid']):,} validation tokens", flush=True)
    if args.prepare_only:
        return 0

    torch.manual_seed(args.seed)
    config = demo_config(args.layout, tokenizer)
    config.router_aux_loss_coef = args.router_aux_loss_coef
    config.output_router_logits = args.router_aux_loss_coef > 0
    model = KimiLinearForCausalLM(config)
    cuda = torch.cuda.is_available()
    started = [0.0]

    def progress(step: int) -> float:
        if args.max_steps > 0:
            return step / args.max_steps
        return (time.perf_counter() - started[0]) / args.time_budget if started[0] else 0.0

    class StopOnTime(TrainerCallback):
        """The wall-clock schedule starts after the first steps, so kernel compilation does not eat into it."""

        def on_step_end(self, _args, state, control, **__):
            if state.global_step == 5:
                started[0] = time.perf_counter()
            if args.max_steps <= 0 and started[0] and time.perf_counter() - started[0] >= args.time_budget:
                control.should_training_stop = True

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine(progress(step), args.warmup))
    training_args = TrainingArguments(
        output_dir=str(work / f"trainer-{args.layout}"), max_steps=args.max_steps if args.max_steps > 0 else 10**9,
        per_device_train_batch_size=args.batch_size, bf16=cuda, use_cpu=not cuda, logging_steps=25, report_to=[],
        save_strategy="no", max_grad_norm=1.0, dataloader_num_workers=2 if cuda else 0, seed=args.seed,
        disable_tqdm=not sys.stderr.isatty(),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomWindows(tokens["train"], args.seq_len, args.seed),
                      optimizers=(optimizer, scheduler), callbacks=[StopOnTime()])
    result = trainer.train()
    val = validation_loss(model, tokens["valid"], args.seq_len, args.batch_size)
    steps = trainer.state.global_step
    metrics = {
        "layout": args.layout, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps,
        "train_tokens": steps * args.batch_size * args.seq_len, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "lr": args.lr, "train_runtime_s": result.metrics.get("train_runtime"), "final_train_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
        "validation_loss": val, "validation_tokens": int(len(tokens["valid"])),
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "log": [h for h in trainer.state.log_history if "loss" in h],
    }
    print(json.dumps({k: v for k, v in metrics.items() if k != "log"}, indent=2), flush=True)

    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.output_router_logits = False
    model.config.use_cache = model.generation_config.use_cache = True  # Trainer leaves use_cache=False behind
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for code in tmp.glob("*.py"):  # the package's modules: the stored demo holds files to load, not code
        code.unlink()
    (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
