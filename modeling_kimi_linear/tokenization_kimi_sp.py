"""A sentencepiece tokenizer for our own small Kimi Linear models, and the function that trains one.

:func:`train_sentencepiece` trains a byte-fallback BPE ``tokenizer.model`` suited to source code: no
normalisation (``identity``), whitespace kept as written (no collapsing, no dummy prefix, whitespace-only pieces
allowed so that indentation runs become tokens), digits split one by one, and training "sentences" that are blocks
of whole lines, so that newlines are part of the text the merges are learned on.

:class:`KimiSentencePieceTokenizer` wraps such a model for transformers 5. ``encode`` gives the sentencepiece ids,
with BOS prepended by default (``add_bos_token=True``: a causal LM then always starts from the same context token;
``add_eos_token=False``). Decoding is exact for every text without the U+2581 character (sentencepiece's space
marker, which decodes to a space), since characters outside the vocabulary fall back to their UTF-8 bytes.

This module is copied into checkpoints as remote code (with its sibling :mod:`atomic_write`): it imports only
transformers, sentencepiece and tqdm.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sentencepiece as spm
from transformers import AddedToken, PreTrainedTokenizer

from .atomic_write import write_atomically

VOCAB_FILE_NAME = "tokenizer.model"


def _line_blocks(text: str, max_chars: int) -> Iterator[str]:
    """``text`` cut into blocks of whole lines of at most ``max_chars`` characters (longer lines are cut)."""
    block: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if block:
                yield "".join(block)
                block, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and block:
            yield "".join(block)
            block, size = [], 0
        block.append(line)
        size += len(line)
    if block:
        yield "".join(block)


def train_sentencepiece(
    files: Sequence[str | os.PathLike] | None,
    model_prefix: str | os.PathLike,
    vocab_size: int,
    *,
    texts: Iterable[str] | None = None,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    block_chars: int = 2000,
    user_defined_symbols: Sequence[str] = (),
    num_threads: int | None = None,
    progress: bool = True,
    verbose: bool = False,
    **trainer_options: Any,
) -> str:
    """Train a byte-fallback sentencepiece model and write ``{model_prefix}.model`` atomically.

    Args:
        files: UTF-8 text files to learn from (e.g. Python standard-library sources), or ``None`` with ``texts``.
        model_prefix: output path without the ``.model`` suffix (parent directories are created).
        vocab_size: size of the vocabulary, including 4 control/unknown pieces and the 256 byte pieces.
        texts: documents to learn from instead of ``files``.
        model_type: sentencepiece model type (``"bpe"``; ``"unigram"`` also works).
        character_coverage: share of characters that get their own piece; the rest use byte fallback.
        block_chars: documents are fed as blocks of whole lines of at most this many characters.
        user_defined_symbols: pieces that are always kept whole.
        num_threads: trainer threads (default: all CPUs).
        progress: tqdm progress bar over the documents read.
        verbose: show sentencepiece's own training log.
        trainer_options: further ``SentencePieceTrainer`` options (they override the defaults here).

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3. Returns the path of the written model.
    Raises ``ValueError`` (naming the file) for a missing or non-UTF-8 input, or when nothing is given.
    """
    if (files is None) == (texts is None):
        raise ValueError("train_sentencepiece: give exactly one of `files` or `texts`")
    if files is not None:
        files = [os.fspath(f) for f in files]
        for path in files:
            if not os.path.isfile(path):
                raise ValueError(f"train_sentencepiece: {path}: no such file")
    if block_chars < 16:
        raise ValueError("train_sentencepiece: block_chars must be at least 16")

    def documents() -> Iterator[str]:
        if files is not None:
            for path in files:
                try:
                    with open(path, encoding="utf-8") as handle:
                        yield handle.read()
                except UnicodeDecodeError as exc:
                    raise ValueError(f"train_sentencepiece: {path}: not UTF-8 text ({exc})") from None
        else:
            yield from texts

    def sentences() -> Iterator[str]:
        from tqdm.auto import tqdm

        bar = tqdm(documents(), total=len(files) if files is not None else None, desc="sentencepiece input",
                   unit="doc", disable=not progress)
        for document in bar:
            if not isinstance(document, str):
                raise ValueError(f"train_sentencepiece: texts must be strings, got {type(document).__name__}")
            for block in _line_blocks(document, block_chars):
                if block.strip():
                    yield block

    options: dict[str, Any] = dict(
        vocab_size=int(vocab_size), model_type=model_type, character_coverage=character_coverage,
        byte_fallback=True, split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        max_sentence_length=4 * block_chars + 16, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=num_threads or os.cpu_count() or 1, minloglevel=0 if verbose else 2,
    )
    if user_defined_symbols:
        options["user_defined_symbols"] = list(user_defined_symbols)
    options.update(trainer_options)
    model = _ModelBuffer()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model, **options)
    except RuntimeError as exc:
        raise ValueError(f"train_sentencepiece: sentencepiece training failed: {exc}") from None
    if not model.data:
        raise ValueError("train_sentencepiece: sentencepiece produced no model (empty input?)")
    return write_atomically(os.fspath(model_prefix) + ".model", model.data)


class _ModelBuffer:
    """Collects the serialized model that ``SentencePieceTrainer`` writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data += data
        return len(data)


