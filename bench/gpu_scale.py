"""The released 48B-A3B layout at scale on one GPU: decode TPOT through ``generate()``, batched throughput (3:1
hybrid against all-MLA of the same width), cold start. Writes gpu_scale.json / gpu_scale.md under ``--out``.

Models have random bf16 weights, built on the meta device and initialised on the GPU (98 GB: no checkpoint of the
48B fits the lent machine's 64 GB disk). Each measurement fills a cache with a real prefill of ``--prefill`` tokens
per sequence and extends the MLA latents to the context by repeating the prefill's rows (decode cost does not
depend on the values; the KDA states are the real prefill's); the table says so. The cache starts about 3n + 8
tokens short of the nominal context, so that the generated tokens end at it (:func:`cached_tokens`).

* **decode** (batch 1): TPOT = (time of ``generate()`` for n+1 new tokens - time for 1) / n, greedy with
  ``min_new_tokens`` so nothing stops early, after one untimed ``generate()`` that captures the CUDA graphs of the
  buckets the timed calls use. Roofline = bytes a step must move / the copy bandwidth measured in the same run:
  every weight but the unchosen experts (one embedding row), the MLA latents attended over, and each KDA state
  read and written once. The anchor, in the same run: native transformers' ``kimi_linear`` with the same layout
  (random weights of its own), TPOT through ``generate()`` from a real prompt (``--native-contexts``).
  ``--weights int8`` (or ``float8``) times the same rows with torchao weight-only weights, routed experts included,
  quantized layer by layer as the model is made (the choices of ``from_pretrained`` with that
  ``quantization_config``); the roofline counts the bytes they store.
* **batched**: tokens/s = batch x n / (time for n+1 tokens - time for 1), for each layout, context and batch
  (``max`` = the largest batch whose caches fit beside the weights); batch roofline from the same byte count with
  the experts a step actually touches (counted in one eager step: the distinct experts each MoE layer routes the
  batch to) and every sequence's cache.
* **cold**: a small checkpoint of the release's width (``--cold-layers`` layers) is saved, then loaded by two fresh
  processes sharing one empty Triton cache folder: ``from_pretrained`` to the first generated token of a
  ``--cold-prompt``-token prompt, (a) first process (nothing compiled: what a fresh machine pays), (b) second.

    python bench/gpu_scale.py --out $OUT                          # everything (one H200)
    python bench/gpu_scale.py --parts decode --contexts 4096 --out $OUT
    python bench/gpu_scale.py --parts decode --weights bf16,int8 --out $OUT     # int8 against bf16 (one H200)
    python bench/gpu_scale.py --parts decode --weights int8 --native-contexts "" --out $OUT   # 48B int8, one H100
    python bench/gpu_scale.py --preset tiny --device cpu --dtype float32 --contexts 512 --batched-contexts 512 \\
        --batches 1,2 --cold-layers 2 --out /tmp/scale                # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu_scale (installed) or python -m bench.gpu_scale
    from .gpu import copy_bandwidth, log
    from .gpu_long_context import extend_cache, memory_line, sync
    from .gpu_quant import quantization_config
    from .step_bytes import StepBytes
    from .gpu_report import pdl_settings, programmatic_dependent_launch, save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_scale.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu import copy_bandwidth, log  # type: ignore[no-redef]
    from gpu_long_context import extend_cache, memory_line, sync  # type: ignore[no-redef]
    from gpu_quant import quantization_config  # type: ignore[no-redef]
    from step_bytes import StepBytes  # type: ignore[no-redef]
    from gpu_report import (  # type: ignore[no-redef]
        pdl_settings, programmatic_dependent_launch, save_report, versions_header,
    )

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.random_weights import build_random_model  # noqa: E402
from modeling_kimi_linear.cuda_graph_decode import decode_bucket  # noqa: E402
from modeling_kimi_linear.presets import available_presets, load_preset  # noqa: E402
from modeling_kimi_linear.transformers_compat import cache_field, output_cache  # noqa: E402

GB = 1e9
PAPER_TPOT_MS = {4096: 5.09, 131072: 5.74, 1048576: 7.99}  # Kimi Linear, Fig. 7b of the paper, batch 1


def layout_config(preset: str, layout: str, layers: int | None = None):  # noqa: ANN201 - a KimiLinearConfig
    """The preset, or its all-MLA twin of the same width, optionally cut to ``layers`` layers (3:1 kept)."""
    base = load_preset(preset)
    n = layers or base.num_hidden_layers
    lac = dict(base.linear_attn_config)
    if layout == "all_mla":
        lac.update(kda_layers=[], full_attn_layers=list(range(1, n + 1)))
    elif layers is not None:
        full = [i for i in range(1, n + 1) if i % 4 == 0] or [n]
        lac.update(kda_layers=[i for i in range(1, n + 1) if i not in full], full_attn_layers=full)
    return load_preset(preset, num_hidden_layers=n, linear_attn_config=lac)


def fill(model: KimiLinearForCausalLM, batch: int, context: int, prefill: int, spare: int):
    """A cache holding ``context`` tokens per sequence (a real prefill, then repeated latents) with room for
    ``spare`` more, and the ids ``generate()`` continues from."""
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (batch, prefill), device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = output_cache(out)
    extend_cache(cache, context, decode_bucket(context + spare))
    full = torch.cat([ids, ids.new_zeros(batch, context - prefill), out.logits[:, -1:].argmax(-1)], 1)
    return cache, full


def timed_generate(model, ids: torch.Tensor, cache, new_tokens: int) -> tuple[float, torch.Tensor]:  # noqa: ANN001
    sync(model.device)
    start = time.perf_counter()
    seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **cache_field(cache),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    sync(model.device)
    return time.perf_counter() - start, seq


@torch.no_grad()
def cached_tokens(context: int, args) -> int:  # noqa: ANN001
    """Tokens the cache holds before the timed ``generate()`` calls: ``context`` less room for every token they add
    (about 3n + 8), so that the whole measurement stays in the MLA buffer bucket of ``context`` rows (2**20 rows
    at 1M: a bucket of 2**20 + 100 rows would be 1.31M rows, 25% more cache than 1M tokens need)."""
    return context - (3 * args.new_tokens + 8)


def step_time(model, batch: int, context: int, args) -> dict:  # noqa: ANN001
    """Seconds per generated token (per step) of ``model`` at ``batch`` x ``context``, through ``generate()``."""
    n = args.new_tokens
    cache, ids = fill(model, batch, cached_tokens(context, args), args.prefill, spare=3 * n + 8)
    _, ids = timed_generate(model, ids, cache, n)  # captures the graphs of the buckets the timed calls use
    t1, ids = timed_generate(model, ids, cache, 1)
    tn, ids = timed_generate(model, ids, cache, n + 1)
    experts = distinct_experts(model, ids[:, -1:], cache)
    del cache
    return {"step_s": (tn - t1) / n, "expert_share": experts}


def distinct_experts(model, token: torch.Tensor, cache) -> float:  # noqa: ANN001
    """Mean share of each MoE layer's experts that one eager step of the batch routes to."""
    shares, hooks = [], []
    for layer in model.model.layers:
        if hasattr(layer, "block_sparse_moe"):
            gate = layer.block_sparse_moe.gate
            hooks.append(gate.register_forward_hook(
                lambda mod, inp, out: shares.append(out[0].unique().numel() / mod.num_experts)))
    graphs, model.cuda_graph_decode = model.cuda_graph_decode, False
    try:
        model(input_ids=token, past_key_values=cache)
    finally:
        model.cuda_graph_decode = graphs
        for h in hooks:
            h.remove()
    return sum(shares) / max(len(shares), 1)


