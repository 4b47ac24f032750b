"""Convert a released Kimi Linear checkpoint (or a directory saved by native transformers) into ours.

    python conversion/convert_released_checkpoint.py SRC DST [--dtype bfloat16] [--max-shard-size 5GB]
        [--verify] [--overwrite]

SRC: ``moonshotai/Kimi-Linear-48B-A3B-{Base,Instruct}`` as downloaded (config.json with ``linear_attn_config``,
model.safetensors.index.json + shards or one model.safetensors, tiktoken tokenizer files), or a directory
written by ``transformers.KimiLinearForCausalLM.save_pretrained``.

DST: a self-contained checkpoint that ``AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)``
loads with this package's code: config.json (model_type ``kimi_linear``, the released fields, ``auto_map`` to
our classes), the ``modeling_kimi_linear`` modules copied flat, the weights re-sharded under the released tensor
names (our canonical on-disk layout), generation_config.json and the tokenizer files (plus, for the released
``tiktoken.model``, a ``tokenizer.json`` built from it, which later loads read instead of converting the ranks).

Tensors are streamed chunk by chunk (memory does not grow with the checkpoint) and copied bit-exactly unless
``--dtype`` is given; ``A_log`` and ``dt_bias`` are never cast. The output is assembled next to DST and moved
into place only when complete: on any error nothing is left at DST.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__:
    from .checkpoint_io import (
        DTYPE_NAMES, FLOAT_DTYPES, PICKLE_SUFFIXES, TORCH_NAMES, CheckpointError, MiB, OutTensor, Summary,
        TensorEntry, check_destination, natural_key, parse_size, scan_checkpoint, stream_convert,
    )
else:  # run as a script from a checkout (python conversion/convert_released_checkpoint.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from checkpoint_io import (  # type: ignore[no-redef]
        DTYPE_NAMES, FLOAT_DTYPES, PICKLE_SUFFIXES, TORCH_NAMES, CheckpointError, MiB, OutTensor, Summary,
        TensorEntry, check_destination, natural_key, parse_size, scan_checkpoint, stream_convert,
    )

OUR_AUTO_MAP = {
    "AutoConfig": "configuration_kimi_linear.KimiLinearConfig",
    "AutoModel": "modeling_kimi_linear.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi_linear.KimiLinearForCausalLM",
}
# Vocabulary file -> (our tokenizer class, module of the package defining it).
OUR_TOKENIZERS = {
    "tiktoken.model": ("KimiTokenizer", "tokenization_kimi"),
    "tokenizer.model": ("KimiSentencePieceTokenizer", "tokenization_kimi_sp"),
}
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.jinja", "chat_template.json")
DOC_PREFIXES = ("README", "LICENSE", "NOTICE")
DTYPE_CHOICES = tuple(DTYPE_NAMES)


@dataclass
class Source:
    """A validated source checkpoint: its config and its tensors under the released names (nothing read yet)."""

    path: Path
    config: object  # KimiLinearConfig
    tensors: dict[str, TensorEntry]


# ---------------------------------------------------------------------------------------------------- source
def load_config(src: Path):
    """``KimiLinearConfig`` of ``src/config.json`` (released or native layout); errors name the file."""
    from modeling_kimi_linear import KimiLinearConfig

    path = Path(src) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    if data.get("model_type", "kimi_linear") != "kimi_linear":
        raise CheckpointError(f"{path}: model_type is {data['model_type']!r}, not 'kimi_linear'")
    if data.get("quantization_config"):
        method = data["quantization_config"].get("quant_method", "?") if isinstance(data["quantization_config"],
                                                                                   dict) else "?"
        raise CheckpointError(f"{path}: a quantized checkpoint ({method}); conversion reads unquantized weights: "
                              "convert the bf16 / fp32 checkpoint, then quantize when loading it")
    data.pop("auto_map", None)  # the source's remote code is not ours; DST gets its own auto_map
    try:
        return KimiLinearConfig(**data)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def released_name(name: str, config) -> str:
    """Released tensor name of ``name``: native transformers saves the dense layers' MLP as
    ``block_sparse_moe.{gate,up,down}_proj``; the release (and we) call it ``mlp.*``."""
    parts = name.split(".")
    if (len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and parts[3] == "block_sparse_moe" and parts[4] in ("gate_proj", "up_proj", "down_proj")
            and parts[5] == "weight" and int(parts[2]) < config.num_hidden_layers
            and not config.is_moe_layer(int(parts[2]))):
        return ".".join(parts[:3] + ["mlp"] + parts[4:])
    return name


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Released tensor names and shapes of a model built from ``config`` (on the meta device: no memory)."""
    import torch

    from modeling_kimi_linear import KimiLinearForCausalLM
    from modeling_kimi_linear.checkpoint_layout import released_key_shapes

    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    return released_key_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()})


