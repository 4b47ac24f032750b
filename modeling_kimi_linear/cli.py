"""The ``kimi-linear`` command: generate text, convert checkpoints, inspect a model, run the benchmarks.

    kimi-linear generate "def fibonacci(n):"        # the embedded demo model, streamed to the terminal
    kimi-linear generate --model DIR "Hello" --do-sample --temperature 0.8
    kimi-linear demo --export DIR                   # the demo as a self-contained trust_remote_code checkpoint
    kimi-linear info DIR --context 1048576          # layers, parameters, cache bytes per token and at a context
    kimi-linear convert SRC DST                     # released checkpoint -> ours (conversion/ scripts)
    kimi-linear export SRC DST                      # ours -> released layout (native transformers, vLLM)
    kimi-linear bench cpu -- --no-compiled          # bench/ scripts; arguments after -- go to the script

Every sub-command has ``--help``. This module is not imported by the model code, so it is not copied into
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_NAME = "kimi-linear-demo"


def demo_checkpoint_dirs() -> list[Path]:
    """Where the embedded demo checkpoint is looked up: the source tree, then the installed data files."""
    return [
        Path(__file__).resolve().parent.parent / "demo" / DEMO_NAME,
        Path(sys.prefix) / "share" / "kimi-linear" / "demo" / DEMO_NAME,
    ]


def demo_checkpoint() -> Path:
    """Path of the embedded demo checkpoint (``FileNotFoundError`` naming the places searched). It holds the
    config, weights and tokenizer files only: this package loads it; :func:`export_checkpoint` writes the form
    that loads without the package."""
    for path in demo_checkpoint_dirs():
        if (path / "config.json").is_file():
            return path
    searched = ", ".join(str(p) for p in demo_checkpoint_dirs())
    raise FileNotFoundError(f"the demo checkpoint was not found (looked in {searched}); pass --model DIR")


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write the checkpoint ``src`` (ours, e.g. the demo) to the new directory ``dst`` in its self-contained form:
    loaded with this package and saved with ``save_pretrained``, which writes the config, the weights (same
    tensors), the tokenizer files, this package's modules and the ``auto_map`` entries, so that
    ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(dst, trust_remote_code=True)`` load it where the
    package is not installed. Other files of ``src`` (``train_metrics.json``) are copied. The directory is built
    under a temporary name beside ``dst`` and renamed at the end: on any error nothing is left at ``dst``.
    ``FileExistsError`` if ``dst`` exists."""
    from . import KimiLinearForCausalLM, load_tokenizer

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} already exists; export into a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        KimiLinearForCausalLM.from_pretrained(src, dtype="auto").save_pretrained(tmp)
        load_tokenizer(src).save_pretrained(tmp)
        for path in src.iterdir():
            if path.is_file() and path.suffix != ".py" and not (tmp / path.name).exists():
                shutil.copyfile(path, tmp / path.name)
        mask = _umask()  # mkdtemp makes a 0700 directory, and transformers writes the weights 0600
        os.chmod(tmp, 0o777 & ~mask)
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~mask)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"kimi-linear: --device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return device


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tiktoken.model")