def largest_batch(model, context: int, bytes_: StepBytes, reserve_gb: float) -> int:  # noqa: ANN001
    """The largest batch whose caches (latent buffers of the bucket, KDA states, a prefill's activations) fit in
    the free device memory, keeping ``reserve_gb`` for graphs and workspaces."""
    if model.device.type != "cuda":
        return 4
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    per_seq = decode_bucket(context) * bytes_.latent_per_token + bytes_.kda_state // 2  # (kda_state: read + write)
    return max(1, int((free - reserve_gb * GB) // per_seq))


# Kernel choices not yet on by default, timed through generate() beside the defaults (--kernel-variants): module
# constants of the Triton kernel modules, set for the variant's rows only (read at every launch; each row fills a new
# cache, so its CUDA graphs are captured under the variant)
KERNEL_VARIANTS = {
    "default": {},
    "gemv": {("multi_linear_triton", "GEMV_ONE_TOKEN"): True, ("moe_decode_triton", "GEMV_ONE_TOKEN"): True},
    "gemv3": {("multi_linear_triton", "GEMV_ONE_TOKEN"): True, ("moe_decode_triton", "GEMV_ONE_TOKEN"): True,
              ("multi_linear_triton", "GEMV_STAGES"): 3, ("moe_decode_triton", "GEMV_STAGES"): 3},
    "router1": {("moe_decode_triton", "ROUTER_DECODE_WARPS"): 1},
    "gemv+router1": {("multi_linear_triton", "GEMV_ONE_TOKEN"): True, ("moe_decode_triton", "GEMV_ONE_TOKEN"): True,
                     ("moe_decode_triton", "ROUTER_DECODE_WARPS"): 1},
}


@contextlib.contextmanager
def kernel_variant(name: str) -> Iterator[None]:
    """The module constants of :data:`KERNEL_VARIANTS` ``[name]`` set, and restored after."""
    import importlib
    from unittest import mock

    with contextlib.ExitStack() as stack:
        for (module_name, attr), value in KERNEL_VARIANTS[name].items():
            module = importlib.import_module(f"modeling_kimi_linear.{module_name}")
            stack.enter_context(mock.patch.object(module, attr, value))
        yield


def run_decode(model, args, bw: float | None, bytes_: StepBytes, weights: str = "bf16") -> list[dict]:  # noqa: ANN001
    rows = []
    for context, pdl, variant in itertools.product(args.contexts, args.pdl, args.kernel_variants):
        log(f"decode: batch 1 at {context} tokens, {weights} weights, programmatic dependent launch "
            f"{'on' if pdl else 'off'}, kernels {variant}")
        with programmatic_dependent_launch(model, pdl), kernel_variant(variant):
            got = step_time(model, 1, context, args)
        row = {"layers": model.config.num_hidden_layers, "context": context, "batch": 1,
               "tpot_ms": round(1e3 * got["step_s"], 3), "synthetic_context": context > args.prefill,
               "paper_tpot_ms": PAPER_TPOT_MS.get(context), "pdl": pdl, "weights": weights, "kernels": variant}
        if bw:
            row["roofline_ms"] = round(1e3 * bytes_.step(1, context) / bw, 3)
            row["tpot_over_roofline"] = round(row["tpot_ms"] / row["roofline_ms"], 2)
        log(f"  {row}")
        rows.append(row)
    return rows


def native_model(config, device: torch.device, dtype: torch.dtype):  # noqa: ANN201 - transformers' model
    """transformers' own ``kimi_linear`` model with ``config``'s layout (random weights drawn on ``device``)."""
    from transformers import KimiLinearConfig as NativeConfig
    from transformers import KimiLinearForCausalLM as NativeModel

    values = {k: v for k, v in config.to_dict().items() if k not in ("auto_map", "architectures", "transformers_version")}
    native = NativeConfig(**values)  # it reads the released layout our to_dict writes (tests/test_config.py)
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = NativeModel(native)
    finally:
        torch.set_default_dtype(default)
    sync(device)
    log(f"built native {native.num_hidden_layers} layers in {time.perf_counter() - start:.1f} s; {memory_line(device)}")
    return model.eval()


def run_native(args, device: torch.device, dtype: torch.dtype) -> list[dict]:  # noqa: ANN001
    """The anchor: native transformers' TPOT at ``--native-contexts`` through ``generate()`` from a real prompt of
    that many tokens (its cache cannot be filled synthetically), TPOT = (t(n+1) - t(1)) / n, n = --native-tokens."""
    model = native_model(layout_config(args.preset, "hybrid", args.layers), device, dtype)
    rows, n = [], args.native_tokens

    def timed(ids: torch.Tensor, new: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=model.config.pad_token_id)
        sync(device)
        return time.perf_counter() - start

    for context in args.native_contexts:
        log(f"native decode: batch 1 from a {context}-token prompt")
        ids = torch.randint(3, model.config.vocab_size, (1, context - n - 1), device=device)
        first = timed(ids, 2)  # compiles and autotunes the prefill's kernels at this length
        t1, tn = timed(ids, 1), timed(ids, n + 1)
        rows.append({"layers": model.config.num_hidden_layers, "context": context, "batch": 1,
                     "tpot_ms": round(1e3 * (tn - t1) / n, 3), "first_generate_s": round(first, 2)})
        log(f"  {rows[-1]}")
    del model
    return rows


def run_batched(model, layout: str, args, bw: float | None, bytes_: StepBytes) -> list[dict]:  # noqa: ANN001
    rows = []
    for context in args.batched_contexts:
        cap = largest_batch(model, context, bytes_, args.reserve_gb)
        batches = sorted({min(b, cap) if b != "max" else cap for b in args.batches})
        smaller, estimate = max((b for b in batches if b < cap), default=0), cap
        for batch, pdl in itertools.product(batches, args.pdl):
            batch = cap if batch == estimate else batch  # the largest batch as found by an earlier back-off
            got = None
            while got is None:
                log(f"batched: {layout} at {context} tokens, batch {batch} (largest that fits: {cap}), programmatic "
                    f"dependent launch {'on' if pdl else 'off'}; {memory_line(model.device)}")
                try:
                    with programmatic_dependent_launch(model, pdl):
                        got = step_time(model, batch, context, args)
                except torch.OutOfMemoryError:
                    gc.collect()
                    torch.cuda.empty_cache()
                    # the estimate of the largest batch leaves out the step's own activations: back off from it
                    if batch != cap or int(batch * 0.8) <= smaller:
                        log("  out of memory: skipped")
                        break
                    batch = cap = int(batch * 0.8)
                    log(f"  out of memory: trying batch {batch}")
            if got is None:
                continue
            row = {"layout": layout, "context": context, "batch": batch, "largest_batch": cap,
                   "tokens_per_s": round(batch / got["step_s"], 1), "expert_share": round(got["expert_share"], 3),
                   "synthetic_context": context > args.prefill, "pdl": pdl}
            if bw:
                row["roofline_tokens_per_s"] = round(batch * bw / bytes_.step(batch, context, got["expert_share"]), 1)
                row["share_of_roofline"] = round(row["tokens_per_s"] / row["roofline_tokens_per_s"], 3)
            log(f"  {row}")
            rows.append(row)
            gc.collect()
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
        for row in rows:  # the largest batch as it turned out
            if row["context"] == context:
                row["largest_batch"] = cap
    return rows


_COLD = """
import json, os, sys, time
start = time.perf_counter()
import torch
sys.path.insert(0, {repo!r})
from modeling_kimi_linear import KimiLinearForCausalLM
imported = time.perf_counter()
model = KimiLinearForCausalLM.from_pretrained({path!r}, dtype=getattr(torch, {dtype!r}), device_map={device!r}).eval()
loaded = time.perf_counter()
ids = torch.randint(3, model.config.vocab_size, (1, {prompt}), device=model.device)
model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
               pad_token_id=model.config.pad_token_id)
if model.device.type == "cuda":
    torch.cuda.synchronize()
done = time.perf_counter()
recorded = 0
if model.device.type == "cuda" and {record!r} and os.environ.get("KIMI_LINEAR_TRITON_TUNING") == "0":
    from pathlib import Path
    from modeling_kimi_linear import triton_tuning
    recorded = triton_tuning.dump(Path({record!r}))
print(json.dumps({{"total_s": done - start, "load_s": loaded - start, "imports_s": imported - start,
                  "first_token_s": done - loaded,
                  "tuning_entries_recorded": recorded}}))
"""


def run_cold(args, device: torch.device, dtype: torch.dtype) -> dict:
    """Two fresh processes, one empty Triton cache folder: from_pretrained to the first token."""
    work = Path(tempfile.mkdtemp(prefix="kimi_cold_"))
    log(f"cold start: saving a {args.cold_layers}-layer checkpoint of the {args.preset} width")
    model = build_model(layout_config(args.preset, "hybrid", args.cold_layers), device, dtype)
    model.save_pretrained(work / "ckpt")
    del model
    gc.collect()
    from modeling_kimi_linear import triton_tuning

    records = args.record_tuning or str(work / "tuning.json")
    script = _COLD.format(repo=str(Path(__file__).resolve().parent.parent), path=str(work / "ckpt"),
                          dtype=str(dtype).removeprefix("torch."), device=str(device), prompt=args.cold_prompt,
                          record=records)
    base = dict(os.environ, PYTHONUNBUFFERED="1", **{triton_tuning.ENV_FILE: records})
    # (1) a fresh machine as it is without recorded tuning: empty Triton cache, records off (it records its own);
    # (2) a second process on that machine; (3) a fresh machine with the records: another empty Triton cache
    runs = {"fresh_without_tuning": dict(base, TRITON_CACHE_DIR=str(work / "triton"), **{triton_tuning.ENV_SWITCH: "0"}),
            "second_process": dict(base, TRITON_CACHE_DIR=str(work / "triton")),
            "fresh_machine": dict(base, TRITON_CACHE_DIR=str(work / "triton_fresh"))}
    result = {"layers": args.cold_layers, "prompt_tokens": args.cold_prompt}
    for name, env in runs.items():
        log(f"cold start: {name.replace('_', ' ')}")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1500)
        if done.returncode:
            raise RuntimeError(f"cold-start process failed:\n{done.stderr[-3000:]}")
        times = json.loads(done.stdout.strip().splitlines()[-1])
        result[f"{name}_s"] = round(times["total_s"], 2)
        result[f"{name}_load_s"] = round(times["load_s"], 2)
        result[f"{name}_imports_s"] = round(times["imports_s"], 2)
        result[f"{name}_first_token_s"] = round(times["first_token_s"], 2)
        log(f"  {times}")
    result["recorded_tuning_entries"] = sum(
        len(v) for v in triton_tuning.read(Path(records)).get(triton_tuning.machine_key() or "", {}).values())
    return result


def build_model(config, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
                weights: str = "bf16") -> KimiLinearForCausalLM:
    """The layout with random weights on ``device``; ``weights`` other than ``bf16`` (``int8``, ``float8``: torchao
    weight-only, experts included) are quantized layer by layer as they are made, the choices ``from_pretrained``
    makes with that ``quantization_config``."""
    start = time.perf_counter()
    config_q = None if weights == "bf16" else quantization_config(weights)
    model = build_random_model(config, device, dtype, quantization=config_q)
    sync(device)
    log(f"built {config.num_hidden_layers} layers ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA), "
        f"{weights} weights, in {time.perf_counter() - start:.1f} s; {memory_line(device)}")
    return model


def pdl_cell(row: dict) -> str:
    """Whether a row ran with programmatic dependent launch (rows of runs before the option: off)."""
    return "on" if row.get("pdl") else "off"


def report(result: dict) -> str:
    lines = [result["header"], "",
             f"Contexts beyond the {result['prefill']}-token real prefill are filled by repeating the prefill's MLA "
             "latents (decode cost does not depend on the values). TPOT through `generate()`: (time for n+1 new "
             "tokens - time for 1) / n.", ""]
    if result.get("decode"):
        lines += ["| layers | weights | kernels | context | batch | PDL | TPOT (ms) | roofline (ms) | TPOT / roofline | "
                  "paper TPOT (ms) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["decode"]:
            lines.append(f"| {r['layers']} | {r.get('weights', 'bf16')} | {r.get('kernels', 'default')} | "
                         f"{r['context']} | 1 | {pdl_cell(r)} | {r['tpot_ms']} | "
                         f"{r.get('roofline_ms', '-')} | {r.get('tpot_over_roofline', '-')} | "
                         f"{r.get('paper_tpot_ms') or '-'} |")
        best = {}  # our best TPOT per weights and context (over the PDL settings; default kernels only)
        for r in result["decode"]:
            if r.get("kernels", "default") != "default":
                continue
            key = (r.get("weights", "bf16"), r["context"])
            best[key] = min(best.get(key, float("inf")), r["tpot_ms"])
        for r in result.get("native_decode", []):
            ours = best.get(("bf16", r["context"]))
            speedup = f"{r['tpot_ms'] / ours:.1f}x" if ours else "-"
            lines.append(f"| native transformers, {r['layers']} layers | bf16 | - | {r['context']} (real prompt) | 1 | - | "
                         f"{r['tpot_ms']} | - | ours is {speedup} faster | - |")
        ratios = [f"{w} {c}: {t / best[('bf16', c)]:.2f}x" for (w, c), t in sorted(best.items())
                  if w != "bf16" and ("bf16", c) in best]
        if ratios:
            lines += ["", "TPOT against bf16 weights in the same run: " + ", ".join(ratios)]
        lines.append("")
    if result.get("batched"):
        lines += ["| layout | context | batch | PDL | tokens/s | roofline tokens/s | share of roofline | experts "
                  "touched |", "|---|---|---|---|---|---|---|---|"]
        for r in result["batched"]:
            lines.append(f"| {r['layout']} | {r['context']} | {r['batch']} | {pdl_cell(r)} | {r['tokens_per_s']} | "
                         f"{r.get('roofline_tokens_per_s', '-')} | {r.get('share_of_roofline', '-')} | "
                         f"{r['expert_share']:.0%} |")
        best = {}
        for r in result["batched"]:
            key = (r["layout"], r["context"])
            best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
        ratios = [f"{c}: {best[('hybrid', c)] / best[('all_mla', c)]:.2f}x" for (lay, c) in sorted(best)
                  if lay == "hybrid" and ("all_mla", c) in best]
        if ratios:
            lines += ["", "hybrid / all-MLA throughput, each at its largest batch: " + ", ".join(ratios)]
        lines.append("")
    if result.get("cold_start"):
        c = result["cold_start"]
        lines += [f"Cold start ({c['layers']} layers of the release's width, {c['prompt_tokens']}-token prompt, "
                  "from the start of a process through `from_pretrained` to the first token; each on an empty Triton "
                  "cache but the second process):", "",
                  "| run | total (s) | imports (s) | imports and loading (s) | first token (s) |", "|---|---|---|---|---|"]
        for name, what in (("fresh_without_tuning", "fresh machine, without the recorded tuning"),
                           ("fresh_machine", "fresh machine, with the recorded tuning (what a user gets)"),
                           ("second_process", "second process on the same machine")):
            lines.append(f"| {what} | {c[f'{name}_s']} | {c.get(f'{name}_imports_s', '-')} | {c[f'{name}_load_s']} | "
                         f"{c.get(f'{name}_first_token_s', '-')} |")
    return "\n".join(lines)


def weight_kinds(text: str) -> list[str]:
    """``--weights`` values: a comma-separated list of ``bf16``, ``int8``, ``int8-head`` (the output head and the
    embedding in int8 too), ``float8``."""
    kinds = ("bf16", "int8", "int8-head", "float8")
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in kinds for v in values):
        raise argparse.ArgumentTypeError(f"--weights takes a comma-separated list of {', '.join(kinds)}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> None:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kimi_linear_48b_a3b", choices=available_presets())
    parser.add_argument("--parts", default="cold,decode,batched", help="comma-separated: cold, decode, batched")
    parser.add_argument("--contexts", type=ints, default=[4096, 131072, 1048576], help="batch-1 decode contexts")
    parser.add_argument("--batched-contexts", type=ints, default=[4096, 131072, 1048576])
    parser.add_argument("--batches", default="1,8,32,max", help="batch sizes ('max': the largest that fits)")
    parser.add_argument("--layouts", default="hybrid,all_mla", help="layouts for the batched part")
    parser.add_argument("--new-tokens", type=int, default=32, help="n in the TPOT formula")
    parser.add_argument("--native-contexts", type=ints, default=[4096],
                        help="decode part: contexts at which native transformers' hybrid is timed in the same run "
                             "(the anchor; empty: none)")
    parser.add_argument("--pdl", type=pdl_settings, default=[False],
                        help="decode and batched parts: run each row with this package's Triton kernels launched "
                             "without ('off', the default) and / or with ('on') programmatic dependent launch, e.g. "
                             "off,on")
    parser.add_argument("--weights", type=weight_kinds, default=["bf16"],
                        help="decode part: weights to time, comma-separated: bf16 and / or torchao weight-only int8, "
                             "float8 (routed experts included; built quantized layer by layer, so the 48B in int8 fits "
                             "an 80 GB GPU)")
    parser.add_argument("--kernel-variants", type=lambda text: [v for v in text.split(",") if v], default=["default"],
                        help="decode part: kernel choices to time, comma-separated, of "
                             f"{', '.join(KERNEL_VARIANTS)} (variants not yet on by default; see KERNEL_VARIANTS)")
    parser.add_argument("--native-tokens", type=int, default=8, help="n in native's TPOT formula")
    parser.add_argument("--prefill", type=int, default=64, help="real prefill tokens per sequence")
    parser.add_argument("--reserve-gb", type=float, default=6.0, help="device memory kept free when sizing batches")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut the layout to this many layers (3 KDA : 1 MLA kept), e.g. to fit an 80 GB GPU")
    parser.add_argument("--cold-layers", type=int, default=2)
    parser.add_argument("--cold-prompt", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--record-tuning", default="",
                        help="add the Triton autotuning choices of the run to this file: JSON, or a module such as "
                             "modeling_kimi_linear/triton_tuned_configs.py, the records shipped with the package "
                             "(see modeling_kimi_linear/triton_tuning.py); default: none")
    parser.add_argument("--merge", action="store_true", help="update gpu_scale.json in --out instead of replacing it")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    args.batches = [b if b == "max" else int(b) for b in args.batches.split(",")]
    parts = set(args.parts.split(","))
    if set(args.kernel_variants) - set(KERNEL_VARIANTS):
        parser.error(f"unknown --kernel-variants {sorted(set(args.kernel_variants) - set(KERNEL_VARIANTS))}; "
                     f"choose from {', '.join(KERNEL_VARIANTS)}")
    if parts - {"cold", "decode", "batched"}:
        parser.error(f"unknown parts {sorted(parts - {'cold', 'decode', 'batched'})}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    path = out / "gpu_scale.json"
    result = json.loads(path.read_text()) if args.merge and path.exists() else {}
    result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  header=versions_header(f"{args.dtype}, random weights, preset {args.preset}",
                                         device=None if device.type == "cuda" else "cpu"),
                  prefill=args.prefill, new_tokens=args.new_tokens)
    import datetime
    import transformers

    result["date"] = str(datetime.date.today())
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import fla
        import triton

        result["versions"].update(fla=fla.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if "cold" in parts:  # first: the cold processes must not find kernels this process compiled
        result["cold_start"] = run_cold(args, device, dtype)
    bw = copy_bandwidth() if device.type == "cuda" else None
    if bw:
        result["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    torch.manual_seed(0)
    with torch.no_grad():
        if "decode" in parts and args.native_contexts:
            result["native_decode"] = run_native(args, device, dtype)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for layout in ("hybrid", "all_mla"):
            wants_decode = layout == "hybrid" and "decode" in parts
            wants_batched = "batched" in parts and layout in args.layouts.split(",")
            if not (wants_decode or wants_batched):
                continue
            builds = list(args.weights) if wants_decode else []
            if wants_batched and "bf16" not in builds:
                builds.append("bf16")  # the batched part runs on bf16 weights
            if wants_decode:  # with --merge, rows of other weights kinds stay
                result["decode"] = [r for r in result.get("decode", []) if r.get("weights", "bf16") not in args.weights]
            for weights in builds:
                model = build_model(layout_config(args.preset, layout, args.layers), device, dtype, weights)
                bytes_ = StepBytes(model)
                if wants_decode and weights in args.weights:
                    result["decode"] += run_decode(model, args, bw, bytes_, weights)
                if wants_batched and weights == "bf16":
                    result["batched"] = [r for r in result.get("batched", []) if r["layout"] != layout]
                    result["batched"] += run_batched(model, layout, args, bw, bytes_)
                del model
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if args.record_tuning and device.type == "cuda":
        from modeling_kimi_linear import triton_tuning

        log(f"recorded {triton_tuning.dump(Path(args.record_tuning))} Triton tuning entries in {args.record_tuning}")
    text = report(result)
    save_report(out, "gpu_scale", text, result["header"], [])
    path.write_text(json.dumps(result, indent=1))  # the JSON shape (save_report wrote header + rows)


if __name__ == "__main__":
    main()
