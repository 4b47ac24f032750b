"""Kimi's tiktoken-style byte-level BPE tokenizer (the released ``tiktoken.model``) for transformers 5.

The released checkpoints ship a ``tiktoken.model`` file (one ``<base64 token> <rank>`` line per token) and a
tokenizer class that no longer imports on transformers 5. :class:`KimiTokenizer` reads the same files and
reproduces the released encoding:

* pre-tokenisation with Kimi's regular expression (:data:`PAT_STR`, run with the ``regex`` module in its V1 mode,
  which is what gives ``&&`` its class-intersection meaning);
* byte-level BPE by rank inside every pre-token, with tiktoken's rule: repeatedly merge the adjacent pair whose
  concatenation has the lowest rank (leftmost on ties) until no adjacent pair is a token;
* a table of ``num_reserved_special_tokens`` (256) special tokens right after the ranks, named from the
  ``added_tokens_decoder`` of ``tokenizer_config.json`` or ``<|reserved_token_{id}|>``; special-token strings that
  appear in text become the control tokens, as in the release (``split_special_tokens=True`` encodes them as text);
* no BOS is added by ``encode``/``__call__``; ``decode`` concatenates the token bytes and decodes them as UTF-8
  (invalid sequences become U+FFFD), so ``decode(encode(text)) == text`` for every string.

The encoder is pure Python (per-pre-token results are cached). When the optional ``tiktoken`` package is importable
it is used for the BPE step of plain text (``use_tiktoken``: ``None`` = when available), which gives the same ids.

This module is copied into checkpoints as remote code: it imports only transformers, ``regex`` (a transformers
dependency) and, optionally, tiktoken.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import os
import tempfile
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

import regex
from transformers import AddedToken, PreTrainedTokenizer

try:  # optional fast path; inside try so that remote-code loading does not list tiktoken as a requirement
    import tiktoken as _tiktoken
except ImportError:  # pragma: no cover - depends on the environment
    _tiktoken = None

VOCAB_FILE_NAME = "tiktoken.model"

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

    Raises ``ValueError`` naming the file (and line) when a line is malformed, a token or rank repeats, the ranks
    are not exactly ``0 .. N-1``, or a single byte is missing (byte-level BPE needs all 256)."""
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


