"""GPU benchmark: ours vs native transformers, 3:1 hybrid vs all-MLA, at full layer width (one GPU, bf16).

Models (random weights, batch 1, 8 layers at the release's width: hidden 2304, KDA 32 heads x 128, MLA 32 heads
with a 512 + 64 latent, 256 experts top-8 + 1 shared, first layer dense):

* native hybrid (6 KDA + 2 MLA) and native all-MLA: transformers' own ``kimi_linear`` (with fla);
* ours hybrid and ours all-MLA, loaded from the very same weights as the native model of that layout.

For each context length: prefill time (first call at that length, and again warm), median time per output token
(TPOT) over ``--steps`` decode steps (ours: through CUDA graphs, ``model.cuda_graph_decode = True``, and op by
op as "TPOT eager"; the first decode step, which captures a graph, is reported apart), cache bytes, and a
roofline TPOT = (active weight bytes + cache bytes read per token) / copy bandwidth measured in the same run.
Prints ratios; ``--out`` gets gpu.md and gpu.json.

    python bench/gpu.py --lengths 4096,32768,131072 --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu (installed) or python -m bench.gpu
    from .gpu_report import save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu_report import save_report, versions_header  # type: ignore[no-redef]

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.checkpoint_layout import state_dict_from_released  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

KDA, MLA = "linear_attention", "full_attention"
LAYOUTS = {"hybrid": [KDA, KDA, KDA, MLA, KDA, KDA, KDA, MLA], "all_mla": [MLA] * 8}
T0 = time.time()


def log(*args) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *args, flush=True)


def sync() -> None:
    torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    bw = 2 * x.numel() * 10 / (time.perf_counter() - t)
    del x, y
    return bw


def native_model(layout: list[str]):
    from transformers import KimiLinearConfig as NativeConfig
    from transformers import KimiLinearForCausalLM as NativeModel

    n = len(layout)
    cfg = NativeConfig(num_hidden_layers=n, layer_types=layout, mlp_layer_types=["dense"] + ["sparse"] * (n - 1))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = NativeModel(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def ours_from_native(native, layout: list[str]) -> KimiLinearForCausalLM:
    """Our model holding the native model's weights (through the released tensor names)."""
    from transformers.core_model_loading import revert_weight_conversion

    released = revert_weight_conversion(native, native.state_dict())
    n = len(layout)
    cfg = KimiLinearConfig(
        num_hidden_layers=n, layer_types=layout, first_k_dense_replace=1,
        linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4},
    )
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    state = state_dict_from_released(released)
    del released
    model.load_state_dict(state, assign=True, strict=True)
    del state
    for layer in model.model.layers:  # native keeps A_log / dt_bias in the model dtype; ours holds them in fp32
        for name in ("A_log", "dt_bias"):
            if hasattr(layer.self_attn, name):
                param = getattr(layer.self_attn, name)
                param.data = param.data.float()
    return model.eval()


def active_weight_bytes(model, cfg_experts: int = 256, top_k: int = 8) -> int:
    """Bytes of weights one decode token reads: everything but the unchosen routed experts."""
    total = 0
    for name, p in model.named_parameters():
        if "experts" in name and "shared" not in name:  # fused [E, ...] in both implementations
            total += p.numel() * p.element_size() * top_k // cfg_experts
        elif "embed_tokens" in name:
            total += p.shape[1] * p.element_size()  # one row
        else:
            total += p.numel() * p.element_size()
    return total


