"""Fine-tune a Kimi Linear model on a local text or chat dataset with ``transformers.Trainer`` (full or LoRA).

The model is one of our checkpoints (``--model DIR``, any directory ``KimiLinearForCausalLM.from_pretrained`` reads:
ours, the released layout, a native-transformers save) or a random initialisation from a preset
(``--preset tiny|small``). ``--model-class native`` trains transformers' own ``KimiLinearForCausalLM`` with the same
configuration instead, so the same command measures the native baseline.

Data (``--train-file``, optional ``--eval-file``):

* ``.txt``: documents separated by blank lines (a file without blank lines is one document);
* ``.jsonl`` with a ``"text"`` string per line: one document per line;
* ``.jsonl`` with ``"messages"`` (``[{"role": ..., "content": ...}, ...]``) per line: conversations rendered with the
  tokenizer's chat template, the loss on the assistant turns only where they can be found (``{% generation %}``
  markers, or a template that only appends turns, such as Kimi's), else on every token (see :func:`encode_chat`).

Each document is encoded without special tokens, followed by the end-of-sequence token, and cut into pieces of at
most ``--block-size`` tokens; a conversation longer than ``--block-size`` is truncated. A batch is either padded to
its longest piece, or with ``--packing`` flattened into one row whose ``position_ids`` restart at every piece
(``transformers.DataCollatorWithFlattening``; the model keeps the pieces apart, so no token is wasted on padding).

Output (``--output-dir``, written under a temporary name and renamed at the end): the model (``--lora``: the adapter,
plus the randomly initialised base under ``base/`` when it came from a preset; ``--merge-lora``: also the merged
model under ``merged/``), the tokenizer, and ``metrics.json`` (first/last training losses, non-padding tokens per
second of training, eval loss, settings).

    python examples/finetune.py --preset tiny --byte-tokenizer --train-file corpus.txt --max-steps 30 --output-dir out
    python examples/finetune.py --model ckpt/ --train-file chat.jsonl --lora --bf16 --packing --output-dir out-lora
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing the package
    sys.path.insert(0, str(ROOT))

IGNORE_INDEX = -100
# the byte tokenizer: ids 0-2 are special, byte b is id BYTE_OFFSET + b
BYTE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_OFFSET = len(BYTE_SPECIAL_TOKENS)
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}</s>{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# LoRA target names; "experts" means the fused routed-expert weights (through peft's target_parameters)
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,kv_a_proj_with_mqa,kv_b_proj,gate_proj,up_proj,down_proj,experts"
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class FinetuneError(ValueError):
    """A problem with the command line or the input files; reported as one line, nothing is written."""


# ---------------------------------------------------------------------------------------------------- tokenizer
def build_byte_tokenizer():
    """A self-contained byte tokenizer: ``<pad>``=0, ``<s>``=1, ``</s>``=2 and byte ``b`` = ``3 + b`` (259 ids),
    with a small chat template that marks assistant turns for the loss mask. Saved as an ordinary
    ``tokenizer.json``, so ``AutoTokenizer.from_pretrained`` reloads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # the byte-level pre-tokenizer's alphabet

    vocab = {token: i for i, token in enumerate(BYTE_SPECIAL_TOKENS)}
    vocab.update({char: BYTE_OFFSET + byte for byte, char in bytes_to_unicode().items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1 << 30
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(args: argparse.Namespace):
    """``--byte-tokenizer``, ``--tokenizer DIR``, or the tokenizer saved with ``--model DIR`` (this package's
    tokenizer classes load their own files, others come through ``AutoTokenizer`` with ``trust_remote_code``)."""
    if args.byte_tokenizer:
        return build_byte_tokenizer()
    from modeling_kimi_linear import load_tokenizer as load_checkpoint_tokenizer

    source = args.tokenizer or args.model
    if source is None:
        raise FinetuneError("--preset has no tokenizer: pass --tokenizer DIR or --byte-tokenizer")
    try:
        return load_checkpoint_tokenizer(source)
    except (OSError, ValueError) as err:
        raise FinetuneError(f"no tokenizer could be loaded from {source}: {err}") from err


def supports_assistant_mask(tokenizer) -> bool:
    """True if the chat template marks assistant tokens (``{% generation %}``) and the tokenizer is a fast one
    (transformers maps the marked characters to tokens through the fast tokenizer's offsets)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return bool(template) and bool(_GENERATION_BLOCK.search(template)) and bool(getattr(tokenizer, "is_fast", False))


# ---------------------------------------------------------------------------------------------------- data
def read_records(path: Path) -> list[dict[str, Any]]:
    """Documents / conversations of a ``.txt`` or ``.jsonl`` file as ``{"text": str}`` / ``{"messages": list}``.

    Raises :class:`FinetuneError` naming the file (and line) for a missing file, an unknown extension, a line that
    is not a JSON object, a missing or malformed field, or a file without any document."""
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FinetuneError(f"{path}: not UTF-8 text ({err})") from err
    records: list[dict[str, Any]] = []
    if suffix == ".txt":
        records = [{"text": doc.strip("\n")} for doc in re.split(r"\n\s*\n", content) if doc.strip()]
    elif suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise FinetuneError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise FinetuneError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if "text" in row:
                if not isinstance(row["text"], str):
                    raise FinetuneError(f"{where}: field 'text' must be a string")
                if row["text"]:
                    records.append({"text": row["text"]})
            elif "messages" in row:
                records.append({"messages": _check_messages(row["messages"], where)})
            else:
                raise FinetuneError(f"{where}: needs a 'text' or a 'messages' field (has {sorted(row)})")
    else:
        raise FinetuneError(f"{path}: unsupported extension {path.suffix!r}; use .txt or .jsonl")
    if not records:
        raise FinetuneError(f"{path}: no documents")
    return records


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise FinetuneError(f"{where}: field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FinetuneError(f"{where}: messages[{i}] must be an object with a string 'role'")
        if not isinstance(message.get("content"), str):
            raise FinetuneError(f"{where}: messages[{i}] needs a string 'content'")
    return messages


@dataclass
class EncodeStats:
    """What :func:`encode_records` did, for the log. ``chat_modes`` counts conversations per loss mask (see
    :func:`encode_chat`)."""

    documents: int = 0
    conversations: int = 0
    pieces: int = 0
    tokens: int = 0
    truncated: int = 0
    skipped: int = 0
    chat_modes: dict[str, int] = field(default_factory=dict)


def split_into_blocks(ids: list[int], block_size: int) -> list[list[int]]:
    """Consecutive pieces of at most ``block_size`` tokens; a last piece of one token (nothing to predict) is
    dropped."""
    pieces = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    return [piece for piece in pieces if len(piece) > 1]


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int], str]:
    """``(input_ids, labels, mode)`` of one conversation, the loss restricted to the assistant turns if possible.

    ``mode`` says how: ``"markers"``: the template's ``{% generation %}`` blocks (fast tokenizers);
    ``"prefixes"``: assistant turn ``i`` is what rendering ``messages[:i+1]`` adds to rendering ``messages[:i]`` with
    the generation prompt (works for templates that only append, such as Kimi's; the turn's end-of-turn token is
    learnt, the ``<|im_assistant|>assistant<|im_middle|>`` header is not); ``"all"``: neither works (a template that
    rewrites earlier turns), so every token is a label.
    """
    if supports_assistant_mask(tokenizer):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, out["assistant_masks"])], "markers"
    ids = _render(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    try:
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, messages[:i], generation_prompt=True) if i else []
            upto = _render(tokenizer, messages[: i + 1])
            if ids[: len(before)] != before or ids[: len(upto)] != upto or len(upto) <= len(before):
                return ids, list(ids), "all"
            labels[len(before) : len(upto)] = ids[len(before) : len(upto)]
    except Exception:  # noqa: BLE001 - a template may refuse partial conversations; then learn everything
        return ids, list(ids), "all"
    return ids, labels, "prefixes"


def encode_records(
    records: list[dict[str, Any]], tokenizer, block_size: int, vocab_size: int, source: Path
) -> tuple[list[dict[str, list[int]]], EncodeStats]:
    """Tokenise documents (+ end of sequence, cut into ``block_size`` pieces) and conversations (chat template,
    truncated to ``block_size``) into ``{"input_ids", "labels"}`` examples."""
    stats = EncodeStats()
    examples: list[dict[str, list[int]]] = []
    eos = tokenizer.eos_token_id
    if any("messages" in r for r in records) and not getattr(tokenizer, "chat_template", None):
        raise FinetuneError(f"{source} holds conversations ('messages') but the tokenizer has no chat template")
    for record in tqdm(records, desc=f"tokenising {source.name}", unit="doc", disable=None):
        if "text" in record:
            stats.documents += 1
            ids = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
            for piece in split_into_blocks(ids, block_size):
                examples.append({"input_ids": piece, "labels": list(piece)})
        else:
            stats.conversations += 1
            ids, labels, mode = encode_chat(tokenizer, record["messages"])
            stats.chat_modes[mode] = stats.chat_modes.get(mode, 0) + 1
            if len(ids) > block_size:
                stats.truncated += 1
                ids, labels = ids[:block_size], labels[:block_size]
            if sum(label != IGNORE_INDEX for label in labels[1:]) == 0:
                stats.skipped += 1  # nothing to learn from (no assistant token left)
                continue
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise FinetuneError(f"{source}: no training example left after tokenisation (block size {block_size})")
    top = max(max(e["input_ids"]) for e in examples)
    if top >= vocab_size:
        raise FinetuneError(
            f"{source}: the tokenizer produced id {top}, outside the model's vocabulary (vocab_size={vocab_size})"
        )
    stats.pieces = len(examples)
    stats.tokens = sum(len(e["input_ids"]) for e in examples)
    return examples, stats


class TokenizedDataset(Dataset):
    """A list of ``{"input_ids", "labels"}`` examples as a torch ``Dataset`` (no ``datasets`` dependency)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class PaddingCollator:
    """Right-pads a batch to its longest example: ``attention_mask`` 0 and labels -100 at the padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackingCollator:
    """``DataCollatorWithFlattening`` (one row, ``position_ids`` restarting at every example, the first label of
    each example -100). ``native_kwargs`` adds the boundaries native transformers' kernels read (``cu_seqlens``
    for FLA's chunked KDA, ``seq_idx`` for ``causal_conv1d``); our model finds them in ``position_ids``."""

    def __init__(self, native_kwargs: bool = False) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True)
        self.native_kwargs = native_kwargs

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.flatten(features)
        if self.native_kwargs:
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["cu_seqlens"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(features)), lengths)[None].to(torch.int32)
        return batch


