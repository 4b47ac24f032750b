"""Split one model over every visible GPU with ``device_map="auto"`` and check it generates what one GPU does.

    python examples/multi_gpu/device_map_check.py --preset small --out runs/device_map.json

Builds the preset with random weights (or loads ``--model DIR``), saves it, loads it twice - once on ``cuda:0``,
once with ``device_map="auto"`` and a per-GPU memory cap that forces the decoder layers onto all GPUs - then
compares the logits of a prompt and a greedy continuation. Prints and writes a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modeling_kimi_linear import KimiLinearForCausalLM  # noqa: E402
from modeling_kimi_linear.presets import load_preset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--model", default=None, help="checkpoint directory instead of a random preset")
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON summary path")
    args = parser.parse_args(argv)
    n_gpu = torch.cuda.device_count()
    if n_gpu < 2:
        raise SystemExit(f"device_map_check: needs at least 2 GPUs, found {n_gpu}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            torch.manual_seed(0)
            KimiLinearForCausalLM(load_preset(args.preset)).to(torch.bfloat16).save_pretrained(tmp)
            path = tmp
        single = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda:0").eval()
        size = sum(p.numel() * p.element_size() for p in single.parameters())
        cap = {i: int(size / n_gpu * 1.15) for i in range(n_gpu)}
        split = KimiLinearForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="auto",
                                                      max_memory=cap).eval()
        placement = Counter(str(d) for d in split.hf_device_map.values())
        prompt = torch.randint(3, single.config.vocab_size, (2, args.prompt_len), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            a = single(prompt.cuda(), use_cache=False).logits.float()
            b = split(prompt.cuda(), use_cache=False).logits.float().to(a.device)
            ga = single.generate(prompt.cuda(), max_new_tokens=args.new_tokens, do_sample=False)
            gb = split.generate(prompt.cuda(), max_new_tokens=args.new_tokens, do_sample=False)
    result = {
        "gpus": n_gpu, "device": torch.cuda.get_device_name(0), "placement": dict(placement),
        "max_abs_logit_diff": float((a - b).abs().max()), "logit_scale": float(a.abs().max()),
        "generated_tokens_equal": bool(torch.equal(ga.cpu(), gb.cpu())),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = len(placement) >= 2 and result["generated_tokens_equal"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