def save_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> str:
    """Write ``ranks`` as a tiktoken BPE file (lines sorted by rank), atomically (temp file, then rename)."""
    path = os.fspath(path)
    lines = [base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tiktoken-", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; a saved tokenizer is as readable as any file
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def byte_to_unicode_map() -> dict[int, str]:
    """The byte-level alphabet that makes BPE tokens printable strings: bytes that are printable Latin-1 characters
    (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes take the code points from
    U+0100 upwards, in byte order. (The usual GPT-2 convention, so token strings look familiar.)"""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in keep:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def replace_lone_surrogates(text: str) -> str:
    """``text`` unchanged if it is encodable as UTF-8; otherwise surrogate pairs joined and lone surrogates replaced
    by U+FFFD (what tiktoken does with such strings)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


# --------------------------------------------------------------------------------------------------- BPE core
class BytePairEncoder:
    """Pure-Python byte-level BPE over a rank table, with tiktoken's merge rule and a per-pre-token cache.

    ``encode_ordinary(text)`` splits ``text`` with :data:`PAT_STR` and encodes every piece; special-token strings are
    not looked for here (the tokenizer does that). Picklable: the cache and compiled pattern are rebuilt."""

    def __init__(self, ranks: dict[bytes, int], pat_str: str = PAT_STR, cache_size: int = 1 << 16) -> None:
        self.ranks = ranks
        self.pat_str = pat_str
        self.cache_size = cache_size
        self._setup()

    def _setup(self) -> None:
        self.pattern = regex.compile(self.pat_str, regex.V1)
        self.encode_piece: Callable[[bytes], tuple[int, ...]] = lru_cache(maxsize=self.cache_size)(self._merge)

    def __getstate__(self) -> dict[str, Any]:
        return {"ranks": self.ranks, "pat_str": self.pat_str, "cache_size": self.cache_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def _merge(self, piece: bytes) -> tuple[int, ...]:
        """Ranks of the tokens that BPE turns ``piece`` into (lowest-rank adjacent pair first, leftmost on ties)."""
        ranks = self.ranks
        whole = ranks.get(piece)
        if whole is not None:
            return (whole,)
        n = len(piece)
        # Parts are identified by their start offset; ``end[s]`` is where part ``s`` ends, ``prev[s]`` the previous
        # part's start. Candidate merges sit in a heap keyed (rank, left start) and are checked when popped.
        end = list(range(1, n + 1))
        prev = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            rank = ranks.get(piece[i:i + 2])
            if rank is not None:
                heap.append((rank, i, i + 1, i + 2))
        heapq.heapify(heap)
        while heap:
            _, left, middle, right = heapq.heappop(heap)
            if not alive[left] or end[left] != middle or end[middle] != right:
                continue  # one of the two parts has changed since this candidate was pushed
            alive[middle] = False
            end[left] = right
            if right < n:
                prev[right] = left
            before = prev[left]
            if before >= 0:
                rank = ranks.get(piece[before:right])
                if rank is not None:
                    heapq.heappush(heap, (rank, before, left, right))
            if right < n:
                rank = ranks.get(piece[left:end[right]])
                if rank is not None:
                    heapq.heappush(heap, (rank, left, right, end[right]))
        out = []
        start = 0
        while start < n:
            out.append(ranks[piece[start:end[start]]])
            start = end[start]
        return tuple(out)

    def split(self, text: str) -> list[str]:
        """Kimi's pre-tokenisation of ``text``."""
        return self.pattern.findall(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` with every character treated as text (lone surrogates become U+FFFD first)."""
        text = replace_lone_surrogates(text)
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            ids.extend(self.encode_piece(piece.encode("utf-8")))
        return ids


def _sort_keys_deep(value: Any) -> Any:
    """``value`` with the keys of every nested dict sorted (lists keep their order)."""
    if isinstance(value, dict):
        return {key: _sort_keys_deep(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sort_keys_deep(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------- tokenizer
class KimiTokenizer(PreTrainedTokenizer):
    """Kimi Linear / Kimi-K2 tokenizer for the released ``tiktoken.model`` (see the module docstring).

    Args:
        vocab_file: path of the ``tiktoken.model`` rank file.
        bos_token, eos_token, unk_token, pad_token: special-token strings (``[BOS]``, ``[EOS]``, ``[UNK]``,
            ``[PAD]``).
        additional_special_tokens: extra special tokens (skipped by ``decode(..., skip_special_tokens=True)``);
            default: Kimi's chat markers.
        added_tokens_decoder: ``{id: AddedToken}`` as stored in ``tokenizer_config.json``; names the ids of the
            special-token table (ids not named are ``<|reserved_token_{id}|>``, or Kimi-K2's layout when the whole
            table is unnamed).
        num_reserved_special_tokens: size of the special-token table after the ranks (256).
        use_tiktoken: use the ``tiktoken`` package for the BPE of plain text (``None``: when importable). The
            pure-Python path gives the same ids.
        chat_template: Jinja chat template; default :data:`CHAT_TEMPLATE`.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        bos_token: str | AddedToken = "[BOS]",
        eos_token: str | AddedToken = "[EOS]",
        unk_token: str | AddedToken | None = "[UNK]",
        pad_token: str | AddedToken | None = "[PAD]",
        additional_special_tokens: list[str | AddedToken] | None = None,
        added_tokens_decoder: dict[int, AddedToken | str | dict] | None = None,
        num_reserved_special_tokens: int = NUM_RESERVED_SPECIAL_TOKENS,
        use_tiktoken: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(f"KimiTokenizer needs its BPE rank file {VOCAB_FILE_NAME!r}; "
                             f"got vocab_file={vocab_file!r}")
        self.vocab_file = os.fspath(vocab_file)
        ranks = load_tiktoken_ranks(self.vocab_file)
        self.num_base_tokens = len(ranks)
        self.num_reserved_special_tokens = int(num_reserved_special_tokens)
        self._bpe = BytePairEncoder(ranks)
        self._id_to_bytes: list[bytes] = [b""] * self.num_base_tokens
        for token, rank in ranks.items():
            self._id_to_bytes[rank] = token
        self._byte_to_char = byte_to_unicode_map()
        self._char_to_byte = {char: byte for byte, char in self._byte_to_char.items()}
        self._id_to_string: list[str] = [self._bytes_to_string(token) for token in self._id_to_bytes]
        self._base_vocab: dict[str, int] = {token: rank for rank, token in enumerate(self._id_to_string)}
        if use_tiktoken is None:
            use_tiktoken = _tiktoken is not None
        elif use_tiktoken and _tiktoken is None:
            raise ValueError("use_tiktoken=True but the tiktoken package is not installed")
        self._use_tiktoken = bool(use_tiktoken)
        self._tiktoken_encoding = None

        given = self._normalise_added_tokens(added_tokens_decoder or {})
        self._added_tokens_decoder = self._special_table(given)
        self._added_tokens_decoder.update(given)
        names = [token.content for token in self._added_tokens_decoder.values()]
        if len(set(names)) != len(names):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"added_tokens_decoder names several ids with the same token: {duplicates[:5]}")
        if additional_special_tokens is None and "extra_special_tokens" not in kwargs:
            additional_special_tokens = [tok for tok in DEFAULT_ADDITIONAL_SPECIAL_TOKENS
                                         if any(t.content == tok for t in self._added_tokens_decoder.values())]
        if additional_special_tokens is not None:
            kwargs["additional_special_tokens"] = additional_special_tokens
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        super().__init__(
            bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
            num_reserved_special_tokens=self.num_reserved_special_tokens, **kwargs,
        )

    # ------------------------------------------------------------------ construction helpers
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
        """AddedTokens for the ids ``num_base .. num_base + num_reserved - 1``."""
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

    def _bytes_to_string(self, token: bytes) -> str:
        return "".join(self._byte_to_char[b] for b in token)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tiktoken_encoding"] = None  # rebuilt on first use
        return state

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Ids of the rank file plus the special-token table (163,840 for the released files)."""
        return self.num_base_tokens + self.num_reserved_special_tokens

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        """The ``{token bytes: rank}`` table of the rank file (rank = token id)."""
        return self._bpe.ranks

    @property
    def special_tokens_encoder(self) -> dict[str, int]:
        """``{name: id}`` of the special-token table (what tiktoken calls ``special_tokens``)."""
        last = self.num_base_tokens + self.num_reserved_special_tokens
        return {tok.content: i for i, tok in self._added_tokens_decoder.items() if self.num_base_tokens <= i < last}

    def get_vocab(self) -> dict[str, int]:
        """``{token string: id}``: byte-level BPE tokens, then added/special tokens (an added token wins when its
        text is also a BPE token's string)."""
        vocab = dict(self._base_vocab)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _update_total_vocab_size(self) -> None:
        # By id, not by counting get_vocab(): a special name may also be a BPE token's string.
        self.total_vocab_size = max(self.vocab_size, max(self._added_tokens_decoder, default=-1) + 1)

    def _add_tokens(self, new_tokens: list[str] | list[AddedToken] | None, special_tokens: bool = False) -> int:
        """Register tokens: names already known keep their id, BPE token strings map to their rank, new names get
        the next free id after the special-token table and earlier additions. Returns how many new ids were used."""
        added = 0
        for token in new_tokens or ():
            if not isinstance(token, (str, AddedToken)):
                raise TypeError(f"token {token!r} must be a string or AddedToken, not {type(token).__name__}")
            content = str(token)
            if not content:
                continue
            if isinstance(token, str):
                if content in self._added_tokens_encoder:
                    continue
                is_special = special_tokens or content in self.all_special_tokens
                token = AddedToken(content, lstrip=False, rstrip=False, normalized=not is_special,
                                   special=is_special)
            elif special_tokens:
                token.__setstate__({"special": True, "normalized": token.normalized})
            if content in self._added_tokens_encoder:
                index = self._added_tokens_encoder[content]
            elif content in self._base_vocab:
                index = self._base_vocab[content]
            else:
                index = max(self.vocab_size, max(self._added_tokens_decoder, default=-1) + 1)
                added += 1
            if token.special and content not in self.all_special_tokens:
                self._extra_special_tokens.append(token)
            self._added_tokens_decoder[index] = token
            self._added_tokens_encoder[content] = index
        self._update_trie()
        self._update_total_vocab_size()
        return added

    def _convert_token_to_id(self, token: str) -> int:
        index = self._base_vocab.get(token)
        if index is None:
            index = self._added_tokens_encoder.get(token)
        if index is None:
            return self.unk_token_id if self.unk_token is not None else None
        return index

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.num_base_tokens:
            return self._id_to_string[index]
        token = self._added_tokens_decoder.get(index)
        if token is None:
            raise ValueError(f"token id {index} is outside the vocabulary (size {len(self)})")
        return token.content

    # ------------------------------------------------------------------ encoding
    def _encode_ordinary(self, text: str) -> list[int]:
        if self._use_tiktoken:
            if self._tiktoken_encoding is None:
                self._tiktoken_encoding = _tiktoken.Encoding(
                    name=os.path.basename(self.vocab_file), pat_str=PAT_STR, mergeable_ranks=self._bpe.ranks,
                    special_tokens={},
                )
            return self._tiktoken_encoding.encode_ordinary(text)
        return self._bpe.encode_ordinary(text)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        """Token strings of ``text``. Special-token strings in the text become their control tokens unless
        ``split_special_tokens=True`` (or the released tokenizer's ``allow_special_tokens=False``)."""
        if "allow_special_tokens" in kwargs:
            kwargs["split_special_tokens"] = not kwargs.pop("allow_special_tokens")
        return super().tokenize(text, **kwargs)

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        id_to_string = self._id_to_string
        return [id_to_string[i] for i in self._encode_ordinary(text)]

    # ------------------------------------------------------------------ decoding
    def _token_bytes(self, index: int) -> bytes:
        if 0 <= index < self.num_base_tokens:
            return self._id_to_bytes[index]
        token = self._added_tokens_decoder.get(index)
        if token is None:
            raise ValueError(f"token id {index} is outside the vocabulary (size {len(self)})")
        return token.content.encode("utf-8")

    def decode_bytes(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of ``token_ids`` (special tokens as their UTF-8 names unless skipped)."""
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return b"".join(self._token_bytes(int(i)) for i in token_ids if int(i) not in skip)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.decode_bytes(token_ids, skip_special_tokens).decode("utf-8", errors="replace")

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join token strings: byte-level tokens through the byte alphabet, added tokens as their text."""
        data = bytearray()
        for token in tokens:
            if token in self._base_vocab:
                data.extend(self._char_to_byte[char] for char in token)
            else:
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace")

    def clean_up_tokenization(self, text: str) -> str:
        """Identity: byte-level BPE decodes exactly, there are no tokenisation spaces to clean."""
        return text

    # ------------------------------------------------------------------ saving
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the rank table as ``tiktoken.model`` (same format as the released file)."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory!r} is not a directory")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        return (save_tiktoken_ranks(self._bpe.ranks, os.path.join(save_directory, name)),)

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