def _first(names: list[str], count_word: str) -> str:
    more = f" (and {len(names) - 1} more {count_word})" if len(names) > 1 else ""
    return f"{names[0]!r}{more}"


def check_tensors(tensors: dict[str, TensorEntry], config, config_path: Path) -> None:
    """Unexpected / missing keys and shapes against the config (one error naming the first offender)."""
    expected = expected_shapes(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(set(tensors) - set(expected), key=natural_key)
    if unexpected:
        entry = tensors[unexpected[0]]
        raise CheckpointError(f"{entry.path}: unexpected tensor {_first(unexpected, 'unexpected')}: not part of "
                              f"a Kimi Linear model described by {config_path}")
    missing = sorted(set(expected) - set(tensors) - optional, key=natural_key)
    if missing:
        raise CheckpointError(f"missing tensor {_first(missing, 'missing')}: {config_path} needs it but no "
                              f"weight file in {config_path.parent} holds it")
    for name in sorted(tensors, key=natural_key):
        entry = tensors[name]
        if entry.shape != expected[name]:
            raise CheckpointError(f"{entry.path}: tensor {name!r} has shape {list(entry.shape)} but "
                                  f"{config_path} implies {list(expected[name])}")


def check_dtypes(tensors: dict[str, TensorEntry]) -> None:
    """Every tensor must be a float the converter can copy and cast."""
    for name in sorted(tensors, key=natural_key):
        entry = tensors[name]
        if entry.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{entry.path}: tensor {name!r} has dtype {entry.dtype}; a Kimi Linear checkpoint holds only "
                f"floating-point tensors ({', '.join(FLOAT_DTYPES)}); quantised checkpoints are not supported"
            )