def _checked_dirs(model_dir: Path, tokenizer_dir: Path) -> None:
    """One clear line where ``generate`` would otherwise fail deep inside transformers: a model folder without a
    ``config.json`` (transformers would try the Hub), a tokenizer folder without tokenizer files."""
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"kimi-linear generate: {model_dir} is not a checkpoint directory (no config.json)")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(f"kimi-linear generate: {tokenizer_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}"
                         f"); save the tokenizer beside the model or name its folder with --tokenizer DIR")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from . import load_tokenizer
    from .modeling_kimi_linear import KimiLinearForCausalLM

    model_dir = Path(args.model) if args.model else demo_checkpoint()
    device = _device(args.device)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _checked_dirs(model_dir, Path(args.tokenizer) if args.tokenizer else model_dir)
    tokenizer = load_tokenizer(args.tokenizer or model_dir)
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"kimi-linear generate: --chat needs a tokenizer with a chat template; the one in "
                         f"{args.tokenizer or model_dir} has none (leave out --chat to continue a plain prompt)")
    model = KimiLinearForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if args.compile:
        model.compile_cpu_decode = True
        if device.type == "cpu":
            print("compiling the decode step (tens of seconds the first time, then loaded from disk) ...", file=sys.stderr, flush=True)
            model.warmup()
    if args.chat:
        prompt_ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        prompt_ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=not args.no_special_tokens)["input_ids"]
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = None if args.no_stream else TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k) if args.do_sample \
        else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(
            prompt_ids.to(device), max_new_tokens=args.max_new_tokens, streamer=streamer,
            repetition_penalty=args.repetition_penalty, pad_token_id=tokenizer.pad_token_id, **sampling,
        )
    if streamer is None:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    src = demo_checkpoint()
    if args.export is None:
        print(src)
        return 0
    dst = export_checkpoint(src, args.export)
    print(f"wrote {dst}: AutoModelForCausalLM.from_pretrained({str(dst)!r}, trust_remote_code=True) loads it")
    return 0


def describe(config, context: int, batch_size: int = 1, element_size: int = 2) -> dict:
    """Layers, parameter counts (total and active per token) and cache bytes of a configuration."""
    import torch

    from .cache_kimi_linear import cache_bytes
    from .modeling_kimi_linear import KimiLinearForCausalLM

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - routed + (routed * config.num_experts_per_token // config.num_experts if config.num_experts else 0)
    per_token = cache_bytes(config, 1, batch_size, element_size)["mla_latent"]
    at_context = cache_bytes(config, context, batch_size, element_size)
    all_mla = len(config.kda_layers) + len(config.mla_layers)
    return {
        "layers": config.num_hidden_layers, "kda_layers": len(config.kda_layers), "mla_layers": len(config.mla_layers),
        "layer_pattern": "".join("K" if i in set(config.kda_layers) else "M" for i in range(config.num_hidden_layers)),
        "parameters": total, "active_parameters": active, "experts": config.num_experts,
        "experts_per_token": config.num_experts_per_token, "vocab_size": config.vocab_size,
        "cache_bytes_per_token": per_token, "cache_fixed_bytes": at_context["kda_conv"] + at_context["kda_state"],
        "context": context, "cache_bytes_at_context": at_context["total"],
        "all_mla_cache_bytes_at_context": all_mla * batch_size * context * config.mla_latent_dim * element_size,
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n):,} B"
        n /= 1024
    raise AssertionError


def cmd_info(args: argparse.Namespace) -> int:
    from .configuration_kimi_linear import KimiLinearConfig
    from .presets import available_presets, load_preset

    target = args.model
    if target is None:
        target = str(demo_checkpoint())
    if Path(target).is_dir():
        if not (Path(target) / "config.json").is_file():
            raise SystemExit(f"kimi-linear info: {target} is a directory without a config.json")
        config = KimiLinearConfig.from_pretrained(target)
    elif Path(target).is_file():
        config = KimiLinearConfig.from_json_file(target)
    elif target in available_presets():
        config = load_preset(target)
    else:
        raise SystemExit(f"kimi-linear info: {target!r} is neither a checkpoint directory, a config.json nor a preset "
                         f"({', '.join(available_presets())})")
    info = describe(config, args.context, args.batch_size, {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype])
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ratio = info["cache_bytes_at_context"] / max(info["all_mla_cache_bytes_at_context"], 1)
    print(f"model:       {target}")
    print(f"layers:      {info['layers']} ({info['kda_layers']} KDA + {info['mla_layers']} MLA): {info['layer_pattern']}")
    print(f"parameters:  {info['parameters']:,} total, {info['active_parameters']:,} active per token "
          f"({info['experts']} experts, {info['experts_per_token']} per token)")
    print(f"cache:       {_human(info['cache_bytes_per_token'])} per token + {_human(info['cache_fixed_bytes'])} "
          f"fixed (KDA states), {args.dtype}, batch {args.batch_size}")
    print(f"at {args.context:,} tokens: {_human(info['cache_bytes_at_context'])} "
          f"({ratio:.0%} of the same stack with every layer MLA: {_human(info['all_mla_cache_bytes_at_context'])})")
    return 0