class KimiSentencePieceTokenizer(PreTrainedTokenizer):
    """transformers tokenizer over a sentencepiece ``tokenizer.model`` (see the module docstring).

    Args:
        vocab_file: the sentencepiece model file.
        bos_token, eos_token, unk_token, pad_token: default to the model's own ``<s>``, ``</s>``, ``<unk>``,
            ``<pad>`` pieces (``None`` where the model has none).
        add_bos_token: prepend BOS in ``encode``/``__call__`` with ``add_special_tokens=True`` (default ``True``).
        add_eos_token: append EOS likewise (default ``False``).
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE_NAME}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        bos_token: str | AddedToken | None = None,
        eos_token: str | AddedToken | None = None,
        unk_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise ValueError(f"KimiSentencePieceTokenizer needs a sentencepiece {VOCAB_FILE_NAME!r}; "
                             f"got vocab_file={vocab_file!r}")
        self.vocab_file = os.fspath(vocab_file)
        with open(self.vocab_file, "rb") as handle:
            self._proto = handle.read()
        self._load_processor()
        sp = self._sp
        defaults = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(),
                    "pad_token": sp.pad_id()}
        given = {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}
        for name, value in given.items():
            if value is None and defaults[name] >= 0:
                given[name] = sp.id_to_piece(defaults[name])
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        pattern = {(True, False): "bos", (False, True): "eos", (True, True): "bos_eos", (False, False): "none"}
        kwargs["special_tokens_pattern"] = pattern[(self.add_bos_token, self.add_eos_token)]
        kwargs.setdefault("token_type_ids_pattern", "all_zeros")
        super().__init__(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token, **given, **kwargs)
        if self.add_bos_token and self.bos_token is None:
            raise ValueError(f"{self.vocab_file}: add_bos_token=True but the model has no BOS piece")
        if self.add_eos_token and self.eos_token is None:
            raise ValueError(f"{self.vocab_file}: add_eos_token=True but the model has no EOS piece")

    def _load_processor(self) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto)
        except RuntimeError as exc:
            raise ValueError(f"{self.vocab_file}: not a sentencepiece model ({exc})") from None
        self._sp = sp

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sp"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load_processor()

    # ------------------------------------------------------------------ vocabulary
    @property
    def sp_model(self) -> spm.SentencePieceProcessor:
        """The underlying ``SentencePieceProcessor``."""
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self._sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self._sp.get_piece_size():
            raise ValueError(f"token id {index} is outside the vocabulary (size {len(self)})")
        return self._sp.id_to_piece(index)

    # ------------------------------------------------------------------ encoding / decoding
    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        size = self._sp.get_piece_size()
        pieces: list[str] = []
        run: list[int] = []
        for index in map(int, token_ids):
            if index in skip:
                continue
            added = self._added_tokens_decoder.get(index)
            if added is not None or (0 <= index < size and self._sp.is_control(index)):
                if run:
                    pieces.append(self._sp.decode(run))
                    run = []
                pieces.append(added.content if added is not None else self._sp.id_to_piece(index))
            elif 0 <= index < size:
                run.append(index)
            else:
                raise ValueError(f"token id {index} is outside the vocabulary (size {len(self)})")
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Join pieces as sentencepiece decodes them; added/special tokens as their text."""
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in self._added_tokens_encoder:
                if run:
                    out.append(self._sp.decode_pieces(run))
                    run = []
                out.append(token)
            else:
                run.append(token)
        if run:
            out.append(self._sp.decode_pieces(run))
        return "".join(out)

    def clean_up_tokenization(self, text: str) -> str:
        """Identity: decoding is exact."""
        return text

    # ------------------------------------------------------------------ saving
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the sentencepiece model as ``tokenizer.model``."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary: {save_directory!r} is not a directory")
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILE_NAME
        return (write_atomically(os.path.join(save_directory, name), self._proto),)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        """The base ``save_pretrained``, then ``add_bos_token``/``add_eos_token`` put back into
        ``tokenizer_config.json`` (transformers 5 drops them, and they decide what ``encode`` adds)."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        path = os.path.join(os.fspath(save_directory), (f"{prefix}-" if prefix else "") + "tokenizer_config.json")
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["add_bos_token"] = self.add_bos_token
        config["add_eos_token"] = self.add_eos_token
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        write_atomically(path, text.encode("utf-8"))
        return files


# save_pretrained writes ``auto_map`` {"AutoTokenizer": ["tokenization_kimi_sp.KimiSentencePieceTokenizer", null]} and
# copies this file next to the model.
KimiSentencePieceTokenizer.register_for_auto_class("AutoTokenizer")
