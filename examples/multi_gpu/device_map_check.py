"""Split one model over every visible GPU with ``device_map`` and check it against one GPU: greedy tokens, logits of
a prompt, and decode speed (TPOT) at several contexts.

    python examples/multi_gpu/device_map_check.py --preset small --out runs/device_map.json
    # the 48B layout cut to 8 of its 27 layers (29 GB: the one-GPU reference fits an 80 GB card)
    python examples/multi_gpu/device_map_check.py --preset kimi_linear_48b_a3b --layers 8 --out runs/dm_8.json
    # the whole 48B layout (98 GB) over two 80 GB GPUs: no one-GPU reference fits there
    python examples/multi_gpu/device_map_check.py --preset kimi_linear_48b_a3b --runs split --checkpoint /tmp/k48
    # ... and its one-GPU numbers on one H200 (141 GB), the weights drawn in place (the disk is too small for them)
    python examples/multi_gpu/device_map_check.py --preset kimi_linear_48b_a3b --runs single --no-save

1. The checkpoint: ``--model DIR``; else ``--checkpoint DIR`` when it holds a config.json; else random bf16 weights
   of ``--preset`` (``--layers N`` keeps the first N layers of its 3 KDA : 1 MLA pattern), drawn directly on the
   GPUs (:func:`modeling_kimi_linear.random_weights.build_random_model`; spread as accelerate would place them when
   one GPU cannot hold them) and saved in the released layout to ``--checkpoint DIR`` or a temporary folder
   (``--no-save``, for ``--runs single`` only: drawn on the GPU and measured as they are). Random weights drawn on
   different machines differ: greedy tokens are compared within one run of this script only.
2. Each run in ``--runs`` loads it with ``from_pretrained``: ``single`` on the first GPU (``device_map={"": 0}``),
   ``split`` with ``device_map="auto"`` and each GPU capped at 1.15 times its share, so that the decoder layers
   spread over every GPU. Then, with the model in ``inference_mode``:
   * the logits of a ``--prompt-len`` prompt (batch 2, no cache);
   * greedy ``generate()`` of ``--new-tokens`` tokens from it. Decode steps of a model on one GPU run as CUDA graphs;
     a split model decodes op by op and warns once (the run records the warnings);
   * TPOT at each ``--contexts`` length: a real prefill of that many random tokens (batch 1) and ``--steps`` decode
     steps; TPOT is the median of all steps but the first (which captures graphs).
3. With both runs: greedy tokens equal (and the first position that differs), the largest logit difference against
   the logits' scale, and split / single TPOT per context.

Prints and writes (``--out``) a JSON summary; exits 1 when the split run did not use two or more devices or its
greedy tokens differ from the single run's. Without a GPU, ``--runs single`` runs on the CPU (to test the script).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

if not __package__:  # run as a script from a checkout: make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import available_presets, load_preset  # noqa: E402
from modeling_kimi_linear.random_weights import build_random_model  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

GB = 1e9


def preset_config(name: str, layers: int | None) -> KimiLinearConfig:
    """Preset ``name``, cut to its first ``layers`` decoder layers (the default 3 KDA : 1 MLA pattern, last MLA)."""
    if layers is None:
        return load_preset(name)
    full = load_preset(name)
    shape = {k: v for k, v in full.linear_attn_config.items() if k not in ("kda_layers", "full_attn_layers")}
    return load_preset(name, num_hidden_layers=layers, linear_attn_config=shape)


def model_bytes(config: KimiLinearConfig, dtype: torch.dtype) -> int:
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()


def save_random_checkpoint(config: KimiLinearConfig, path: Path, n_gpu: int) -> None:
    """Random bf16 weights drawn on the GPUs (on the CPU without one), saved in the released layout at ``path``."""
    size = model_bytes(config, torch.bfloat16)
    torch.manual_seed(0)
    if n_gpu == 0:
        model = build_random_model(config, "cpu", torch.bfloat16)
    elif size < 0.8 * torch.cuda.get_device_properties(0).total_memory:
        model = build_random_model(config, "cuda:0", torch.bfloat16)
    else:
        from accelerate import infer_auto_device_map

        with torch.device("meta"):
            meta = KimiLinearForCausalLM(config)
        cap = {i: int(0.9 * torch.cuda.get_device_properties(i).total_memory) for i in range(n_gpu)}
        device_map = infer_auto_device_map(meta, max_memory=cap, no_split_module_classes=["KimiDecoderLayer"],
                                           dtype=torch.bfloat16)
        model = build_random_model(config, device_map=device_map, dtype=torch.bfloat16)
    start = time.perf_counter()
    partial = path.with_name(f".{path.name}.partial")  # renamed when complete: a cut-off save is never reused
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    os.replace(partial, path)
    print(f"saved {size / GB:.1f} GB of random weights to {path} in {time.perf_counter() - start:.0f} s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def load(path: Path, run: str, n_gpu: int) -> KimiLinearForCausalLM:
    """The checkpoint on one device (``single``: the first GPU, or the CPU without one) or spread over every GPU
    (``split``), as described in the module docstring."""
    if run == "single":
        return KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                     device_map={"": 0 if n_gpu else "cpu"}).eval()
    size = model_bytes(KimiLinearConfig.from_pretrained(path), torch.bfloat16)
    cap = {i: int(size / n_gpu * 1.15) for i in range(n_gpu)}
    return KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto", max_memory=cap).eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tpot(model: KimiLinearForCausalLM, context: int, steps: int, device: torch.device) -> dict:
    """Prefill ``context`` random tokens, then ``steps`` greedy decode steps; milliseconds per step."""
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    sync()
    start = time.perf_counter()
    out = model(input_ids=ids.to(device), use_cache=True, logits_to_keep=1)
    sync()
    prefill_s = time.perf_counter() - start
    cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    del out
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        sync()
        times.append(1e3 * (time.perf_counter() - start))
        nxt = out.logits[:, -1:].argmax(-1)
    del cache, out
    return {"context": context, "prefill_s": round(prefill_s, 3), "first_step_ms": round(times[0], 2),
            "tpot_ms": round(statistics.median(times[1:]), 3) if len(times) > 1 else None}


def measure(model: KimiLinearForCausalLM, prompt: torch.Tensor, args: argparse.Namespace) -> dict:
    """Logits, greedy tokens, TPOT rows and the placement warnings of one loaded model."""
    device = model.get_input_embeddings().weight.device
    placement = Counter(str(d) for d in getattr(model, "hf_device_map", {}).values())
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        logits = model(input_ids=prompt.to(device), use_cache=False).logits.float().cpu()
        tokens = model.generate(prompt.to(device), max_new_tokens=args.new_tokens, do_sample=False).cpu()
        rows = [tpot(model, context, args.steps, device) for context in args.contexts]
    spread = [str(w.message) for w in caught if "spread over" in str(w.message)]
    peak = [round(torch.cuda.max_memory_allocated(i) / GB, 1) for i in range(torch.cuda.device_count())]
    return {"placement": dict(placement), "placement_warnings": spread, "tpot": rows, "peak_GB_per_gpu": peak,
            "logits": logits, "tokens": tokens}


def compare(single: dict, split: dict) -> dict:
    """Greedy tokens, logits and TPOT of the split run against the single run."""
    a, b = single["tokens"], split["tokens"]
    differ = (a != b).any(0).nonzero()
    return {
        "generated_tokens_equal": bool(torch.equal(a, b)),
        "first_differing_position": int(differ[0]) if differ.numel() else None,
        "max_abs_logit_diff": float((single["logits"] - split["logits"]).abs().max()),
        "logit_scale": float(single["logits"].abs().max()),
        "tpot_split_over_single": {r["context"]: round(s["tpot_ms"] and r["tpot_ms"] / s["tpot_ms"], 3)
                                   for s, r in zip(single["tpot"], split["tpot"])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=available_presets())
    parser.add_argument("--layers", type=int, default=None, help="keep the preset's first N layers")
    parser.add_argument("--model", default=None, help="checkpoint directory instead of a random preset")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="where the random checkpoint is saved, and reused if it is there already")
    parser.add_argument("--runs", default="single,split", help="comma-separated: single, split")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--contexts", default="4096,131072", help="comma-separated prefill lengths for TPOT")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per TPOT context (first one apart)")
    parser.add_argument("--no-save", action="store_true",
                        help="--runs single only: draw the random model on the GPU and measure it without saving "
                             "and loading it (the 48B layout's 98 GB do not fit a 64 GB disk)")
    parser.add_argument("--out", default=None, help="JSON summary path")
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"single", "split"}:
        parser.error("--runs takes single and/or split")
    args.contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    n_gpu = torch.cuda.device_count()
    if "split" in runs and n_gpu < 2:
        raise SystemExit(f"device_map_check: the split run needs at least 2 GPUs, found {n_gpu} (--runs single runs "
                         "on one GPU, or on the CPU)")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else (args.checkpoint or Path(tmp) / "checkpoint")
        config = preset_config(args.preset, args.layers)
        if args.no_save:
            if runs != ["single"] or args.model or args.checkpoint:
                parser.error("--no-save is for --runs single on a random preset, without --model / --checkpoint")
        elif not (path / "config.json").is_file():
            if args.model:
                raise SystemExit(f"device_map_check: {path} holds no config.json")
            if path.exists() and any(path.iterdir()):
                raise SystemExit(f"device_map_check: --checkpoint {path} is neither empty nor a checkpoint")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_random_checkpoint(config, path, n_gpu)
        else:
            config = KimiLinearConfig.from_pretrained(path)
        prompt = torch.randint(3, config.vocab_size, (2, args.prompt_len), generator=torch.Generator().manual_seed(1))
        results = {}
        for run in runs:
            start = time.perf_counter()
            if args.no_save:
                torch.manual_seed(0)
                model = build_random_model(config, "cuda:0" if n_gpu else "cpu", torch.bfloat16)
            else:
                model = load(path, run, n_gpu)
            print(f"{run}: loaded in {time.perf_counter() - start:.0f} s", flush=True)
            if torch.cuda.is_available():
                for i in range(n_gpu):
                    torch.cuda.reset_peak_memory_stats(i)
            results[run] = measure(model, prompt, args)
            print(f"{run}: TPOT {[(r['context'], r['tpot_ms']) for r in results[run]['tpot']]} ms; "
                  f"placement {results[run]['placement']}", flush=True)
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    summary = {
        "gpus": n_gpu, "device": torch.cuda.get_device_name(0) if n_gpu else "cpu", "torch": torch.__version__,
        "model": args.model or f"preset:{args.preset}" + (f", first {args.layers} layers" if args.layers else ""),
        "prompt": list(prompt.shape), "new_tokens": args.new_tokens,
        "runs": {run: {k: v for k, v in r.items() if k not in ("logits", "tokens")} for run, r in results.items()},
        "greedy_tokens": {run: r["tokens"][:, args.prompt_len:].tolist() for run, r in results.items()},
    }
    ok = True
    if "split" in results:
        ok = len(results["split"]["placement"]) >= 2
    if len(results) == 2:
        summary["comparison"] = compare(results["single"], results["split"])
        ok = ok and summary["comparison"]["generated_tokens_equal"]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
