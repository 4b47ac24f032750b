"""Device time per decode step by kernel name: the 48B-A3B layout (cut to ``--layers``) decoding op by op under
``torch.profiler``, for each ``--weights`` kind in turn (bf16, torchao weight-only int8 / float8 built layer by layer
as in ``bench/gpu_scale.py``). A quick answer to "which kernels does this weight format spend its step in",
complementing ``bench/gpu_profile.py`` (time charged to the model's parts, and the CUDA-graph step).

    python bench/gpu_kernel_totals.py --layers 16 --weights bf16,int8 --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

if __package__:  # kimi_linear_bench.gpu_kernel_totals (installed) or python -m bench.gpu_kernel_totals
    from .gpu_report import markdown_table, save_report, versions_header
    from .gpu_scale import build_model, layout_config, weight_kinds
else:  # run as a script from a checkout: make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gpu_report import markdown_table, save_report, versions_header  # type: ignore[no-redef]
    from gpu_scale import build_model, layout_config, weight_kinds  # type: ignore[no-redef]

from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402


@torch.no_grad()
def kernel_totals(model, steps: int, warm: int = 3,  # noqa: ANN001
                  prefill: int = 64) -> dict[str, tuple[float, float]]:
    """Kernel name -> (device us per step, launches per step), over ``steps`` op-by-op decode steps after a
    ``prefill``-token prompt and ``warm`` untimed steps."""
    from torch.profiler import ProfilerActivity, profile

    model.cuda_graph_decode = False
    device = model.device
    ids = torch.randint(3, model.config.vocab_size, (1, prefill), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

    def step() -> None:
        nonlocal cache, token
        o = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = output_cache(o), o.logits[:, -1:].argmax(-1)

    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for event in prof.key_averages():
        if event.device_time_total > 0:
            totals[event.key][0] += event.device_time_total / steps
            totals[event.key][1] += event.count / steps
    return {name: (round(us, 1), round(n, 1)) for name, (us, n) in totals.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kimi_linear_48b_a3b")
    parser.add_argument("--layers", type=int, default=16, help="cut the layout to this many layers (3 KDA : 1 MLA)")
    parser.add_argument("--weights", type=weight_kinds, default=["bf16", "int8"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=15, help="kernels listed per weights kind")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_kernel_totals needs a CUDA GPU")
    rows = []
    for weights in args.weights:
        torch.manual_seed(0)
        model = build_model(layout_config(args.preset, "hybrid", args.layers), torch.device("cuda"), torch.bfloat16,
                            weights)
        found = kernel_totals(model, args.steps)
        total = sum(us for us, _ in found.values())
        ranked = sorted(found.items(), key=lambda kv: -kv[1][0])
        rows += [{"weights": weights, "kernel": name, "us_per_step": us, "launches_per_step": n}
                 for name, (us, n) in ranked[: args.top]]
        rows.append({"weights": weights, "kernel": "(all kernels)", "us_per_step": round(total, 1),
                     "launches_per_step": round(sum(n for _, n in found.values()), 1)})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    head = versions_header(f"op-by-op decode, batch 1, preset {args.preset} cut to {args.layers} layers, "
                           f"{args.steps} steps profiled")
    cells = [[r["weights"], f"`{r['kernel'][:60]}`", r["us_per_step"], r["launches_per_step"]] for r in rows]
    text = markdown_table(head, ["weights", "kernel", "device us per step", "launches per step"], cells)
    save_report(args.out, "gpu_kernel_totals", text, head, rows)


if __name__ == "__main__":
    main()
