"""Export one of our checkpoints into the released Moonshot layout (for native transformers and vLLM).

    python conversion/export_released_checkpoint.py SRC DST [--dtype bfloat16] [--max-shard-size 5GB]
        [--verify] [--overwrite] [--remote-code-from ORIGINAL_DIR]

SRC: a directory written by ``convert_released_checkpoint.py`` or by our ``save_pretrained`` (any directory the
converter accepts works). DST gets Moonshot's tensor names (re-sharded, bit-exact unless ``--dtype``), a
config.json with ``linear_attn_config``, Moonshot's fields and Moonshot's ``auto_map``
(``configuration_kimi.KimiLinearConfig`` / ``modeling_kimi.KimiLinearForCausalLM``), generation_config.json and
the tokenizer files with the released ``TikTokenTokenizer`` naming. None of our ``.py`` files are copied: native
transformers and vLLM bring their own code; ``--remote-code-from`` copies Moonshot's ``*.py`` files from an
original release directory for ``trust_remote_code=True`` users.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

if __package__:
    from .checkpoint_io import CheckpointError, OutTensor, Summary, parse_size
    from .convert_released_checkpoint import (
        TOKENIZER_SIDE_FILES, Source, add_common_arguments, copy_docs, run, stored_dtype, write_generation_config,
        write_json,
    )
else:  # run as a script from a checkout (python conversion/export_released_checkpoint.py): make its package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from checkpoint_io import CheckpointError, OutTensor, Summary, parse_size  # type: ignore[no-redef]
    from convert_released_checkpoint import (  # type: ignore[no-redef]
        TOKENIZER_SIDE_FILES, Source, add_common_arguments, copy_docs, run, stored_dtype, write_generation_config,
        write_json,
    )

MOONSHOT_AUTO_MAP = {
    "AutoConfig": "configuration_kimi.KimiLinearConfig",
    "AutoModel": "modeling_kimi.KimiLinearModel",
    "AutoModelForCausalLM": "modeling_kimi.KimiLinearForCausalLM",
}
MOONSHOT_TOKENIZER = ("TikTokenTokenizer", {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]})
# The keys of the released config.json (reference_model.md section 1.1), all written.
MOONSHOT_CONFIG_KEYS = (
    "architectures", "auto_map", "model_type", "vocab_size", "hidden_size", "num_hidden_layers",
    "intermediate_size", "hidden_act", "head_dim", "num_attention_heads", "num_key_value_heads", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mla_use_nope", "rope_theta",
    "rope_scaling", "model_max_length", "linear_attn_config", "num_experts", "num_experts_per_token",
    "moe_intermediate_size", "num_shared_experts", "first_k_dense_replace", "moe_layer_freq",
    "moe_router_activation_func", "moe_renormalize", "routed_scaling_factor", "use_grouped_topk",
    "num_expert_group", "topk_group", "num_nextn_predict_layers", "rms_norm_eps", "initializer_range",
    "tie_word_embeddings", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
    "transformers_version",
)
# Keys Moonshot's configuration_kimi.py also knows: written only when they differ from the default.
MOONSHOT_OPTIONAL_KEYS = {"router_aux_loss_coef": 0.0}


def released_config_dict(config, dtype: str) -> dict:
    """Moonshot's config.json for ``config``: the released keys, plus keys the source config carried that
    neither Moonshot nor we define (kept as they were); our own settings are dropped."""
    from modeling_kimi_linear import KimiLinearConfig

    ours = config.to_dict()
    own_keys = set(KimiLinearConfig().to_dict())
    data = {key: ours.get(key) for key in MOONSHOT_CONFIG_KEYS}
    for key, default in MOONSHOT_OPTIONAL_KEYS.items():
        if ours.get(key, default) != default:
            data[key] = ours[key]
    for key, value in config.to_diff_dict().items():
        if key not in own_keys and key not in data:
            data[key] = value
    data.update(model_type="kimi_linear", architectures=["KimiLinearForCausalLM"], auto_map=dict(MOONSHOT_AUTO_MAP),
                dtype=dtype)
    if not getattr(config, "router_weights_include_bias", True):
        print("warning: router_weights_include_bias=False cannot be expressed in the released config; Moonshot's "
              "code weights experts with the bias-corrected scores, vLLM and native transformers with the raw "
              "scores", file=sys.stderr)
    return data


def write_released_tokenizer_files(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer files; where the vocabulary is ``tiktoken.model``, name the released
    ``TikTokenTokenizer`` (``tokenization_kimi.py`` of the release) in ``tokenizer_config.json``."""
    written = []
    for name in ("tiktoken.model", "tokenizer.model", "tokenizer.json", *TOKENIZER_SIDE_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            written.append(name)
    config_path = out / "tokenizer_config.json"
    if "tiktoken.model" in written:
        try:
            tok_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{src / 'tokenizer_config.json'}: not valid JSON ({exc})") from None
        tok_config["tokenizer_class"], auto_map = MOONSHOT_TOKENIZER
        tok_config["auto_map"] = json.loads(json.dumps(auto_map))
        write_json(config_path, tok_config)
        if "tokenizer_config.json" not in written:
            written.append("tokenizer_config.json")
    elif "tokenizer.model" in written:
        print("note: the sentencepiece tokenizer has no released counterpart; its tokenizer_config.json still names "
              "our class, whose module is not copied", file=sys.stderr)
    return written


def released_extras(remote_code_from: Path | None) -> Callable[[Source, list[OutTensor], str | None],
                                                                Callable[[Path], None]]:
    """Factory for the non-weight files of the released layout."""
    if remote_code_from is not None:
        code = sorted(Path(remote_code_from).glob("*.py"))
        if not code:
            raise CheckpointError(f"--remote-code-from {remote_code_from}: no .py files there")
    else:
        code = []

    def make(source: Source, tensors: list[OutTensor], dtype: str | None) -> Callable[[Path], None]:
        gate = getattr(source.config, "kda_gate_granularity", "channel")
        if gate != "channel":
            raise CheckpointError(
                f"{source.path}: kda_gate_granularity={gate!r} (a per-head forget gate) has no released layout; "
                "Moonshot's code, vLLM and native transformers load only per-channel KDA gates"
            )
        config_dtype = dtype or getattr(source.config, "dtype", None) or stored_dtype(tensors)
        if not isinstance(config_dtype, str):
            config_dtype = str(config_dtype).removeprefix("torch.")

        def write(out: Path) -> None:
            write_json(out / "config.json", released_config_dict(source.config, config_dtype))
            write_generation_config(source.path, out, source.config)
            write_released_tokenizer_files(source.path, out)
            copy_docs(source.path, out)
            for path in code:
                shutil.copyfile(path, out / path.name)

        return write

    return make


def export_checkpoint(
    src: Path | str,
    dst: Path | str,
    *,
    dtype: str | None = None,
    max_shard_size: int | str = "5GB",
    verify: bool = False,
    overwrite: bool = False,
    remote_code_from: Path | str | None = None,
    memory_budget_bytes: int | None = None,
) -> Summary:
    """Write ``src`` in the released layout at ``dst`` (see the module docstring); raises
    :class:`CheckpointError` on bad input, leaving nothing at ``dst``."""
    extras = released_extras(Path(remote_code_from) if remote_code_from is not None else None)
    return run(Path(src), Path(dst), extras, dtype=dtype, max_shard_size=parse_size(max_shard_size),
               verify=verify, overwrite=overwrite, memory_budget_bytes=memory_budget_bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--remote-code-from", type=Path, metavar="ORIGINAL_DIR",
                        help="copy Moonshot's *.py files (configuration_kimi.py, modeling_kimi.py, "
                             "tokenization_kimi.py) from an original release directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on bad input, with one message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        summary = export_checkpoint(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    verify=args.verify, overwrite=args.overwrite,
                                    remote_code_from=args.remote_code_from, memory_budget_bytes=args.memory_budget)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
