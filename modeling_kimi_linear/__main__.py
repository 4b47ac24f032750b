"""``python -m modeling_kimi_linear``: build a preset (random weights) or load a checkpoint, and generate.

The machinery without a tokenizer: token ids in, token ids out, plus what the hybrid cache holds. For text, use the
``kimi-linear generate`` command (the embedded demo model, or ``--model DIR``).
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling_kimi_linear", description=__doc__)
    parser.add_argument("--preset", default="tiny", help="configuration preset to build with random weights")
    parser.add_argument("--model", default=None, help="a checkpoint directory to load instead of a preset")
    parser.add_argument("--prompt-len", type=int, default=16, help="length of the random prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from . import KimiLinearForCausalLM
    from .presets import available_presets, load_preset
    from .transformers_compat import output_cache

    if not args.model and args.preset not in available_presets():
        parser.error(f"--preset {args.preset!r}: no such preset; available: {', '.join(available_presets())}")

    torch.manual_seed(args.seed)
    if args.model:
        model = KimiLinearForCausalLM.from_pretrained(args.model)
        source = args.model
    else:
        model = KimiLinearForCausalLM(load_preset(args.preset))
        source = f"preset {args.preset!r} (random weights)"
    model.eval()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {source}, {n_params:,} parameters, {len(cfg.kda_layers)} KDA + {len(cfg.mla_layers)} MLA layers")
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_len))
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            prompt,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=cfg.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    new = out.sequences[0, args.prompt_len :].tolist()
    print(f"prompt ids:    {prompt[0].tolist()}")
    print(f"generated ids: {new}")
    print(f"{len(new)} tokens in {elapsed:.2f} s ({len(new) / elapsed:.1f} tokens/s)")
    cache = output_cache(out)
    if cache is not None:
        print(f"cache: {cache.get_seq_length()} tokens, {cache.memory_bytes():,} bytes")


if __name__ == "__main__":
    main()
