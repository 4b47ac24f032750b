"""Validation loss and next-token agreement of the demo model under quantized weights (CPU or one GPU).

The embedded demo model (``demo/kimi-linear-demo``, trained on the Python standard library's source, see
demo/README.md) is loaded once per method and scored on the held-out split of that corpus, rebuilt here from the
running Python's standard library (``demo/corpus.py``: the files whose path hash puts them in validation; nothing is
downloaded), tokenized with the demo's tokenizer, as consecutive windows of ``--seq-len`` tokens. For each method
it prints the mean next-token cross-entropy (nats/token), its change against the first method (the reference),
and the share of positions whose arg-max next token equals the reference's.

Methods (``--methods``, comma-separated, first = reference):

* ``bf16`` / ``fp32``: unquantized, in that dtype;
* ``int8``: ``TorchAoConfig(Int8WeightOnlyConfig())`` (routed experts included), activations in ``--dtype``;
* ``int8-head``: the same with the output head and the embedding in int8 too (``include_input_output_embeddings=
  True``, ``lm_head`` dropped from the high-precision list): the head is the largest weight a decode step reads
  after the chosen experts;
* ``float8``: ``TorchAoConfig(Float8WeightOnlyConfig())`` (runs on a CPU too, slowly);
* ``int4``: ``TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))``, CPU or GPU;
  torchao's int4 tensors take 2-D weights only, so the routed experts stay in ``--dtype``;
* ``bnb8`` / ``bnb4``: ``BitsAndBytesConfig`` 8-bit / 4-bit NF4 (bf16 compute), GPU only and only where
  bitsandbytes is installed; bitsandbytes replaces ``nn.Linear`` modules only, so the routed experts stay bf16.

Examples::

    python bench/quantized_quality.py --methods fp32,bf16,int8 --max-windows 48          # CPU
    python bench/quantized_quality.py --device cuda --methods bf16,int8,float8,bnb8,bnb4 --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402

if __package__:  # kimi_linear_bench.quantized_quality (installed) or python -m bench.quantized_quality
    from .gpu_quant import quantization_config as torchao_config
else:  # run as a script from a checkout (python bench/quantized_quality.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_quant import quantization_config as torchao_config  # type: ignore[no-redef]

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
METHODS = ("bf16", "fp32", "int8", "int8-head", "float8", "int4", "bnb8", "bnb4")


def _corpus_module():
    """``demo/corpus.py`` (the split rule and the document format of the demo's training run)."""
    spec = importlib.util.spec_from_file_location("demo_corpus", ROOT / "demo" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validation_tokens(model_dir: Path) -> torch.Tensor:
    """The held-out split as one token stream: each file as BOS, its text, EOS (as ``demo/train_demo.py``)."""
    from modeling_kimi_linear.tokenization_kimi_sp import KimiSentencePieceTokenizer

    corpus = _corpus_module()
    root = corpus.stdlib_root()
    tokenizer = KimiSentencePieceTokenizer.from_pretrained(model_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for path in corpus.stdlib_files(root):
        if corpus.is_validation(path.relative_to(root).as_posix()):
            ids += [bos] + tokenizer.encode(corpus.document(root, path), add_special_tokens=False) + [eos]
    return torch.tensor(ids, dtype=torch.long)


def quantization_config(method: str, dtype: torch.dtype):
    """The ``quantization_config`` for ``method`` (``None`` for the unquantized ones)."""
    if method in DTYPES:
        return None
    if method in ("int8", "int8-head", "float8"):
        return torchao_config(method)  # what bench/gpu_quant.py times, the same configs
    if method == "int4":
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup
        from transformers import TorchAoConfig

        return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    if method in ("bnb8", "bnb4"):
        from transformers import BitsAndBytesConfig

        if method == "bnb8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")


def unavailable(method: str, device: str) -> str | None:
    """Why ``method`` cannot run here, or ``None``."""
    if method in ("int8", "int8-head", "float8", "int4") and importlib.util.find_spec("torchao") is None:
        return "torchao is not installed"
    if method in ("bnb8", "bnb4"):
        if device == "cpu":
            return "bitsandbytes quantization needs a GPU"
        if importlib.util.find_spec("bitsandbytes") is None:
            return "bitsandbytes is not installed"
    return None


@torch.no_grad()
def score(model: KimiLinearForCausalLM, windows: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """(mean next-token cross-entropy in nats, arg-max next token at every position ``[n, T-1]``)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    total, count, argmax = 0.0, 0, []
    for i in tqdm(range(0, len(windows), batch_size), desc="windows", unit="batch", leave=False):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
        count += batch[:, 1:].numel()
        argmax.append(logits.argmax(-1).cpu())
    return total / count, torch.cat(argmax)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "demo" / "kimi-linear-demo"), help="checkpoint directory")
    parser.add_argument("--methods", default="bf16,int8", help="comma-separated; the first is the reference")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="activation dtype of quantized methods")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=0, help="score only the first N windows (0: all)")
    parser.add_argument("--out", default=None, help="directory for quantized_quality.md / .json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dtype = DTYPES[args.dtype]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    tokens = validation_tokens(Path(args.model))
    n = (len(tokens) - 1) // args.seq_len
    windows = tokens[: n * args.seq_len].view(n, args.seq_len)
    if args.max_windows:
        windows = windows[: args.max_windows]
    print(f"validation: {len(tokens):,} tokens, scoring {len(windows)} windows of {args.seq_len}", flush=True)
    rows, reference = [], None
    for method in methods:
        why = unavailable(method, args.device)
        if why is not None:
            print(f"{method}: skipped ({why})", flush=True)
            rows.append({"method": method, "skipped": why})
            continue
        start = time.perf_counter()
        model = KimiLinearForCausalLM.from_pretrained(
            args.model, dtype=DTYPES.get(method, dtype), quantization_config=quantization_config(method, dtype),
            device_map=args.device,
        ).eval()
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        loss, argmax = score(model, windows, args.batch_size)
        row = {"method": method, "loss": loss, "footprint_mb": model.get_memory_footprint() / 1e6,
               "load_s": load_s, "score_s": time.perf_counter() - start}
        if reference is None:
            reference = (loss, argmax)
        row["loss_change_pct"] = 100 * (loss / reference[0] - 1)
        row["agreement_pct"] = 100 * (argmax == reference[1]).float().mean().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    import transformers

    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else _cpu_name()
    header = (f"device: {device}; torch {torch.__version__}, transformers {transformers.__version__}, torchao "
              f"{_version('torchao')}, bitsandbytes {_version('bitsandbytes')}; {datetime.date.today()}; "
              f"{len(windows)} windows x {args.seq_len} tokens of the demo's validation split; quantized methods "
              f"compute in {args.dtype}")
    lines = [header, "", "| method | validation loss | vs " + methods[0] + " | next-token agreement | weights MB |",
             "|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['method']} | skipped: {row['skipped']} | | | |")
        else:
            lines.append(f"| {row['method']} | {row['loss']:.4f} | {row['loss_change_pct']:+.2f}% | "
                         f"{row['agreement_pct']:.2f}% | {row['footprint_mb']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quantized_quality.md").write_text(text + "\n")
        (out / "quantized_quality.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


def _cpu_name() -> str:
    """``<model name> (<n> threads)`` from /proc/cpuinfo where there is one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name} ({torch.get_num_threads()} threads)"


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
