"""Kimi's tiktoken-style byte-level BPE tokenizer (the released ``tiktoken.model``) as a fast tokenizer for
transformers 5.

The released checkpoints ship a ``tiktoken.model`` file (one ``<base64 token> <rank>`` line per token) and a
tokenizer class that no longer imports on transformers 5. :class:`KimiTokenizer` reads the same files and gives the
released ids, with the Rust ``tokenizers`` library doing the work (``is_fast``, offsets, batch encoding):

* the rank file is turned into a byte-level BPE by transformers' ``TikTokenConverter`` (every token is a merge of
  two tokens at the rank of the result; a piece that is itself a token is taken whole, as tiktoken does), given
  Kimi's pre-tokenisation pattern :data:`PAT_STR` (Oniguruma runs it as tiktoken's regex engine does, ``&&`` class
  intersections included; the converter's own default pattern would split differently);
* a table of ``num_reserved_special_tokens`` (256) added tokens right after the ranks, named from the
  ``added_tokens_decoder`` of ``tokenizer_config.json`` or ``<|reserved_token_{id}|>``. As in the release
  (``allowed_special="all"``), their strings in text become the control tokens. ``split_special_tokens=True`` (or the
  released keyword ``allow_special_tokens=False``) encodes the special ones as text; the five tool-call markers,
  which the release marks ``special: false``, stay control tokens then, as any non-special added token of a
  transformers fast tokenizer does (the released tokenizer encoded them as text too);
* no BOS is added by ``encode``/``__call__``; ``decode`` joins the token bytes and decodes them as UTF-8 (invalid
  sequences become U+FFFD), so ``decode(encode(text)) == text`` for every string; lone surrogates, which are not
  UTF-8, are replaced by U+FFFD before encoding (what tiktoken does).

``save_pretrained`` writes ``tokenizer.json`` (loaded first next time: it holds the same BPE, pattern and table),
the rank file ``tiktoken.model`` and a ``tokenizer_config.json`` that keeps ``added_tokens_decoder`` (the released
layout needs it). This module is copied into checkpoints as remote code (with its sibling :mod:`atomic_write`): it
imports only transformers and ``tokenizers``; ``tiktoken`` is not needed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer
from transformers import AddedToken, TokenizersBackend
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

from .atomic_write import write_atomically

VOCAB_FILE_NAME = "tiktoken.model"
TOKENIZER_FILE_NAME = "tokenizer.json"

# Kimi's pre-tokenisation pattern: eight alternatives, tried in this order at every position.
PAT_STR_PARTS = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
PAT_STR = "|".join(PAT_STR_PARTS)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Kimi-K2 / Kimi-Linear special-token layout, as offsets from the first id after the ranks (163584 in the release).
# Used when no ``added_tokens_decoder`` names them (a tokenizer built from a bare ``tiktoken.model``).
KIMI_SPECIAL_TOKEN_OFFSETS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    254: "[UNK]",
    255: "[PAD]",
}
# Tool-call markers are control tokens in text but not "special" (decode keeps them with skip_special_tokens).
NON_SPECIAL_TOKENS = frozenset({
    "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>", "<|tool_call_end|>",
})
DEFAULT_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
    "<|im_system|>", "<|im_middle|>",
)

# Chat template (Kimi format, reference §4.3): no newlines between turns; each turn is
# <|im_X|>{name or role}<|im_middle|>{content}<|im_end|>.
CHAT_TEMPLATE = (
    "{%- macro render_content(msg) -%}"
    "{%- set content = msg.get('content') -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}"
    "{%- elif part.get('type') in ('image', 'image_url') or 'image' in part or 'image_url' in part -%}"
    "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "{%- elif part.get('text') is not none -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "<|im_system|>tool_declare<|im_middle|>{{ tools | tojson(separators=(',', ':')) }}<|im_end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role_name = message.get('name') or message['role'] -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>{{ role_name }}<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>{{ role_name }}<|im_middle|>"
    "{%- else -%}<|im_system|>{{ role_name }}<|im_middle|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message.get('tool_calls') -%}"
    "{{ render_content(message) }}<|tool_calls_section_begin|>"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- set arguments = tool_call['function']['arguments'] -%}"
    "<|tool_call_begin|>{{ tool_call['id'] }}<|tool_call_argument_begin|>"
    "{%- if arguments is string -%}{{ arguments }}{%- else -%}{{ arguments | tojson }}{%- endif -%}"
    "<|tool_call_end|>"
    "{%- endfor -%}"
    "<|tool_calls_section_end|>"
    "{%- elif message['role'] == 'tool' -%}"
    "## Return of {{ message.get('tool_call_id') }}\n{{ render_content(message) }}"
    "{%- else -%}{{ render_content(message) }}"
    "{%- endif -%}"
    "<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


# --------------------------------------------------------------------------------------------------- rank files
def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``<base64 token> <rank>`` per line) into ``{token bytes: rank}``.

    Written here rather than taken from ``tiktoken.load`` so that tiktoken is not required and a bad file gets an
    error naming the file and line: a malformed line, a token or rank that repeats, ranks that are not exactly
    ``0 .. N-1``, or a missing single byte (byte-level BPE needs all 256) raise ``ValueError``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as handle:
            content = handle.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the tiktoken BPE file ({exc})") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise ValueError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:80]!r}") from None
        if not token:
            raise ValueError(f"{path}:{number}: empty token")
        if token in ranks:
            raise ValueError(f"{path}:{number}: token {token!r} appears twice")
        if rank in seen_ranks:
            raise ValueError(f"{path}:{number}: rank {rank} appears twice")
        ranks[token] = rank
        seen_ranks.add(rank)
    if not ranks:
        raise ValueError(f"{path}: no tokens in the tiktoken BPE file")
    if min(seen_ranks) != 0 or max(seen_ranks) != len(ranks) - 1:
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1} (found {min(seen_ranks)}.."
                         f"{max(seen_ranks)} for {len(ranks)} tokens)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte-level BPE needs every single byte as a token; {len(missing)} missing "
                         f"(first: {bytes([missing[0]])!r})")
    return ranks


class _KimiRankFileConverter(TikTokenConverter):
    """transformers' tiktoken converter over ranks already read (and checked) by :func:`load_tiktoken_ranks`."""

    def __init__(self, ranks: dict[bytes, int]) -> None:
        super().__init__(vocab_file=None, pattern=PAT_STR)
        self.ranks = ranks

    def load_tiktoken_bpe(self, tiktoken_url: str | None) -> dict[bytes, int]:
        return self.ranks


