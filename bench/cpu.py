"""CPU benchmark: ours vs native transformers on the same tiny random weights (fp32, batch 1).

The native model is transformers' own ``kimi_linear`` on its PyTorch fallback (fla does not run on a CPU). Both
models load one saved directory, and the script first checks they produce the same logits, so the timings compare
the same computation. Measured: a forward over ``--prompt-len`` tokens, greedy generation of ``--new-tokens``
tokens, and the time per decoded token after prompts of ``--contexts`` tokens. Native and ours alternate round by
round, so that both see the same load on a shared machine; prints medians, the median per-round speed-up and its
range.

    python bench/cpu.py                   # the README's numbers
    python bench/cpu.py --contexts 512    # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.transformers_compat import output_cache  # noqa: E402

KDA, MLA = "linear_attention", "full_attention"


def native_tiny():
    """The baseline's toy shape: 3 KDA + 1 MLA layers, hidden 128, 8 experts top-2 (about 1.3M parameters)."""
    from transformers import KimiLinearConfig as NativeConfig
    from transformers import KimiLinearForCausalLM as NativeModel

    torch.manual_seed(0)
    cfg = NativeConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, num_local_experts=8, num_experts_per_tok=2, linear_num_heads=2, linear_head_dim=64,
        layer_types=[KDA, KDA, KDA, MLA], mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return NativeModel(cfg).eval()


def interleaved(run_native, run_ours, rounds: int) -> tuple[float, float, list[float]]:
    """Run native, then ours, ``rounds`` times (so both see the same load on a shared machine); each call returns
    seconds. Returns the two medians and the per-round speed-ups (native / ours)."""
    native_s, ours_s = [], []
    for _ in range(rounds):
        native_s.append(run_native())
        ours_s.append(run_ours())
    return statistics.median(native_s), statistics.median(ours_s), [n / o for n, o in zip(native_s, ours_s)]


def seconds(fn) -> Callable[[], float]:
    """``fn`` as a timed call."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0)


def decoder(model, context: int, steps: int) -> Callable[[], float]:
    """After one ``context``-token prefill, each call decodes ``steps`` more tokens and returns the median seconds
    per token (the context grows by ``steps`` per call, little against ``context``)."""
    ids = torch.randint(3, 1024, (1, context), generator=torch.Generator().manual_seed(context))
    out = model(ids, use_cache=True, logits_to_keep=1)
    held = {"cache": output_cache(out), "next": out.logits[:, -1:].argmax(-1)}

    def run() -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(held["next"], past_key_values=held["cache"], use_cache=True)
            times.append(time.perf_counter() - start)
            held["cache"], held["next"] = output_cache(out), out.logits[:, -1:].argmax(-1)
        return statistics.median(times)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--prompt-len", type=int, default=2048, help="tokens in the timed forward")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens in the timed greedy generation")
    parser.add_argument("--contexts", default="512,2048,8192", help="contexts for the per-token decode time")
    parser.add_argument("--decode-steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds, native and ours alternating (decode: twice as many); medians are reported")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    native = native_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        native.save_pretrained(tmp)
        ours = KimiLinearForCausalLM.from_pretrained(tmp).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"{datetime.date.today()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{torch.get_num_threads()} threads; {cpu}")
    print(f"tiny model: 3 KDA + 1 MLA layers, hidden 128, 8 experts top-2, {n_params:,} parameters, fp32; "
          "native runs its PyTorch fallback")
    rows = []
    with torch.inference_mode():
        check = torch.randint(3, 1024, (1, 100), generator=torch.Generator().manual_seed(0))
        diff = (ours(check).logits - native(check).logits).abs().max().item()
        print(f"same weights: max |logits ours - native| = {diff:.2e}")
        if diff > 1e-4:
            sys.exit("the two models disagree; timings would not compare the same computation")
        ours(check[:, :8])
        native(check[:, :8])  # warm-up

        prompt = torch.randint(3, 1024, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
        rows.append((f"forward, {args.prompt_len} tokens", *interleaved(
            seconds(lambda: native(prompt, use_cache=False)), seconds(lambda: ours(prompt, use_cache=False)),
            args.repeats)))

        short = prompt[:, :32]
        same = torch.equal(greedy(ours, short, args.new_tokens), greedy(native, short, args.new_tokens))
        rows.append((f"greedy generate, {args.new_tokens} new tokens", *interleaved(
            seconds(lambda: greedy(native, short, args.new_tokens)),
            seconds(lambda: greedy(ours, short, args.new_tokens)), args.repeats)))

        for context in (int(c) for c in args.contexts.split(",")):
            rows.append((f"decode, per token at {context} context", *interleaved(
                decoder(native, context, args.decode_steps), decoder(ours, context, args.decode_steps),
                2 * args.repeats)))
    print(f"greedy tokens identical: {same}")
    print()
    print("| task | native (s) | ours (s) | speed-up | speed-up per round (min - max) |")
    print("|---|---|---|---|---|")
    for task, t_native, t_ours, ratios in rows:
        print(f"| {task} | {t_native:.4f} | {t_ours:.4f} | {statistics.median(ratios):.1f}x | "
              f"{min(ratios):.1f}x - {max(ratios):.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(task=r[0], native_s=r[1], ours_s=r[2], speedups=r[3])
                                               for r in rows], indent=1))


if __name__ == "__main__":
    main()
