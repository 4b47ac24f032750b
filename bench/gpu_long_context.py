"""Decode at a 1M-token context with the released 48B-A3B layout (27 layers: 20 KDA + 7 MLA) on one GPU.

Random weights, batch 1: the model is built on the meta device, allocated on ``--device`` and initialised there
by the model's own ``_init_weights`` (:func:`modeling_kimi_linear.random_weights.build_random_model`). A real
prefill of ``--prefill`` random tokens fills the cache; the MLA latent buffers are then extended to ``--context``
tokens by repeating the prefill's latent rows (decode cost does not depend on the values; the fixed-size KDA states
are those of the real prefill). ``--steps`` decode steps follow, one token at a time (CUDA: the model's CUDA-graph
decode); the first step, which captures the graph, is reported apart and TPOT is the median of the rest. Also:
cache bytes, peak memory, and a roofline TPOT = (active weight bytes + cache bytes) / copy bandwidth measured in
the same run (not on a CPU). ``--out`` gets long_context.md / .json.

    python bench/gpu_long_context.py --out results/
    python bench/gpu_long_context.py --preset tiny --device cpu --dtype float32 --context 4096 --prefill 256 --steps 4
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu_long_context (installed) or python -m bench.gpu_long_context
    from .gpu import active_weight_bytes, copy_bandwidth, log
    from .gpu_report import save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_long_context.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu import active_weight_bytes, copy_bandwidth, log  # type: ignore[no-redef]
    from gpu_report import save_report, versions_header  # type: ignore[no-redef]

from modeling_kimi_linear.cuda_graph_decode import decode_bucket  # noqa: E402
from modeling_kimi_linear.presets import available_presets  # noqa: E402
from modeling_kimi_linear.random_weights import build_random_model  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

GB = 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extend_cache(cache, context: int, rows: int) -> None:  # noqa: ANN001
    """Grow every MLA latent buffer to ``rows`` rows, fill ``[prefill, context)`` by repeating the prefill's rows
    (row ``i`` = row ``i % prefill``), zero the rest, and count ``context`` tokens as seen."""
    prefill = cache.get_seq_length()
    cache.reserve(rows)
    for buf in cache._latent.values():
        filled = prefill
        while filled < context:  # doubling copies; ``filled`` stays a multiple of ``prefill``
            n = min(filled, context - filled)
            buf[:, filled : filled + n] = buf[:, :n]
            filled += n
        buf[:, context:].zero_()  # rows a static decode step reads but masks: no garbage (0 * NaN = NaN)
    cache._seen_tokens = context


def memory_line(device: torch.device) -> str:
    if device.type != "cuda":
        return f"no memory statistics on {device.type}"
    total = torch.cuda.get_device_properties(device).total_memory
    return (f"allocated {torch.cuda.memory_allocated(device) / GB:.1f} GB, reserved "
            f"{torch.cuda.memory_reserved(device) / GB:.1f} GB, peak {torch.cuda.max_memory_allocated(device) / GB:.1f}"
            f" GB of {total / GB:.1f} GB")


@torch.no_grad()
def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, state: dict) -> dict:
    state["doing"] = "measuring copy bandwidth"
    bw = copy_bandwidth() if device.type == "cuda" else None  # first, while the device is empty
    state["doing"] = "building and initialising the model"
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_random_model(args.preset, device, dtype)
    sync(device)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    active = active_weight_bytes(model, cfg.num_experts, cfg.num_experts_per_token)
    log(f"init {time.perf_counter() - start:.1f} s: {params:,} parameters, {weight_bytes / GB:.4g} GB of "
        f"weights, {active / GB:.4g} GB read per decode token (routed experts: top-{cfg.num_experts_per_token} of "
        f"{cfg.num_experts}); {len(cfg.kda_layers)} KDA + {len(cfg.mla_layers)} MLA layers; {memory_line(device)}")

    state["doing"] = f"prefilling {args.prefill} tokens"
    ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=device)
    sync(device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    sync(device)
    prefill_s = time.perf_counter() - start
    cache, nxt = output_cache(out), out.logits[:, -1:].argmax(-1)
    del out
    log(f"prefill of {args.prefill} tokens: {prefill_s:.2f} s (first call: includes kernel compilation and "
        f"autotuning); {memory_line(device)}")

    rows = decode_bucket(args.context + args.steps)  # the largest bucket the steps attend over: no growth later
    state["doing"] = f"extending the cache to {args.context} tokens ({rows} rows per MLA layer)"
    start = time.perf_counter()
    extend_cache(cache, args.context, rows)
    sync(device)
    cache_bytes = cache.memory_bytes()
    log(f"cache extended to {args.context} tokens by repeating the prefill's latents in "
        f"{time.perf_counter() - start:.2f} s: {cache_bytes / GB:.4g} GB of cache content, latent buffers of {rows} "
        f"rows; {memory_line(device)}")

    step_ms = []
    for i in range(args.steps):
        state["doing"] = f"decode step {i + 1} of {args.steps} at context {cache.get_seq_length()}"
        sync(device)
        start = time.perf_counter()
        o = model(nxt, past_key_values=cache, use_cache=True)
        sync(device)
        step_ms.append(1e3 * (time.perf_counter() - start))
        nxt = o.logits[:, -1:].argmax(-1)
    finite = bool(torch.isfinite(o.logits).all())
    tpot = statistics.median(step_ms[1:])
    log(f"decode: first step {step_ms[0]:.1f} ms, TPOT {tpot:.2f} ms (median of {args.steps - 1}); last logits "
        f"finite: {finite}; {memory_line(device)}")
    row = {"preset": args.preset, "context": args.context, "prefill": args.prefill, "steps": args.steps,
           "params_B": float(f"{params / 1e9:.4g}"), "weights_GB": float(f"{weight_bytes / GB:.4g}"),
           "active_weights_GB": float(f"{active / GB:.4g}"), "prefill_s": round(prefill_s, 3),
           "first_step_ms": round(step_ms[0], 1), "tpot_ms": round(tpot, 2),
           "cache_GB": float(f"{cache_bytes / GB:.4g}"), "latent_rows": rows, "logits_finite": finite,
           "peak_GB": round(torch.cuda.max_memory_allocated(device) / GB, 1) if device.type == "cuda" else None,
           "copy_bw_TBps": round(bw / 1e12, 2) if bw else None}
    if bw:
        roof = (active + cache_bytes) / bw
        row.update(roofline_ms=round(1e3 * roof, 2), tpot_over_roofline=round(tpot / (1e3 * roof), 2))
    return row


def report(row: dict, device: torch.device, dtype_name: str) -> tuple[str, str]:
    extra = f"{dtype_name}, batch 1, preset {row['preset']}"
    if row["copy_bw_TBps"]:
        extra += f"; copy bandwidth {row['copy_bw_TBps']} TB/s"
    cpu = None if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    head = versions_header(extra, device=cpu)
    cols = [("context", "context"), ("params (B)", "params_B"), ("weights (GB)", "weights_GB"),
            ("active per token (GB)", "active_weights_GB"), ("prefill (s)", "prefill_s"),
            ("first decode step (ms)", "first_step_ms"), ("TPOT (ms)", "tpot_ms"), ("roofline (ms)", "roofline_ms"),
            ("TPOT / roofline", "tpot_over_roofline"), ("cache (GB)", "cache_GB"), ("peak (GB)", "peak_GB")]
    lines = [head, "", f"Context beyond the {row['prefill']}-token real prefill was filled by repeating the "
             "prefill's MLA latents (decode cost does not depend on the values).", "",
             "| " + " | ".join(name for name, _ in cols) + " |", "|---" * len(cols) + "|",
             "| " + " | ".join(str(row.get(key) if row.get(key) is not None else "-") for _, key in cols) + " |"]
    return head, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kimi_linear_48b_a3b", choices=available_presets())
    parser.add_argument("--context", type=int, default=1 << 20, help="cached tokens the decode steps attend over")
    parser.add_argument("--prefill", type=int, default=8192, help="tokens of real prefill (the rest is synthetic)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps (>= 2; the first is reported apart)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not 1 <= args.prefill <= args.context or args.steps < 2:
        parser.error("need 1 <= --prefill <= --context and --steps >= 2")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    state = {"doing": "starting"}
    try:
        row = run(args, device, dtype, state)
    except torch.OutOfMemoryError as error:
        tried = re.search(r"Tried to allocate [\d.]+ \w+", str(error))
        print(f"OUT OF MEMORY while {state['doing']} ({tried[0] if tried else error}): {memory_line(device)}",
              flush=True)
        sys.exit(2)
    head, text = report(row, device, args.dtype)
    save_report(args.out, "long_context", text, head, [row])


if __name__ == "__main__":
    main()
