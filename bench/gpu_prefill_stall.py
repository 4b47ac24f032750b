"""Does a prompt length the warm-up never ran stall the first prefill? Which layers pay for it? (one GPU, bf16)

For each layout (8 layers at the release's width, random weights: the 3:1 hybrid, all KDA, all MLA) the model runs
``model.warmup()`` once, then each ``--lengths`` prompt twice in a row (fresh cache each time). The first call at a
length against the second shows a stall (kernel autotuning, compilation, attention planning); splitting by layout
shows whether KDA or MLA layers cause it. Prints a markdown table; ``--out`` gets prefill_stall.md / .json.

    python bench/gpu_prefill_stall.py --lengths 40960,131072,135168 --out results/
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

if __package__:  # kimi_linear_bench.gpu_prefill_stall (installed) or python -m bench.gpu_prefill_stall
    from .gpu_report import save_report, versions_header
else:  # run as a script from a checkout (python bench/gpu_prefill_stall.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu_report import save_report, versions_header  # type: ignore[no-redef]

from modeling_kimi_linear import KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402

KDA, MLA = "linear_attention", "full_attention"
LAYOUTS = {"hybrid": [KDA, KDA, KDA, MLA] * 2, "all_kda": [KDA] * 8, "all_mla": [MLA] * 8}


def build(layout: list[str]) -> KimiLinearForCausalLM:
    """Random bf16 model of ``layout`` at the release's width, built directly on the GPU."""
    cfg = KimiLinearConfig(num_hidden_layers=len(layout), layer_types=layout, first_k_dense_replace=1,
                           linear_attn_config={"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # A_log / dt_bias are created in fp32 regardless
    try:
        with torch.device("cuda"):
            model = KimiLinearForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def timed_prefill(model: KimiLinearForCausalLM, ids: torch.Tensor) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    model(input_ids=ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="40960,131072,135168", help="comma-separated prompt lengths")
    parser.add_argument("--layouts", default="hybrid,all_kda,all_mla", help=f"among {sorted(LAYOUTS)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for name in args.layouts.split(","):
        model = build(LAYOUTS[name])
        start = time.perf_counter()
        model.warmup()
        torch.cuda.synchronize()
        print(f"{name}: warmup {time.perf_counter() - start:.1f} s", flush=True)
        for T in lengths:
            ids = torch.randint(3, 160000, (1, T), device="cuda")
            first, second = timed_prefill(model, ids), timed_prefill(model, ids)
            row = {"layout": name, "T": T, "first_s": round(first, 3), "second_s": round(second, 3),
                   "first_over_second": round(first / second, 2)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    head = versions_header("bf16, batch 1, 8 layers")
    lines = [head, "", "| layout | prompt | first call (s) | second call (s) | first / second |", "|---|---|---|---|---|"]
    lines += [f"| {r['layout']} | {r['T']} | {r['first_s']} | {r['second_s']} | {r['first_over_second']}x |"
              for r in rows]
    save_report(args.out, "prefill_stall", "\n".join(lines), head, rows)

if __name__ == "__main__":
    main()