def load_source(src: Path, check_against_config: bool = True) -> Source:
    """Scan and validate ``src``. ``check_against_config=False`` skips the key and shape checks against the
    config (for tests with synthetic tensor names, and for checkpoints the model does not describe); the
    file, index and dtype checks always run."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a directory")
    config = load_config(src)
    scanned = scan_checkpoint(src)
    tensors: dict[str, TensorEntry] = {}
    for name, entry in scanned.items():
        out = released_name(name, config)
        if out in tensors:
            raise CheckpointError(f"{entry.path}: tensors {name!r} and {tensors[out].name!r} both map to {out!r}")
        tensors[out] = entry
    if check_against_config:
        check_tensors(tensors, config, src / "config.json")
    check_dtypes(tensors)
    return Source(src, config, tensors)


def keeps_fp32(name: str) -> bool:
    """True for the parameters the model keeps in fp32 whatever the dtype (``A_log``, ``dt_bias``)."""
    from modeling_kimi_linear import KimiLinearPreTrainedModel

    parts = name.split(".")
    return any(module in parts for module in KimiLinearPreTrainedModel._keep_in_fp32_modules_strict)


def plan_tensors(source: Source, dtype: str | None) -> list[OutTensor]:
    """Output tensors in natural name order; floats cast to ``dtype`` ("bfloat16", ...) except fp32-kept ones."""
    target = DTYPE_NAMES[dtype] if dtype else None
    return [
        OutTensor(name, entry, entry.dtype if target is None or keeps_fp32(name) else target)
        for name, entry in sorted(source.tensors.items(), key=lambda item: natural_key(item[0]))
    ]


def stored_dtype(tensors: list[OutTensor]) -> str:
    """torch name of the dtype that holds most bytes (the checkpoint's ``dtype`` when the config has none)."""
    totals: dict[str, int] = {}
    for t in tensors:
        totals[t.dtype] = totals.get(t.dtype, 0) + t.nbytes
    return TORCH_NAMES[max(totals, key=totals.get)] if totals else "float32"


# ---------------------------------------------------------------------------------------------------- DST files
def package_dir() -> Path:
    import modeling_kimi_linear

    return Path(modeling_kimi_linear.__file__).resolve().parent


def code_files(entry_modules: tuple[str, ...] = ("configuration_kimi_linear", "modeling_kimi_linear")) -> list[Path]:
    """The package modules a checkpoint carries: the given modules plus everything they import relatively,
    found the way transformers' ``save_pretrained`` finds them (so both write the same set)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    files: set[Path] = set()
    for module in entry_modules:
        path = package_dir() / f"{module}.py"
        files.add(path)
        files.update(Path(p).resolve() for p in get_relative_import_files(str(path)))
    return sorted(files)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def our_config_dict(config, dtype: str) -> dict:
    """config.json for DST: released layout and fields, our ``auto_map`` (the keys ``save_pretrained`` writes)."""
    data = config.to_diff_dict()
    data["model_type"] = "kimi_linear"
    data["architectures"] = ["KimiLinearForCausalLM"]
    data["auto_map"] = dict(OUR_AUTO_MAP)
    data["dtype"] = dtype
    return data


def write_generation_config(src: Path, out: Path, config) -> None:
    """Copy SRC's generation_config.json (checked to be JSON), else derive one from the config's token ids."""
    path = src / "generation_config.json"
    if path.is_file():
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        shutil.copyfile(path, out / path.name)
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(config).save_pretrained(out)


def write_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Tokenizer step: copy the vocabulary and side files and point ``tokenizer_config.json`` at our tokenizer class
    (``auto_map`` to the module copied beside it, with the sibling modules it imports). The files are copied, not
    re-saved through ``KimiTokenizer``, so the release's own settings stay as they were. SRC's own tokenizer code is
    not copied (the released ``tokenization_kimi.py`` does not import on transformers 5). A rank file also gets a
    ``tokenizer.json`` (:func:`write_tokenizer_json`). Returns the files written."""
    for vocab, (cls, module) in OUR_TOKENIZERS.items():
        if (src / vocab).is_file():
            break
    else:  # no known vocabulary: keep whatever tokenizer files there are as they are
        written = []
        for name in (*TOKENIZER_SIDE_FILES, "tokenizer.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
                written.append(name)
        return written
    written = [vocab]
    shutil.copyfile(src / vocab, out / vocab)
    for name in TOKENIZER_SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            written.append(name)
    config_path = out / "tokenizer_config.json"
    try:
        tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{src / 'tokenizer_config.json'}: not valid JSON ({exc})") from None
    tok_config["tokenizer_class"] = cls
    tok_config["auto_map"] = {"AutoTokenizer": [f"{module}.{cls}", None]}
    write_json(config_path, tok_config)
    if "tokenizer_config.json" not in written:
        written.append("tokenizer_config.json")
    if (package_dir() / f"{module}.py").is_file():
        for path in code_files((module,)):
            if not (out / path.name).exists():
                shutil.copyfile(path, out / path.name)
                written.append(path.name)
    else:
        print(f"note: {module}.py is not part of this version of modeling_kimi_linear; AutoTokenizer will load "
              f"{cls} from DST once the file is copied there", file=sys.stderr)
        return written
    if vocab == "tiktoken.model":
        written.append(write_tokenizer_json(out))
    return written


def write_tokenizer_json(out: Path) -> str:
    """Build ``KimiTokenizer`` from the rank file and side files just written to ``out`` and save its Rust
    tokenizer as ``tokenizer.json``, the file transformers' fast tokenizers and other tools (vLLM, ``tokenizers``)
    read: later loads take it instead of turning the 163,840 ranks into BPE merges again (0.4 s against 1.5 s on a
    2-core CPU for a synthetic vocabulary of that size; the file is ~16 MB). The rank file stays, for the released
    tokenizer class and for export."""
    from modeling_kimi_linear.tokenization_kimi import TOKENIZER_FILE_NAME, KimiTokenizer

    tokenizer = KimiTokenizer.from_pretrained(out)
    tokenizer.backend_tokenizer.save(str(out / TOKENIZER_FILE_NAME))
    return TOKENIZER_FILE_NAME


def copy_docs(src: Path, out: Path) -> None:
    """Copy README / LICENSE / NOTICE files (the licence travels with the weights)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name.upper().startswith(DOC_PREFIXES) and not path.suffix == ".py":
            shutil.copyfile(path, out / path.name)


def our_extras(source: Source, tensors: list[OutTensor], dtype: str | None) -> Callable[[Path], None]:
    """Everything but the weights, written into the staging directory."""
    config_dtype = dtype or getattr(source.config, "dtype", None) or stored_dtype(tensors)
    if not isinstance(config_dtype, str):  # a torch.dtype
        config_dtype = str(config_dtype).removeprefix("torch.")

    def write(out: Path) -> None:
        write_json(out / "config.json", our_config_dict(source.config, config_dtype))
        for path in code_files():
            shutil.copyfile(path, out / path.name)
        write_generation_config(source.path, out, source.config)
        write_tokenizer_files(source.path, out)
        copy_docs(source.path, out)

    return write


# ---------------------------------------------------------------------------------------------------- driver
def run(
    src: Path,
    dst: Path,
    make_extras: Callable[[Source, list[OutTensor], str | None], Callable[[Path], None]],
    *,
    dtype: str | None = None,
    max_shard_size: int = 5 * 10**9,
    verify: bool = False,
    overwrite: bool = False,
    check_against_config: bool = True,
    memory_budget_bytes: int | None = None,
) -> Summary:
    """Shared by convert and export: check DST, validate SRC, stream the tensors, add the other files."""
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise CheckpointError(f"--dtype {dtype!r} must be one of {', '.join(DTYPE_NAMES)}")
    check_destination(src, dst, overwrite)
    source = load_source(src, check_against_config=check_against_config)
    tensors = plan_tensors(source, dtype)
    extra = sum(p.stat().st_size for p in src.iterdir()  # config, tokenizer, docs: whatever is not weights
                if p.is_file() and not p.name.lower().endswith((".safetensors", *PICKLE_SUFFIXES)))
    if (src / "tiktoken.model").is_file():  # the tokenizer.json written from it: vocabulary and merges, ~4x
        extra += 6 * (src / "tiktoken.model").stat().st_size
    return stream_convert(
        tensors, dst, write_extras=make_extras(source, tensors, dtype), max_shard_size=max_shard_size,
        memory_budget_bytes=memory_budget_bytes, verify=verify, overwrite=overwrite, extra_bytes=extra + 16 * MiB,
    )


def convert_checkpoint(
    src: Path | str,
    dst: Path | str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    verify: bool = False,
    overwrite: bool = False,
    check_against_config: bool = True,
    memory_budget_bytes: int | None = None,
) -> Summary:
    """Convert ``src`` (released or native-saved) into our self-contained layout at ``dst``.

    ``check_against_config=False`` skips the tensor key / shape checks against the config (documented escape
    hatch for tests with synthetic tensors); ``memory_budget_bytes`` bounds the copy buffers (default: twice the
    largest tensor plus 1 GiB). Raises :class:`CheckpointError` on bad input; nothing is then left at ``dst``.
    """
    return run(Path(src), Path(dst), our_extras, dtype=dtype, max_shard_size=parse_size(max_shard_size),
               verify=verify, overwrite=overwrite, check_against_config=check_against_config,
               memory_budget_bytes=memory_budget_bytes)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="source checkpoint directory")
    parser.add_argument("dst", type=Path, help="destination directory (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="cast floating tensors (A_log and dt_bias stay as stored); default: bit-exact copy")
    parser.add_argument("--max-shard-size", type=size_arg, default=parse_size("5GB"), metavar="SIZE",
                        help="largest shard, e.g. 5GB (10^9), 4GiB (2^30), 500MB; default 5GB")
    parser.add_argument("--verify", action="store_true",
                        help="re-read DST and compare every tensor with SRC before finishing")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--memory-budget", type=size_arg, default=None, metavar="SIZE",
                        help="bound on the copy buffers (default: 2 x largest tensor + 1 GiB)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on bad input, with one message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        summary = convert_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     verify=args.verify, overwrite=args.overwrite,
                                     memory_budget_bytes=args.memory_budget)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