def _run_script(module: str, argv: list[str], prog: str) -> int:
    """``module.main(argv)``, its usage and errors printed under ``prog`` (the command as the user typed it)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"kimi-linear: {module} is not installed ({exc}); reinstall the kimi-linear package") from exc
    saved, sys.argv[0] = sys.argv[0], prog  # argparse names the program after sys.argv[0]
    try:
        result = mod.main(argv)
    finally:
        sys.argv[0] = saved
    return int(result or 0)


def _script_args(rest: list[str]) -> list[str]:
    """The arguments for a delegated script, less a leading ``--``."""
    return rest[1:] if rest[:1] == ["--"] else rest


def cmd_convert(args: argparse.Namespace) -> int:
    return _run_script("kimi_linear_conversion.convert_released_checkpoint", _script_args(args.rest),
                       "kimi-linear convert")


def cmd_export(args: argparse.Namespace) -> int:
    return _run_script("kimi_linear_conversion.export_released_checkpoint", _script_args(args.rest),
                       "kimi-linear export")


def cmd_bench(args: argparse.Namespace) -> int:
    return _run_script(f"kimi_linear_bench.{args.which}", _script_args(args.rest), f"kimi-linear bench {args.which}")


#: sub-commands whose every argument belongs to the script they run: they skip this parser, which would take a
#: leading option (``kimi-linear convert --help``, ``--dtype ...``) as its own and refuse it
PASS_THROUGH = {"convert": cmd_convert, "export": cmd_export}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-linear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text (default: the embedded demo model)",
                         description="Generate a continuation of PROMPT, streamed as it is produced.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", help="checkpoint directory (default: the embedded demo model)")
    gen.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--no-special-tokens", action="store_true", help="do not add BOS to the prompt")
    gen.add_argument("--no-stream", action="store_true", help="print the whole text at the end instead of streaming")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--compile", action="store_true",
                     help="CPU: compile the decode step to C++ first (several times faster per token; tens of "
                          "seconds of compiling the first time a model shape is seen, about a second later)")
    gen.set_defaults(func=cmd_generate)

    demo = sub.add_parser("demo", help="where the embedded demo model is; --export DIR: a self-contained copy",
                          description="Print the path of the embedded demo checkpoint (config, weights and tokenizer "
                                      "files, loaded by this package). With --export DIR, write it to the new "
                                      "directory DIR with this package's modules and auto_map, so that "
                                      "transformers' Auto classes load it with trust_remote_code=True where the "
                                      "package is not installed.")
    demo.add_argument("--export", metavar="DIR", help="write the self-contained checkpoint to DIR (must not exist)")
    demo.set_defaults(func=cmd_demo)

    info = sub.add_parser("info", help="layers, parameters and cache size of a checkpoint, config or preset",
                          description="Describe a model: layer pattern, parameters, hybrid cache bytes.")
    info.add_argument("model", nargs="?", help="checkpoint dir, config.json or preset name (default: the demo)")
    info.add_argument("--context", type=int, default=131072, help="context length for the cache size")
    info.add_argument("--batch-size", type=int, default=1)
    info.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    for name, func, what in (("convert", cmd_convert, "a released (or native transformers) checkpoint into ours"),
                             ("export", cmd_export, "one of our checkpoints into the released layout")):
        p = sub.add_parser(name, help=f"convert {what}", add_help=False,
                           description=f"Convert {what}; all arguments go to the conversion script.")
        p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the conversion script (try --help)")
        p.set_defaults(func=func)

    bench = sub.add_parser("bench", help="run a benchmark from bench/",
                           description="Run bench/cpu.py, bench/gpu.py, bench/gpu_check.py or bench/tokenizer.py; later "
                                       "arguments go to it.")
    bench.add_argument("which", choices=["cpu", "gpu", "gpu_check", "tokenizer"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark script (try -- --help)")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in PASS_THROUGH:
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=PASS_THROUGH[argv[0]])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError) as exc:
        print(f"kimi-linear: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