# ---------------------------------------------------------------------------------------------------- model
def native_config(config):
    """transformers' native ``KimiLinearConfig`` with the values of our config (it reads the released layout
    that :meth:`KimiLinearConfig.to_dict` writes: ``linear_attn_config``, ``first_k_dense_replace``, ...)."""
    from transformers import KimiLinearConfig as NativeConfig

    values = config.to_dict()
    for key in ("auto_map", "architectures", "transformers_version"):
        values.pop(key, None)
    return NativeConfig(**values)


def load_model(args: argparse.Namespace):
    """The model to train (fp32 weights unless ``--dtype bfloat16``)."""
    from transformers import set_seed

    from modeling_kimi_linear import KimiLinearForCausalLM
    from modeling_kimi_linear.presets import load_preset

    set_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    if args.preset:
        try:
            load_preset(args.preset)
        except FileNotFoundError as err:
            raise FinetuneError(f"--preset: {err}") from err
    if args.model_class == "native":
        from transformers import KimiLinearForCausalLM as NativeModel

        if args.preset:
            model = NativeModel(native_config(load_preset(args.preset))).to(dtype)
        else:
            model = NativeModel.from_pretrained(args.model, dtype=dtype)
    else:
        overrides = {"router_aux_loss_coef": args.router_aux_loss_coef} if args.router_aux_loss_coef else {}
        if args.preset and args.init_on_device:
            from modeling_kimi_linear.random_weights import build_random_model

            device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
            model = build_random_model(load_preset(args.preset, **overrides), device, dtype).train()
        elif args.preset:
            model = KimiLinearForCausalLM(load_preset(args.preset, **overrides)).to(dtype)
        else:
            model = KimiLinearForCausalLM.from_pretrained(args.model, dtype=dtype, **overrides)
        if args.router_aux_loss_coef:
            model.config.output_router_logits = True  # the balance loss is computed from the router logits
    return model


