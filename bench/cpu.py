"""CPU benchmark: ours vs native transformers on the same tiny random weights (fp32, batch 1).

The native model is transformers' own ``kimi_linear`` on its PyTorch fallback (fla does not run on a CPU). Both
models load one saved directory, and the script first checks they produce the same logits, so the timings compare
the same computation. Measured: a forward over ``--prompt-len`` tokens, greedy generation of ``--new-tokens``
tokens, and the time per decoded token after prompts of ``--contexts`` tokens. Native and ours alternate round by
round, so that both see the same load on a shared machine; prints medians, the median per-round speed-up and its
range. Generation and decode are also timed for ours with ``model.compile_cpu_decode = True`` (the decode step as
an ahead-of-time compiled C++ program), compiled by ``warmup()`` before the timings into an empty program folder
(a cold compile); the compile time, and the time another model of the same shape takes to load the program from
disk, are printed apart.

    python bench/cpu.py                   # the README's numbers
    python bench/cpu.py --contexts 512    # quicker
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

if not __package__:  # run as a script from a checkout (python bench/cpu.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.compiled_decode import PROGRAM_DIR_ENV  # noqa: E402
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


def interleaved(runs: list[Callable[[], float]], rounds: int) -> list[tuple[float, list[float]]]:
    """Run each of ``runs`` in turn, ``rounds`` times (so all see the same load on a shared machine); each call
    returns seconds, the first is the anchor (native). Returns per run: the median and the per-round speed-ups
    (anchor / run)."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for seen, run in zip(times, runs):
            seen.append(run())
    return [(statistics.median(t), [a / b for a, b in zip(times[0], t)]) for t in times]


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
    parser.add_argument("--no-compiled", dest="compiled", action="store_false",
                        help="skip our compiled decode (model.compile_cpu_decode = True, compiled once up front)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    native = native_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        native.save_pretrained(tmp)
        ours = KimiLinearForCausalLM.from_pretrained(tmp).eval()
        compiled = KimiLinearForCausalLM.from_pretrained(tmp).eval() if args.compiled else None
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

        compile_s = load_s = None
        if compiled is not None:
            compiled.compile_cpu_decode = True
            with tempfile.TemporaryDirectory() as programs:  # an empty program folder: a cold compile
                os.environ[PROGRAM_DIR_ENV] = programs
                start = time.perf_counter()
                compiled.warmup()
                compile_s = time.perf_counter() - start
                start = time.perf_counter()
                copy.deepcopy(compiled).warmup()  # a new model of the same shape finds the program on disk
                load_s = time.perf_counter() - start
            del os.environ[PROGRAM_DIR_ENV]
            print(f"compile_cpu_decode: warmup() compiled the decode step in {compile_s:.1f} s; another model of "
                  f"the same shape loaded it from disk in {load_s:.1f} s")

        def contenders(make):  # native, ours, ours compiled (when asked for)
            return [make(native), make(ours)] + ([make(compiled)] if compiled is not None else [])

        prompt = torch.randint(3, 1024, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
        rows.append((f"forward, {args.prompt_len} tokens", interleaved(
            [seconds(lambda m=m: m(prompt, use_cache=False)) for m in (native, ours)], args.repeats)))

        short = prompt[:, :32]
        reference = greedy(native, short, args.new_tokens)
        same = all(torch.equal(greedy(m, short, args.new_tokens), reference) for m in contenders(lambda m: m)[1:])
        rows.append((f"greedy generate, {args.new_tokens} new tokens", interleaved(
            contenders(lambda m: seconds(lambda: greedy(m, short, args.new_tokens))), args.repeats)))

        for context in (int(c) for c in args.contexts.split(",")):
            rows.append((f"decode, per token at {context} context", interleaved(
                contenders(lambda m: decoder(m, context, args.decode_steps)), 2 * args.repeats)))
    print(f"greedy tokens identical: {same}")
    print()
    head = "| task | native (s) | ours (s) | speed-up | speed-up per round (min - max) |"
    if compiled is not None:
        head += " ours, compiled decode (s) | speed-up | per round (min - max) |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for task, results in rows:
        (t_native, _), *others = results
        cells = [task, f"{t_native:.4f}"]
        for t, ratios in others:
            cells += [f"{t:.4f}", f"{statistics.median(ratios):.1f}x", f"{min(ratios):.1f}x - {max(ratios):.1f}x"]
        if compiled is not None and len(others) == 1:
            cells += ["-", "-", "-"]
        print("| " + " | ".join(cells) + " |")
    if compile_s is not None:
        print(f"\ncompiled decode: {compile_s:.1f} s of compiling in warmup() the first time this model shape is seen "
              f"({load_s:.1f} s to load it from disk later), not in the timings above")
    if args.json:
        names = ["native", "ours", "ours_compiled"]
        Path(args.json).write_text(json.dumps(
            [dict(task=task, **{f"{n}_s": t for n, (t, _) in zip(names, results)},
                  **{f"{n}_speedups": r for n, (_, r) in zip(names[1:], results[1:])}) for task, results in rows]
            + [dict(compile_s=compile_s, load_s=load_s)], indent=1))


if __name__ == "__main__":
    main()
