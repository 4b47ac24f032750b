"""Quantized weights on one GPU: load, generate with CUDA-graph decode, memory, TPOT against bf16.

A few layers at the release's full width (random weights; hidden 2304, 256 experts top-8 + 1 shared, first layer
dense; ``--layers KKKM`` = 3 KDA + 1 MLA) are saved once as a bf16 checkpoint under ``--work`` and loaded per
method through ``from_pretrained(..., quantization_config=...)`` (see ``modeling_kimi_linear/quantization.py``):

* ``bf16``: unquantized (the reference);
* ``int8``: ``TorchAoConfig(Int8WeightOnlyConfig())``, routed experts included;
* ``int8-head``: the same with ``lm_head`` and the embedding in int8 too (``include_input_output_embeddings=True``);
* ``float8``: ``TorchAoConfig(Float8WeightOnlyConfig())`` (Hopper);
* ``bnb8`` / ``bnb4``: ``BitsAndBytesConfig`` 8-bit / 4-bit NF4, where bitsandbytes imports (its routed experts
  stay bf16: bitsandbytes only replaces ``nn.Linear``).

Per method: load time, weight bytes (``get_memory_footprint``, which counts quantized storage) and GPU memory
after loading, a ``--context``-token prefill, ``--steps`` decode steps through CUDA graphs (median TPOT; the
first step, which captures, apart) and op by op, greedy tokens against bf16's, a short ``generate()``,
``save_pretrained`` of the quantized model and ``from_pretrained`` of what it wrote (logits compared; checkpoint mode
only), one PEFT LoRA training step on top (QLoRA for ``bnb4``), and a
roofline TPOT = bytes one decode token reads (weights of every layer, 8/256 of the routed experts, one
embedding row, the MLA cache) / the copy bandwidth measured in the same run. A method that fails is reported
with its error and the others still run. Also prints the 48B-A3B layout's predicted int8 weight bytes.

``--in-memory kimi_linear_48b_a3b`` skips the checkpoint: the whole 48B-A3B layout is built on the device piece by
piece and each piece quantized before the next is allocated (the same torchao transforms and defaults, applied
directly rather than through ``from_pretrained``), so int8 fits one 80 GB GPU; bf16 (98 GB) needs an H200.

    python bench/gpu_quant.py --methods bf16,int8,float8,bnb8,bnb4 --out $OUT
    python bench/gpu_quant.py --in-memory kimi_linear_48b_a3b --methods int8 --out $OUT      # one H100
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

# the 48B built piece by piece in int8 (--in-memory): each layer's quantization leaves free blocks of other sizes
# behind, which the default allocator cannot reuse for the next layer (an 80 GB H100 ran out at 79 GB)
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

if __package__:  # kimi_linear_bench.gpu_quant (installed) or python -m bench.gpu_quant
    from .gpu import copy_bandwidth, log
    from .gpu_report import save_report, versions_header
    from .step_bytes import StepBytes
else:  # run as a script from a checkout (python bench/gpu_quant.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu import copy_bandwidth, log  # type: ignore[no-redef]
    from gpu_report import save_report, versions_header  # type: ignore[no-redef]
    from step_bytes import StepBytes  # type: ignore[no-redef]

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import load_preset  # noqa: E402
from modeling_kimi_linear.quantization import HIGH_PRECISION_MODULES, int8_weight_only_bytes  # noqa: E402
from modeling_kimi_linear.random_weights import build_random_model  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

KINDS = {"K": "linear_attention", "M": "full_attention"}
DEVICE = "cuda"  # --device cpu --preset tiny: a smoke run of this script's logic without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def quantization_config(method: str):
    """``quantization_config`` for ``method`` (``None`` for bf16)."""
    if method == "bf16":
        return None
    if method in ("int8", "int8-head", "float8"):
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        if method == "int8-head":  # the output head and the embedding in int8 too
            return TorchAoConfig(Int8WeightOnlyConfig(), include_input_output_embeddings=True,
                                 modules_to_not_convert=[m for m in HIGH_PRECISION_MODULES if m != "lm_head"])
        return TorchAoConfig(Int8WeightOnlyConfig() if method == "int8" else Float8WeightOnlyConfig())
    if method in ("bnb8", "bnb4"):
        from transformers import BitsAndBytesConfig

        if method == "bnb8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    raise ValueError(f"unknown method {method!r}: choose from bf16, int8, int8-head, float8, bnb8, bnb4")


def missing_package(method: str) -> str | None:
    name = {"int8": "torchao", "int8-head": "torchao", "float8": "torchao", "bnb8": "bitsandbytes",
            "bnb4": "bitsandbytes"}.get(method)
    return name if name and importlib.util.find_spec(name) is None else None


def build_checkpoint(work: Path, layers: str, preset: str | None) -> None:
    """A random full-width bf16 checkpoint (in-memory tensor names, fused experts) at ``work`` (``preset``: that
    preset's width instead)."""
    if (work / "config.json").is_file():
        log(f"reusing {work}")
        return
    layout = [KINDS[c] for c in layers]
    if preset:
        cfg = load_preset(preset)
    else:
        cfg = KimiLinearConfig(num_hidden_layers=len(layout), layer_types=layout, first_k_dense_replace=1,
                               linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = KimiLinearForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = work.with_name(work.name + ".tmp")
    model.save_pretrained(tmp, save_original_format=False)
    os.replace(tmp, work)
    log(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {work}")
    del model
    gc.collect()
    torch.cuda.empty_cache()


def load(method: str, work: Path) -> KimiLinearForCausalLM:
    """``from_pretrained`` of the bf16 checkpoint with ``method``'s quantization config."""
    return KimiLinearForCausalLM.from_pretrained(work, dtype=torch.bfloat16, device_map=DEVICE,
                                                 quantization_config=quantization_config(method)).eval()


def build_in_memory(method: str, preset: str) -> KimiLinearForCausalLM:
    """``preset`` with random weights built piece by piece on the device, each piece quantized with ``method``'s
    torchao config before the next is allocated (:func:`build_random_model` ``quantization=``: the choices of
    ``from_pretrained`` with that config), so the peak is about the quantized size: the 48B-A3B in int8 on one
    80 GB GPU."""
    torch.manual_seed(0)  # the same weights for every method
    return build_random_model(preset, DEVICE, torch.bfloat16, quantization=quantization_config(method))


@torch.no_grad()
def measure(method: str, make, context: int, steps: int, bw: float, reference: list[int] | None,
            work: Path | None = None) -> dict:
    """Build or load the model (``make(method)``), then time and check it."""
    row: dict = {"method": method}
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = make(method)
    sync()
    row.update(load_s=round(time.perf_counter() - t, 1), weights_GB=round(model.get_memory_footprint() / 1e9, 3),
               allocated_GB=round(torch.cuda.memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None)
    experts = next(layer for layer in model.model.layers if hasattr(layer, "block_sparse_moe"))
    experts = experts.block_sparse_moe.experts.gate_up_proj
    row["experts_stored_as"] = type(experts).__name__
    prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    cache_bytes = cache.memory_bytes()
    token = out.logits[:, -1:].argmax(-1)
    tokens, tpots = [], {}
    for mode in ("graph", "eager"):
        model.cuda_graph_decode = mode == "graph"
        times = []
        for _ in range(steps + 1):
            sync()
            t = time.perf_counter()
            o = model(input_ids=token, past_key_values=cache, use_cache=True)
            sync()
            times.append(time.perf_counter() - t)
            token = o.logits[:, -1:].argmax(-1)
            cache = output_cache(o)
            if mode == "graph":
                tokens.append(int(token))
        rest = sorted(times[1:])
        tpots[mode] = (rest[len(rest) // 2], times[0])
    model.cuda_graph_decode = True
    roof = (StepBytes(model).weights() + cache_bytes) / bw
    row.update(tpot_graph_ms=round(1e3 * tpots["graph"][0], 3), first_graph_step_ms=round(1e3 * tpots["graph"][1], 1),
               tpot_eager_ms=round(1e3 * tpots["eager"][0], 2), roofline_ms=round(1e3 * roof, 3),
               tokens=tokens)
    if reference is not None:
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(tokens))
        row["greedy_same_as_bf16"] = f"{same}/{len(tokens)}"
    short = prompt[:, :64]
    generated = model.generate(short, max_new_tokens=8, do_sample=False)
    row["generate_ok"] = tuple(generated.shape) == (1, short.shape[1] + 8)
    row["peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None
    del out, o, cache
    if work is not None:
        row["reload"] = reload_check(model, short, work.with_name(work.name + f".{method}"))
    row["lora"] = lora_step(model, prompt[:, :256])
    del model
    return row


@torch.no_grad()
def reload_check(model: KimiLinearForCausalLM, prompt: torch.Tensor, path: Path) -> str:
    """``save_pretrained`` of the quantized model to ``path``, then ``from_pretrained`` of it with no
    ``quantization_config`` (the saved config carries the method): ``same`` when the reloaded model's logits for
    ``prompt`` equal the original's bit for bit, else the largest difference, or the error the method raised."""
    shutil.rmtree(path, ignore_errors=True)
    try:
        model.save_pretrained(path)
        again = KimiLinearForCausalLM.from_pretrained(path, device_map=DEVICE).eval()
        before = model(input_ids=prompt, logits_to_keep=1).logits.float()
        after = again(input_ids=prompt, logits_to_keep=1).logits.float()
        del again
        diff = float((before - after).abs().max())
        return "same" if diff == 0 else f"max diff {diff:.2e}"
    except Exception as exc:  # a method that cannot be saved or reloaded: say so, go on
        return f"fails: {type(exc).__name__}: {str(exc)[:120]}".replace("|", "/")
    finally:
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def lora_step(model: KimiLinearForCausalLM, batch: torch.Tensor) -> str:
    """PEFT LoRA on the attention and MLP projections of the (quantized) model: one forward and backward; ``ok``
    when every adapter got a finite, non-zero gradient and the base weights none (QLoRA for bnb4)."""
    if importlib.util.find_spec("peft") is None:
        return "peft not importable"
    import peft

    targets = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    wrapped.train()
    with torch.enable_grad():
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    base = [n for n, p in wrapped.named_parameters() if "lora_" not in n and p.grad is not None]
    good = bool(grads) and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    return "ok" if good and not base and any(float(g.abs().sum()) > 0 for g in grads) else (
        f"bad: loss {float(loss):.3g}, {len(grads)} adapters, {len(base)} base weights with gradients")


def table(rows: list[dict], header: str) -> str:
    ref = next((r for r in rows if r["method"] == "bf16" and "tpot_graph_ms" in r), None)
    lines = [header, "", "| method | experts stored as | load (s) | weights (GB) | allocated (GB) | TPOT graph (ms) "
             "| vs bf16 | roofline (ms) | TPOT eager (ms) | greedy = bf16 | generate() | save + reload | LoRA step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['method']} | {r.get('skipped') or r['error']} | | | | | | | | | | | |")
            continue
        ratio = f"{r['tpot_graph_ms'] / ref['tpot_graph_ms']:.2f}x" if ref else "-"
        lines.append(f"| {r['method']} | {r['experts_stored_as']} | {r['load_s']} | {r['weights_GB']} | "
                     f"{r['allocated_GB']} | {r['tpot_graph_ms']} | {ratio} | {r['roofline_ms']} | "
                     f"{r['tpot_eager_ms']} | {r.get('greedy_same_as_bf16', '-')} | "
                     f"{'ok' if r['generate_ok'] else 'wrong shape'} | {r.get('reload', '-')} | {r['lora']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="KKKM", help="layer kinds, K = KDA, M = MLA (first layer dense MLP)")
    parser.add_argument("--methods", default="bf16,int8,float8,bnb8,bnb4", help="comma-separated; bf16 first")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per mode (median reported)")
    parser.add_argument("--work", default="/tmp/kimi_linear_quant", help="where the random bf16 checkpoint goes")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run (with --preset)")
    parser.add_argument("--preset", default=None, help="build the checkpoint from this preset instead (e.g. tiny)")
    parser.add_argument("--in-memory", default=None, metavar="PRESET",
                        help="no checkpoint: build PRESET (e.g. kimi_linear_48b_a3b) on the device piece by piece, "
                             "quantizing each piece before the next (methods bf16, int8, float8; not from_pretrained)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    with torch.device("meta"):
        big = KimiLinearForCausalLM(load_preset("kimi_linear_48b_a3b")).to(torch.bfloat16)
    predicted = int8_weight_only_bytes(big) / 1e9
    del big
    bw = copy_bandwidth() if DEVICE == "cuda" else 1e10  # a nominal 10 GB/s for the CPU smoke run
    versions = {name: getattr(__import__(name), "__version__", "?") if importlib.util.find_spec(name) else "absent"
                for name in ("torchao", "bitsandbytes")}
    model_text = (f"{args.in_memory} built in memory" if args.in_memory else args.preset
                  or f"{args.layers} at full width")
    header = versions_header(f"batch 1, {model_text}, {args.context}-token context; torchao "
                             f"{versions['torchao']}, bitsandbytes {versions['bitsandbytes']}; copy bandwidth "
                             f"{bw / 1e12:.2f} TB/s; 48B-A3B layout in int8 (predicted): {predicted:.1f} GB",
                             device=None if DEVICE == "cuda" else "CPU (smoke run)")
    log(header)
    work = Path(args.work)
    if args.in_memory:
        make = lambda method: build_in_memory(method, args.in_memory)  # noqa: E731
    else:
        build_checkpoint(work, args.layers, args.preset)
        make = lambda method: load(method, work)  # noqa: E731
    rows, reference = [], None
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        missing = missing_package(method)
        if missing:
            rows.append({"method": method, "skipped": f"{missing} not importable"})
            log(json.dumps(rows[-1]))
            continue
        try:
            row = measure(method, make, args.context, args.steps, bw, reference, None if args.in_memory else work)
        except Exception as exc:  # report and go on with the other methods
            traceback.print_exc()
            row = {"method": method, "error": f"{type(exc).__name__}: {str(exc)[:200]}".replace("|", "/")}
        if method == "bf16" and "tokens" in row:
            reference = row["tokens"]
        rows.append(row)
        log(json.dumps(row))
    save_report(args.out, "gpu_quant", table(rows, header), header, rows)


if __name__ == "__main__":
    main()