def lora_config(args: argparse.Namespace):
    """A ``peft.LoraConfig`` from ``--lora-targets`` (module names; ``experts`` = the fused routed experts)."""
    from peft import LoraConfig

    names = [n.strip() for n in args.lora_targets.split(",") if n.strip()]
    if not names:
        raise FinetuneError("--lora-targets is empty")
    modules = [n for n in names if n != "experts"]
    parameters = list(EXPERT_PARAMETERS) if "experts" in names else []
    if parameters and args.lora_dropout:
        raise FinetuneError("--lora-dropout must be 0 when 'experts' is a LoRA target (peft's parameter LoRA has none)")
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=modules or None,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
    )


def apply_lora(model, args: argparse.Namespace):
    """Wrap ``model`` in a ``PeftModel``; only the adapter weights train."""
    from peft import get_peft_model

    config = lora_config(args)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise FinetuneError(f"--lora-targets {args.lora_targets!r}: {err}") from err


# ---------------------------------------------------------------------------------------------------- training
class StepClock:
    """Trainer callback recording (wall time, non-padding tokens seen) after every optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers signature
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        self.marks: list[tuple[float, int]] = []
        self.callback = _Callback()

    def tokens_per_second_after(self, warmup: int) -> float | None:
        """Throughput between the end of step ``warmup`` and the last step (``None`` with too few steps)."""
        if len(self.marks) <= warmup or warmup < 1:
            return None
        (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None


def prepare_output_dir(path: Path, overwrite: bool) -> Path:
    """Check ``--output-dir`` and return the staging directory everything is written to first."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FinetuneError(f"--output-dir {path} exists and is not empty (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like any new directory
    return stage


def publish(stage: Path, path: Path) -> None:
    """Move the finished staging directory to ``path`` (replacing an old one only now)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(stage, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (ours, released or native-saved layout)")
    src.add_argument("--preset", help="random initialisation from a configuration preset (tiny, small, demo, "
                                       "kimi_linear_48b_a3b)")
    parser.add_argument("--model-class", choices=["ours", "native"], default="ours",
                        help="our KimiLinearForCausalLM (default) or transformers' native one, same configuration")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the loaded weights (default float32; --bf16 adds mixed precision)")
    parser.add_argument("--init-on-device", action="store_true",
                        help="--preset: build the model on the meta device and draw its random weights directly on "
                             "the training device in --dtype, with no full-size copy on the CPU first (the 48B "
                             "layout is 98 GB in bf16)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="tokenizer directory (default: the --model directory)")
    tok.add_argument("--byte-tokenizer", action="store_true",
                     help="built-in byte tokenizer (259 ids: <pad> <s> </s> + 256 bytes), no files needed")
    parser.add_argument("--train-file", required=True, type=Path, help=".txt, or .jsonl with 'text' or 'messages'")
    parser.add_argument("--eval-file", type=Path, help="held-out file in the same formats; eval loss at the end")
    parser.add_argument("--output-dir", required=True, type=Path, help="where the model, tokenizer, metrics go")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per training example at most")
    parser.add_argument("--packing", action="store_true",
                        help="flatten each batch into one row with restarting position_ids (no padding)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per device and micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (default: --epochs epochs)")
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs when --max-steps is not given")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps")
    parser.add_argument("--scheduler", default="linear", help="transformers lr_scheduler_type (linear, cosine, ...)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed of initialisation, LoRA init and data order")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (autocast)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations per layer")
    parser.add_argument("--router-aux-loss-coef", type=float, default=0.0,
                        help="weight of the router load-balancing loss (ours only; 0 = off)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (scale alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (0 if 'experts' is a target)")
    parser.add_argument("--lora-targets", default=DEFAULT_LORA_TARGETS,
                        help="comma-separated module names; 'experts' = the routed experts' fused weights "
                             f"(default: {DEFAULT_LORA_TARGETS})")
    parser.add_argument("--merge-lora", nargs="?", const="save", choices=["save", "check"],
                        help="merge the adapters into the base after training and compare the merged model's logits "
                             "with the adapted model's (metrics.json: merge_check); 'save' (the default) also "
                             "writes the merged model under merged/, 'check' writes nothing more")
    parser.add_argument("--skip-base", action="store_true",
                        help="--lora on a --preset: do not write the random base under base/ (the adapters are then "
                             "for measuring only)")
    parser.add_argument("--logging-steps", type=int, default=1, help="log the training loss every N steps")
    parser.add_argument("--warmup-steps-excluded", type=int, default=5,
                        help="steps left out of the steady-state tokens/s figure")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    args = parser.parse_args(argv)
    for name in ("block_size", "batch_size", "grad_accum", "lora_r", "logging_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.block_size < 2:
        parser.error("--block-size must be >= 2")
    if args.merge_lora and not args.lora:
        parser.error("--merge-lora needs --lora")
    if args.init_on_device and (not args.preset or args.model_class != "ours"):
        parser.error("--init-on-device needs --preset and --model-class ours")
    if args.skip_base and not (args.lora and args.preset):
        parser.error("--skip-base needs --lora and --preset")
    return args


def check_combinations(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if args.model_class == "native":
        if args.router_aux_loss_coef:
            raise FinetuneError("--router-aux-loss-coef: native transformers computes no router balance loss")
        if args.packing:
            missing = [name for name in ("fla", "causal_conv1d") if importlib.util.find_spec(name) is None]
            if args.cpu or not torch.cuda.is_available() or missing:
                raise FinetuneError(
                    "--model-class native --packing needs CUDA with flash-linear-attention (fla) and causal-conv1d: "
                    "native transformers' fallbacks cannot keep packed documents apart"
                    + (f" (not installed: {', '.join(missing)})" if missing else "")
                )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, train, save; return the metrics (also written to ``metrics.json``)."""
    from transformers import Trainer, TrainingArguments

    check_combinations(args)
    tokenizer = load_tokenizer(args)
    train_records = read_records(args.train_file)
    eval_records = read_records(args.eval_file) if args.eval_file else None
    stage = prepare_output_dir(args.output_dir, args.overwrite)
    try:
        model = load_model(args)
        vocab_size = model.config.vocab_size
        train_examples, stats = encode_records(train_records, tokenizer, args.block_size, vocab_size, args.train_file)
        print(f"train: {stats.documents} documents, {stats.conversations} conversations -> {stats.pieces} examples, "
              f"{stats.tokens} tokens")
        if stats.chat_modes:
            print(f"chat loss masks: {stats.chat_modes} (markers/prefixes: assistant turns only; all: every token)")
        if stats.truncated or stats.skipped:
            print(f"note: {stats.truncated} conversations truncated to {args.block_size} tokens, "
                  f"{stats.skipped} without assistant tokens skipped")
        eval_dataset = None
        if eval_records is not None:
            eval_examples, _ = encode_records(eval_records, tokenizer, args.block_size, vocab_size, args.eval_file)
            eval_dataset = TokenizedDataset(eval_examples)

        if args.lora and args.preset and not args.skip_base:  # the random base exists nowhere else: keep it
            model.save_pretrained(stage / "base")
            tokenizer.save_pretrained(stage / "base")
        if args.gradient_checkpointing and args.lora:
            # with non-reentrant checkpointing the frozen embeddings need no requires_grad hook
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.lora:
            model = apply_lora(model, args)
            model.print_trainable_parameters()

        if args.packing:
            collator = PackingCollator(native_kwargs=args.model_class == "native")
        else:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
            collator = PaddingCollator(pad)
        training_args = TrainingArguments(
            output_dir=str(stage / "trainer"),
            max_steps=args.max_steps,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            gradient_accumulation_steps=args.grad_accum,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            lr_scheduler_type=args.scheduler,
            weight_decay=args.weight_decay,
            logging_steps=args.logging_steps,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            seed=args.seed,
            bf16=args.bf16,
            **checkpointing_arguments(args.gradient_checkpointing and not args.lora),
            use_cpu=args.cpu,
            remove_unused_columns=False,
            # padded batches carry an attention_mask to count real tokens by; a packed row has no padding at all
            include_num_input_tokens_seen="all" if args.packing else "non_padding",
            dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
        )
        clock = StepClock()
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=TokenizedDataset(train_examples),
            eval_dataset=eval_dataset,
            data_collator=collator,
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
        result = trainer.train()
        metrics = summarise(args, trainer, result.metrics, clock, model, stats)
        if eval_dataset is not None:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        print_summary(metrics)

        shutil.rmtree(stage / "trainer", ignore_errors=True)
        if args.router_aux_loss_coef:  # a training setting: inference need not return router logits
            base_config = model.get_base_model().config if args.lora else model.config
            base_config.output_router_logits = False
        check = save_outputs(args, model, tokenizer, stage, train_examples[0]["input_ids"][:256])
        if check is not None:
            metrics["merge_check"] = check
        metrics.update(peak_memory())  # after the merge: it allocates too
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        publish(stage, args.output_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return metrics


def checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """TrainingArguments for (non-reentrant) activation checkpointing, under the field names this transformers
    version uses (``activation_checkpointing`` from 5.2x, ``gradient_checkpointing`` before); none when off."""
    if not enabled:
        return {}
    from dataclasses import fields

    from transformers import TrainingArguments

    prefix = "activation" if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)} else "gradient"
    return {f"{prefix}_checkpointing": True, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def summarise(args, trainer, train_metrics: dict, clock: StepClock, model, stats: EncodeStats) -> dict[str, Any]:
    """Losses, throughput and settings as a JSON-ready dict."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    runtime = float(train_metrics["train_runtime"])
    tokens = int(trainer.state.num_input_tokens_seen)
    head, tail = losses[:5], losses[-5:]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "model_class": args.model_class,
        "model": args.model or f"preset:{args.preset}",
        "lora": args.lora,
        "packing": args.packing,
        "bf16": args.bf16,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "steps": trainer.state.global_step,
        "train_examples": stats.pieces,
        "chat_loss_masks": stats.chat_modes,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_first5_mean": sum(head) / len(head) if head else None,
        "train_loss_last5_mean": sum(tail) / len(tail) if tail else None,
        "train_losses": losses,
        "train_tokens": tokens,
        "train_runtime_s": runtime,
        "tokens_per_second": tokens / runtime if runtime > 0 else None,
        "tokens_per_second_after_warmup": clock.tokens_per_second_after(args.warmup_steps_excluded),
        "warmup_steps_excluded": args.warmup_steps_excluded,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "device": str(trainer.args.device) + (f" ({torch.cuda.get_device_name()})"
                                              if trainer.args.device.type == "cuda" else ""),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        **peak_memory(),
    }


def print_summary(metrics: dict[str, Any]) -> None:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"train loss: first {fmt(metrics['train_loss_first'])}, last {fmt(metrics['train_loss_last'])} "
          f"(mean of first 5 {fmt(metrics['train_loss_first5_mean'])}, last 5 {fmt(metrics['train_loss_last5_mean'])})")
    steady = metrics["tokens_per_second_after_warmup"]
    print(f"tokens/s: {metrics['tokens_per_second']:.1f} ({metrics['train_tokens']} non-padding tokens in "
          f"{metrics['train_runtime_s']:.2f} s; after {metrics['warmup_steps_excluded']} steps: "
          f"{'n/a' if steady is None else f'{steady:.1f}'})")
    print(f"peak memory: {metrics['peak_memory_GB']} GB ({metrics['peak_memory_kind']})")
    if "eval_loss" in metrics:
        print(f"eval loss: {metrics['eval_loss']:.4f} (perplexity {math.exp(min(metrics['eval_loss'], 50)):.2f})")


def save_outputs(args: argparse.Namespace, model, tokenizer, stage: Path,
                 sample: list[int] | None = None) -> dict[str, float] | None:
    """Model or adapter, and the tokenizer, into ``stage``; with ``--merge-lora`` merge the adapters into the base
    (in place) and return :func:`merge_check` on ``sample`` (``--merge-lora save``: the merged model is written
    under ``merged/``). Trainer leaves ``use_cache=False`` in the config (its ``TrainingArguments.use_cache``),
    which would make every later ``generate()`` re-run the whole sequence each step: the saved model gets the cache
    back."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.use_cache = base.generation_config.use_cache = True
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    if not args.merge_lora:
        return None
    ids = torch.tensor([sample or [0, 1]], device=base.device)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids, use_cache=False).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids, use_cache=False).logits.float()
    merged = model.merge_and_unload()
    with torch.no_grad():
        check = merge_check(adapted, merged(input_ids=ids, use_cache=False).logits.float(), plain)
    print(f"merged model vs adapters: max |logit difference| {check['max_abs_logit_diff']:.3g}; the adapters "
          f"themselves move logits by up to {check['adapter_effect']:.3g} (logits up to {check['logit_scale']:.3g}, "
          f"{check['tokens']} tokens)")
    if args.merge_lora == "save":
        merged.save_pretrained(stage / "merged")
        tokenizer.save_pretrained(stage / "merged")
    return check


def merge_check(adapted: torch.Tensor, merged: torch.Tensor, plain: torch.Tensor) -> dict[str, float]:
    """How far the merged model's logits are from the adapted model's on the same tokens, next to how far the
    adapters move them (``adapter_effect``: adapted vs the base alone). In bf16 the merged weights are rounded to
    bf16, so the difference is at rounding level rather than zero; it should stay well below the adapters' effect
    once they have trained."""
    return {"max_abs_logit_diff": (adapted - merged).abs().max().item(),
            "adapter_effect": (adapted - plain).abs().max().item(), "logit_scale": adapted.abs().max().item(),
            "tokens": adapted.shape[1]}


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process so far: the GPU's allocated peak on CUDA, else the CPU's peak resident set."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return {"peak_memory_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    import resource

    return {"peak_memory_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
            "peak_memory_kind": "process peak resident set (ru_maxrss)"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