@torch.no_grad()
def measure(model, name: str, lengths: list[int], steps: int, bw: float, ours: bool, chunk: int,
            decode_modes: list[str] = ("graph", "eager")) -> list[dict]:
    rows = []
    weights = active_weight_bytes(model)
    if ours:
        model.warmup()  # every kernel shape our bucketed prefill uses, once
    else:
        warm_ids = torch.randint(0, 160000, (1, 1024), device="cuda")
        model(input_ids=warm_ids, use_cache=True, logits_to_keep=1)  # as the anchor script: one small prefill
    sync()
    for T in lengths:
        row: dict = {"model": name, "T": T}
        try:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, 160000, (1, T), device="cuda")
            base = torch.cuda.memory_allocated()
            times = []
            for attempt in range(2):  # first call at this length, then warm
                cache = None
                sync()
                t = time.perf_counter()
                if ours and T > chunk:
                    for s in range(0, T, chunk):
                        out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True,
                                    logits_to_keep=1)
                        cache = output_cache(out)
                else:
                    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                sync()
                times.append(time.perf_counter() - t)
                if attempt == 0:
                    del out
                    gc.collect()
            cache = output_cache(out)
            cache_bytes = cache.memory_bytes() if ours else torch.cuda.memory_allocated() - base
            nxt = out.logits[:, -1:].argmax(-1)
            modes = decode_modes if ours else ["eager"]
            tpots = {}
            for mode in modes:
                if ours:
                    model.cuda_graph_decode = mode == "graph"
                step_times = []
                for _ in range(steps + 1):  # the first step of a mode may capture a graph: reported apart
                    sync()
                    t = time.perf_counter()
                    o = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    sync()
                    step_times.append(time.perf_counter() - t)
                    nxt = o.logits[:, -1:].argmax(-1)
                    cache = output_cache(o)
                first, rest = step_times[0], sorted(step_times[1:])
                tpots[mode] = (rest[len(rest) // 2], first)
            if ours:
                model.cuda_graph_decode = False
            tpot, first_step = tpots[modes[0]]
            if "eager" in tpots and modes[0] != "eager":
                row["tpot_eager_ms"] = round(1e3 * tpots["eager"][0], 2)
            row["first_step_ms"] = round(1e3 * first_step, 1)
            roof = (weights + cache_bytes) / bw
            row.update(prefill_first_s=round(times[0], 3), prefill_warm_s=round(times[1], 3),
                       tpot_ms=round(1e3 * tpot, 2), cache_GB=round(cache_bytes / 1e9, 3),
                       roofline_ms=round(1e3 * roof, 2), tpot_over_roofline=round(tpot / roof, 2),
                       peak_GB=round(torch.cuda.max_memory_allocated() / 1e9, 1))
            del out, o, cache
        except torch.OutOfMemoryError:
            row["oom"] = True
        log(json.dumps(row))
        rows.append(row)
    return rows


def table(rows: list[dict], header: str) -> str:
    by = {(r["model"], r["T"]): r for r in rows}
    lengths = sorted({r["T"] for r in rows})
    lines = [header, "", "| model | context | prefill first (s) | prefill warm (s) | TPOT (ms) | roofline (ms) | "
             "TPOT / roofline | cache (GB) | TPOT eager (ms) | first decode step (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['model']} | {r['T'] // 1024}K | OOM | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['T'] // 1024}K | {r['prefill_first_s']} | {r['prefill_warm_s']} | "
                     f"{r['tpot_ms']} | {r['roofline_ms']} | {r['tpot_over_roofline']} | {r['cache_GB']} | "
                     f"{r.get('tpot_eager_ms', '-')} | {r['first_step_ms']} |")
    lines += ["", "| context | ours hybrid / native hybrid (TPOT) | ours hybrid / ours all-MLA (TPOT) | "
              "ours hybrid / native hybrid (warm prefill) | ours hybrid / ours all-MLA (warm prefill) |",
              "|---|---|---|---|---|"]
    for T in lengths:
        def ratio(a, b, key):
            ra, rb = by.get((a, T)), by.get((b, T))
            if not ra or not rb or ra.get("oom") or rb.get("oom"):
                return "-"
            return f"{ra[key] / rb[key]:.2f}x"
        lines.append(f"| {T // 1024}K | {ratio('ours hybrid', 'native hybrid', 'tpot_ms')} | "
                     f"{ratio('ours hybrid', 'ours all-MLA', 'tpot_ms')} | "
                     f"{ratio('ours hybrid', 'native hybrid', 'prefill_warm_s')} | "
                     f"{ratio('ours hybrid', 'ours all-MLA', 'prefill_warm_s')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,32768,131072", help="comma-separated context lengths")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per length (median reported)")
    parser.add_argument("--models", default="native,ours", help="which implementations to run")
    parser.add_argument("--layouts", default="hybrid,all_mla")
    parser.add_argument("--chunk", type=int, default=1 << 30, help="run our prefill in chunks of this many tokens (default: one call, like native)")
    parser.add_argument("--decode-modes", default="graph,eager",
                        help="our decode paths to time: graph (CUDA graphs) and/or eager (op by op, the default path)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = True
    bw = copy_bandwidth()
    header = versions_header(f"bf16, batch 1; copy bandwidth {bw / 1e12:.2f} TB/s")
    log(header)
    rows: list[dict] = []
    for layout in args.layouts.split(","):
        native = native_model(LAYOUTS[layout])
        label = "hybrid" if layout == "hybrid" else "all-MLA"
        log(f"{layout}: {sum(p.numel() for p in native.parameters()) / 1e9:.2f}B parameters")
        if "native" in args.models:
            rows += measure(native, f"native {label}", lengths, args.steps, bw, ours=False, chunk=args.chunk)
        if "ours" in args.models:
            ours = ours_from_native(native, LAYOUTS[layout])
            del native
            gc.collect()
            torch.cuda.empty_cache()
            rows += measure(ours, f"ours {label}", lengths, args.steps, bw, ours=True, chunk=args.chunk,
                            decode_modes=args.decode_modes.split(","))
            del ours
        else:
            del native
        gc.collect()
        torch.cuda.empty_cache()
    save_report(args.out, "gpu", table(rows, header), header, rows)


if __name__ == "__main__":
    main()