def replace_lone_surrogates(text: str) -> str:
    """``text`` unchanged if it is encodable as UTF-8; otherwise surrogate pairs joined and lone surrogates replaced
    by U+FFFD (what tiktoken does with such strings; the Rust tokenizer cannot take them at all)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _encodable(value: Any) -> Any:
    """``value`` (a string, or lists/tuples of them, or anything else) with :func:`replace_lone_surrogates` applied
    to every string."""
    if isinstance(value, str):
        return replace_lone_surrogates(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_encodable(item) for item in value)
    return value


def _sort_keys_deep(value: Any) -> Any:
    """``value`` with the keys of every nested dict sorted (lists keep their order)."""
    if isinstance(value, dict):
        return {key: _sort_keys_deep(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sort_keys_deep(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------- tokenizer
class KimiTokenizer(TokenizersBackend):
    """Kimi Linear / Kimi-K2 tokenizer for the released ``tiktoken.model`` (see the module docstring).

    Args:
        vocab_file: path of the ``tiktoken.model`` rank file (used when there is no ``tokenizer_file``).
        tokenizer_file: a ``tokenizer.json`` written by :meth:`save_pretrained` (loads faster than converting).
        bos_token, eos_token, unk_token, pad_token: special-token strings (``[BOS]``, ``[EOS]``, ``[UNK]``,
            ``[PAD]``).
        additional_special_tokens: extra special tokens (skipped by ``decode(..., skip_special_tokens=True)``);
            default: Kimi's chat markers.
        added_tokens_decoder: ``{id: AddedToken}`` as stored in ``tokenizer_config.json``; names the ids of the
            special-token table (ids not named are ``<|reserved_token_{id}|>``, or Kimi-K2's layout when the whole
            table is unnamed) and any tokens added after it.
        num_reserved_special_tokens: size of the special-token table after the ranks (256).
        chat_template: Jinja chat template; default :data:`CHAT_TEMPLATE`.

    Raises ``ValueError`` for a missing or malformed rank file, or when an added token would not get its id (a
    special-token string that is also an ordinary token of the rank file: one string cannot have two ids here).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME, "tokenizer_file": TOKENIZER_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        bos_token: str | AddedToken = "[BOS]",
        eos_token: str | AddedToken = "[EOS]",
        unk_token: str | AddedToken | None = "[UNK]",
        pad_token: str | AddedToken | None = "[PAD]",
        additional_special_tokens: list[str | AddedToken] | None = None,
        added_tokens_decoder: dict[int, AddedToken | str | dict] | None = None,
        num_reserved_special_tokens: int = NUM_RESERVED_SPECIAL_TOKENS,
        **kwargs: Any,
    ) -> None:
        if tokenizer_file is not None and os.path.isfile(tokenizer_file):
            backend = Tokenizer.from_file(os.fspath(tokenizer_file))
        elif vocab_file is not None and os.path.isfile(vocab_file):
            backend = _KimiRankFileConverter(load_tiktoken_ranks(vocab_file)).converted()
        else:
            raise ValueError(f"KimiTokenizer needs its BPE rank file {VOCAB_FILE_NAME!r} (or a {TOKENIZER_FILE_NAME}"
                             f" saved by save_pretrained); got vocab_file={vocab_file!r}")
        self.num_base_tokens = backend.get_vocab_size(with_added_tokens=False)
        self.num_reserved_special_tokens = int(num_reserved_special_tokens)

        given = self._normalise_added_tokens(added_tokens_decoder or {})
        table = self._special_table(given)
        table.update(given)
        names = [token.content for token in table.values()]
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"added_tokens_decoder names several ids with the same token: {duplicates[:5]}")
        backend.add_tokens([table[index] for index in sorted(table)])  # ids are given out in this order
        self._check_ids(backend, table, vocab_file or tokenizer_file)
        self._tokenizer = backend

        if additional_special_tokens is None and "extra_special_tokens" not in kwargs:
            additional_special_tokens = [tok for tok in DEFAULT_ADDITIONAL_SPECIAL_TOKENS if tok in names]
        if additional_special_tokens is not None:
            kwargs["additional_special_tokens"] = additional_special_tokens
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            vocab_file=os.fspath(vocab_file) if vocab_file is not None else None,
            bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
            num_reserved_special_tokens=self.num_reserved_special_tokens, **kwargs,
        )

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Nothing to prepare: ``__init__`` builds the backend itself. (The base class would convert
        ``tiktoken.model`` with its default pattern, or re-read ``tokenizer.json`` into vocab/merges.)"""
        return kwargs

    @staticmethod
    def _normalise_added_tokens(decoder: dict[Any, AddedToken | str | dict]) -> dict[int, AddedToken]:
        out: dict[int, AddedToken] = {}
        for index, token in decoder.items():
            try:
                index = int(index)
            except (TypeError, ValueError):
                raise ValueError(f"added_tokens_decoder: id {index!r} is not an integer") from None
            if isinstance(token, dict):
                token = AddedToken(**{k: v for k, v in token.items() if k != "__type"})
            elif isinstance(token, str):
                token = AddedToken(token, special=True, normalized=False)
            elif not isinstance(token, AddedToken):
                raise ValueError(f"added_tokens_decoder[{index}] must be a string or AddedToken, got {type(token)}")
            out[index] = token
        return out

    def _special_table(self, given: dict[int, AddedToken]) -> dict[int, AddedToken]:
        """AddedTokens for the ids ``num_base .. num_base + num_reserved - 1`` that ``given`` does not name."""
        first = self.num_base_tokens
        ids = range(first, first + self.num_reserved_special_tokens)
        unnamed = not any(i in given for i in ids)
        table: dict[int, AddedToken] = {}
        for i in ids:
            if i in given:
                continue
            name = KIMI_SPECIAL_TOKEN_OFFSETS.get(i - first) if unnamed else None
            name = name or f"<|reserved_token_{i}|>"
            table[i] = AddedToken(name, lstrip=False, rstrip=False, normalized=False,
                                  special=name not in NON_SPECIAL_TOKENS)
        return table

    @staticmethod
    def _check_ids(backend: Tokenizer, table: dict[int, AddedToken], source: Any) -> None:
        """Every added token has the id the table gives it (``ValueError`` naming the first that does not)."""
        for index in sorted(table):
            content = table[index].content
            got = backend.token_to_id(content)
            if got == index:
                continue
            if got is not None and got < backend.get_vocab_size(with_added_tokens=False):
                raise ValueError(f"{source}: the added token {content!r} (id {index}) is also an ordinary token of "
                                 f"the rank file (id {got}); a tokenizers-backed tokenizer cannot give one string "
                                 "two ids")
            raise ValueError(f"{source}: the added token {content!r} should have id {index} but got {got} (added "
                             "token ids must follow the ranks without gaps)")

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Ids of the rank file plus the special-token table (163,840 for the released files, the model's
        ``vocab_size``); ``len(tokenizer)`` also counts tokens added later."""
        return self.num_base_tokens + self.num_reserved_special_tokens

    # ------------------------------------------------------------------ encoding
    def _encode_plus(self, text: Any, text_pair: Any = None, *args: Any, **kwargs: Any):
        """The base implementation, after lone surrogates are replaced (see :func:`replace_lone_surrogates`) and the
        released keyword ``allow_special_tokens`` is mapped to ``split_special_tokens``."""
        if "allow_special_tokens" in kwargs:
            kwargs["split_special_tokens"] = not kwargs.pop("allow_special_tokens")
        return super()._encode_plus(_encodable(text), _encodable(text_pair), *args, **kwargs)

    def _encode_without_added_tokens(self, text: str) -> list[int]:
        return super()._encode_without_added_tokens(replace_lone_surrogates(text))

    # ------------------------------------------------------------------ decoding
    def _decode(self, token_ids: int | list[int], *args: Any, **kwargs: Any) -> str:
        """The base implementation, with ids outside the vocabulary refused (the Rust decoder drops them)."""
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        if isinstance(ids, list) and ids and (min(ids) < 0 or max(ids) >= len(self)):
            bad = next(i for i in ids if not 0 <= i < len(self))
            raise ValueError(f"token id {bad} is outside the vocabulary (size {len(self)})")
        return super()._decode(token_ids, *args, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the ranks as ``tiktoken.model`` (the released format), from the BPE held in memory: the GPT-2 byte
        alphabet of the token strings maps back to bytes, and a token's id is its rank."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory!r} is not a directory")
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        lines = [base64.b64encode(bytes(byte_of[char] for char in token)) + b" %d\n" % rank
                 for token, rank in sorted(vocab.items(), key=lambda item: item[1])]
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        return (write_atomically(os.path.join(save_directory, name), b"".join(lines)),)

    def _save_pretrained(self, save_directory: str | os.PathLike, file_names: tuple[str, ...],
                         legacy_format: bool | None = None, filename_prefix: str | None = None) -> tuple[str, ...]:
        """``tokenizer.json`` (the base class), then ``tiktoken.model``, and ``added_tokens_decoder`` put back into
        ``tokenizer_config.json`` (transformers leaves it out for fast tokenizers; the released layout, and loading
        from ``tiktoken.model`` alone, need it)."""
        files = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        files += self.save_vocabulary(os.fspath(save_directory), filename_prefix)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        path = os.path.join(os.fspath(save_directory), prefix + "tokenizer_config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["added_tokens_decoder"] = {str(index): token.__getstate__()
                                          for index, token in sorted(self.added_tokens_decoder.items())}
        write_atomically(path, (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())
        return files

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation: Any, tools: list[dict | Callable] | None = None, **kwargs: Any):
        """The base ``apply_chat_template`` (its defaults: ``tokenize=True``, ``add_generation_prompt=False``), with
        the keys of every tool schema sorted recursively, as the released tokenizer does. Functions passed as tools
        are converted to JSON schemas first."""
        if tools is not None:
            from transformers.utils import get_json_schema

            tools = [_sort_keys_deep(tool if isinstance(tool, dict) else get_json_schema(tool)) for tool in tools]
        return super().apply_chat_template(conversation, tools=tools, **kwargs)


# Released tokenizer_config.json files name the class ``TikTokenTokenizer`` in their auto_map; the alias lets such a
# directory load this module's class when this file is copied there as ``tokenization_kimi.py``.
TikTokenTokenizer = KimiTokenizer

# save_pretrained writes ``auto_map`` {"AutoTokenizer": ["tokenization_kimi.KimiTokenizer", null]} and copies this file.
KimiTokenizer.register_for_auto_class("AutoTokenizer")
