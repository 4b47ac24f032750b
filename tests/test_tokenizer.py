"""Tokenizers: KimiTokenizer (released tiktoken.model format, a tokenizers-backed fast tokenizer) against the tiktoken
library, and KimiSentencePieceTokenizer against the raw sentencepiece processor. Rank files and sentencepiece models
are built here from this repository's own text (nothing is downloaded); save/load and AutoTokenizer remote-code
loading are checked end to end."""

from __future__ import annotations

import base64
import collections
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import regex

tiktoken = pytest.importorskip("tiktoken")
spm = pytest.importorskip("sentencepiece")

from modeling_kimi_linear.tokenization_kimi import KimiTokenizer  # noqa: E402
from modeling_kimi_linear.tokenization_kimi_sp import KimiSentencePieceTokenizer, train_sentencepiece  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Kimi's pre-tokenisation regex, written out from the reference description (reference_model.md §4.1), so that the
# tiktoken reference below does not borrow the pattern from the code under test.
KIMI_PATTERN = "|".join([
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
])
# Kimi-K2's added_tokens_decoder, as offsets from the first id after the ranks (reference_model.md §4.2).
K2_SPECIALS = {
    0: ("[BOS]", True), 1: ("[EOS]", True), 2: ("<|im_end|>", True), 3: ("<|im_user|>", True),
    4: ("<|im_assistant|>", True), 6: ("<|start_header_id|>", True), 7: ("<|end_header_id|>", True),
    9: ("[EOT]", True), 10: ("<|im_system|>", True), 11: ("<|tool_calls_section_begin|>", False),
    12: ("<|tool_calls_section_end|>", False), 13: ("<|tool_call_begin|>", False),
    14: ("<|tool_call_argument_begin|>", False), 15: ("<|tool_call_end|>", False), 17: ("<|im_middle|>", True),
    254: ("[UNK]", True), 255: ("[PAD]", True),
}
CHAT_MARKERS = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
                "[EOT]", "<|im_system|>", "<|im_middle|>"]

CODE = '''import os


class Greeter:
    """Says hello."""

    def __init__(self, name: str = "world") -> None:
        self.name = name  # keep it

    def greet(self):
\treturn f"Hello, {self.name}!"   \r\n\r\n
if __name__ == "__main__":
    print(Greeter().greet(), 0x1F, 3.14159, [1, 2, 3])
'''

TEXTS = [
    "Hello, world! This is a simple ASCII sentence.",
    CODE,
    # CJK, and Han next to other letters (the pattern's && intersections keep Han out of the letter runs)
    "我们的模型采用混合线性注意力架构。中文文本，标点符号！",
    "Kimi Linear 使用 KDA 和 MLA，速度很快！Привет мир, مرحبا بالعالم, नमस्ते दुनिया, こんにちは世界, 안녕하세요 ÀÉÎÕÜ",
    "abc中文def ABC漢字Def 日本語のテキストとカタカナ、ひらがな。한국어 텍스트 ＡＢＣ全角ａｂｃ x中y",
    "I'm sure they'll say it's fine; we've done it, you'd agree. DON'T SHOUT: IT'S LOUD, WE'RE HERE, I'LL GO. "
    "o'clock rock'n'roll l'été c’est Bob's",
    "1234567890 3.14159 2025-01-01 12,345,678 ٣٤٥٦٧ １２３４ 1e-10 v2.0.1 0000000",
    # whitespace and CRLF runs
    "a  b   c\n\n\n  \t\t\n \r\n\r\n    end   \n   ",
    "line one\r\nline two\r\n\r\n\r\n  \r\n\t\r\n\r\r\n\n\rx  \r\n",
    # emoji, skin tones, ZWJ sequences, flags, keycaps
    "😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨🚀 emoji😀text",
    "🏳️‍🌈 👩🏽‍💻 🧑‍🤝‍🧑 1️⃣ #️⃣ 🇯🇵🇺🇸 ❤️‍🔥 a\u200db",
    # special-token strings inside text, whole and partial
    "<|im_user|>user<|im_middle|>hi<|im_end|>[BOS]x[EOS] <|im_assistant|>assistant<|im_middle|>",
    "[BOS[BOS]] <|im_end <|im_end|>> [PAD][UNK][EOT] <|im_middle|><|im_middle|>",
    # combining marks, titlecase and modifier letters
    "Combining: e\u0301 n\u0303 A\u030a; titlecase ǅemal ǈ ǋ; modifiers ʰʲˀ; Greek ΑΒΓ αβγ ΆΈ; ſ K ß ﬅ İı",
    "Z\u0334\u0321a\u0337l\u0335g\u0338o \u1112\u1161\u11ab (NFD Hangul) क्षत्रिय naïve café e\u0301\u0301\u0301",
    "whitespace kinds:\u00a0nbsp\u2028ls\u2029ps\u3000ideo\u0085nel\x0bvt\x0cff\x1cfs tail",
    "   ",
    "",
]

FUZZ_ALPHABET = (
    list("abcdefgXYZ019'’ \t\n\r.,;:!?-_()[]{}<>|/\\\"#$%&*+=@^`~")
    + list("éèçñÅøßÆ") + list("ΑβΓδ") + list("абвГД") + list("中文字國語") + list("ひらカタ") + list("한국")
    + list("ابت") + list("नमस") + list("٣١２３") + ["\u0301", "\u0308", "\u200d", "\u00a0", "\u3000", "\u2028", "\x0b",
                                                   "\x1c", "\x85", "ǅ", "ʰ", "ſ", "K", "ﬅ", "İ", "😀", "🏽", "🇫"]
    + ["'s", "'T", "'re", "'LL", "'d", "'m", "'ve", "<|im_end|>", "[BOS]", "  ", "\r\n", "\n\n", "1234", "Hello"]
    + ["\ufe0f", "👩", "💻", "\r\r", " \r\n ", "\u0334", "ひ", "漢"]
)


def fuzz_texts(count: int = 250, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def corpus_text() -> str:
    """This repository's README and package sources (local text to learn merges from)."""
    parts = [(REPO / "README.md").read_text(encoding="utf-8")]
    parts += [p.read_text(encoding="utf-8") for p in sorted((REPO / "modeling_kimi_linear").glob("*.py"))[:6]]
    return "\n".join(parts)[:120_000]


def train_byte_bpe(text: str, merges: int) -> dict[bytes, int]:
    """A tiny byte-level BPE trainer (most frequent adjacent pair first) on a simple word split; single bytes get
    ranks 0..255 and each learned merge the next rank."""
    words = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+", text))
    seqs = {w: tuple(bytes([b]) for b in w.encode("utf-8")) for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    counts: collections.Counter = collections.Counter()
    where: dict[tuple[bytes, bytes], set[str]] = collections.defaultdict(set)
    for w, c in words.items():
        for pair in zip(seqs[w], seqs[w][1:]):
            counts[pair] += c
            where[pair].add(w)
    for _ in range(merges):
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], p))
        ranks.setdefault(best[0] + best[1], len(ranks))
        for w in list(where.pop(best, ())):
            old, c = seqs[w], words[w]
            for pair in zip(old, old[1:]):
                counts[pair] -= c
                if counts[pair] <= 0:
                    del counts[pair]
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == best:
                    new.append(old[i] + old[i + 1])
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            seqs[w] = tuple(new)
            for pair in zip(new, new[1:]):
                counts[pair] += c
                where[pair].add(w)
        counts.pop(best, None)
    return ranks


def crafted_ranks(shuffle: bool = False) -> dict[bytes, int]:
    """Learned merges plus every adjacent byte pair and some random 3-5 byte substrings of the test texts (so that a
    pre-token boundary in the wrong place changes the ids). ``shuffle``: ranks in random order, bytes included.
    Special-token names are left out (the released file has none: Kimi's pattern never makes ``[BOS]`` one piece)."""
    ranks = train_byte_bpe(corpus_text(), 300)
    rng = random.Random(1)
    names = {name.encode() for name, _ in K2_SPECIALS.values()}

    def add(token: bytes) -> None:
        if token not in names:
            ranks.setdefault(token, len(ranks))

    for text in TEXTS + fuzz_texts():
        data = text.encode("utf-8")
        for i in range(len(data) - 1):
            add(data[i:i + 2])
        for _ in range(3):
            if len(data) > 5:
                i = rng.randrange(len(data) - 5)
                add(data[i:i + rng.randint(3, 5)])
    if shuffle:
        order = list(ranks)
        rng.shuffle(order)
        ranks = {token: i for i, token in enumerate(order)}
    return ranks


def write_rank_file(ranks: dict[bytes, int], path: Path) -> Path:
    """The released format, written independently of the code under test."""
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_specials(num_base: int) -> dict[str, int]:
    named = {num_base + off: name for off, (name, _) in K2_SPECIALS.items()}
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in range(num_base, num_base + 256)}


def reference_encoding(ranks: dict[bytes, int]):
    return tiktoken.Encoding("kimi-test", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                             special_tokens=reference_specials(len(ranks)))


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return crafted_ranks()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, ranks) -> Path:
    directory = tmp_path_factory.mktemp("kimi_vocab")
    write_rank_file(ranks, directory / "tiktoken.model")
    return directory


@pytest.fixture(scope="module")
def kimi(vocab_dir) -> KimiTokenizer:
    return KimiTokenizer(str(vocab_dir / "tiktoken.model"))


def ordinary(ranks: dict[bytes, int], text: str) -> list[int]:
    return reference_encoding(ranks).encode_ordinary(text)


# ------------------------------------------------------------------------------------------- KimiTokenizer: encoding
@pytest.mark.parametrize("shuffle", [False, True], ids=["learned-ranks", "shuffled-ranks"])
def test_encoding_matches_tiktoken(tmp_path, shuffle):
    table = crafted_ranks(shuffle=shuffle)
    tok = KimiTokenizer(str(write_rank_file(table, tmp_path / "tiktoken.model")))
    ref = reference_encoding(table)
    for text in TEXTS + fuzz_texts():
        assert tok.encode(text) == ref.encode(text, allowed_special="all"), repr(text)
        assert tok.encode(text, split_special_tokens=True) == ref.encode_ordinary(text), repr(text)


def test_batch_encoding_matches_tiktoken(kimi, ranks):
    texts = TEXTS + fuzz_texts(60, seed=3) + [corpus_text()]
    ref = reference_encoding(ranks)
    assert kimi(texts)["input_ids"] == ref.encode_batch(texts, allowed_special="all")
    assert kimi.is_fast


def test_the_rust_split_runs_kimis_pattern_like_the_regex_module(kimi):
    """Oniguruma (tokenizers' Split) accepts the pattern, && class intersections included, and splits like the
    ``regex`` module in its V1 mode (where && intersects); the tokenizer's first pre-tokenizer is that split."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(KIMI_PATTERN), behavior="isolated")
    pattern = regex.compile(KIMI_PATTERN, regex.V1)
    texts = TEXTS + fuzz_texts(400, seed=9)
    for text in texts:
        pieces = pattern.findall(text)
        assert "".join(pieces) == text
        assert [piece for piece, _ in split.pre_tokenize_str(text)] == pieces, repr(text)
        assert [piece for piece, _ in kimi.backend_tokenizer.pre_tokenizer[0].pre_tokenize_str(text)] == pieces
    # the intersection matters: read as V0 (&& as two literal ampersands) the same pattern splits Han differently
    assert regex.findall(KIMI_PATTERN, "ab中c", flags=regex.V0) != pattern.findall("ab中c") == ["ab", "中", "c"]


def test_special_strings_in_text_become_control_tokens(kimi, ranks):
    nb = len(ranks)
    ids = kimi.encode("a<|im_end|>b[BOS]<|tool_call_begin|>", add_special_tokens=False)
    assert ids == ordinary(ranks, "a") + [nb + 2] + ordinary(ranks, "b") + [nb + 0, nb + 13]
    assert kimi.encode(f"<|reserved_token_{nb + 100}|>") == [nb + 100]
    assert kimi.encode("hello") == kimi.encode("hello", add_special_tokens=True)  # no BOS is added
    assert (kimi.bos_token_id, kimi.eos_token_id, kimi.unk_token_id, kimi.pad_token_id) == (nb, nb + 1, nb + 254,
                                                                                            nb + 255)
    assert kimi("x y")["input_ids"] == kimi.encode("x y")
    text = f"a<|im_end|>b<|reserved_token_{nb + 100}|>[PAD]"
    assert kimi.encode(text, split_special_tokens=True) == ordinary(ranks, text)
    assert kimi.encode(text, allow_special_tokens=False) == ordinary(ranks, text)  # the released tokenizer's keyword
    assert kimi.encode(text, allow_special_tokens=True) == kimi.encode(text)
    assert kimi.tokenize(text, split_special_tokens=True) == kimi.convert_ids_to_tokens(ordinary(ranks, text))


def test_tool_call_markers_stay_control_tokens_when_special_tokens_are_split(kimi, ranks):
    """The documented difference from the released tokenizer: the five tool-call markers are added tokens that the
    release marks special=False, and a fast tokenizer's split_special_tokens only splits special ones."""
    nb = len(ranks)
    text = "a<|tool_call_begin|>b<|im_end|>"
    assert kimi.encode(text, split_special_tokens=True) == (
        ordinary(ranks, "a") + [nb + 13] + ordinary(ranks, "b<|im_end|>"))


def test_lone_surrogates_encode_like_tiktoken(kimi, ranks):
    ref = reference_encoding(ranks)
    for text in ["a\ud800b 😀 \udfff", "\udbff", "x\ud83d\ude00y", "<|im_end|>\ud800"]:
        assert kimi.encode(text) == ref.encode(text, allowed_special="all"), repr(text)
    assert kimi(["ok", "a\ud800b"])["input_ids"] == ref.encode_batch(["ok", "a\ud800b"])


# ------------------------------------------------------------------------------------------- KimiTokenizer: decoding
def test_decode_round_trip(kimi, ranks):
    ref = reference_encoding(ranks)
    for text in TEXTS + fuzz_texts(80, seed=5):
        ids = kimi.encode(text)
        assert kimi.decode(ids) == text
        assert kimi.decode(ids) == ref.decode(ids)
    assert kimi.batch_decode(kimi(TEXTS)["input_ids"]) == TEXTS
    emoji = kimi.encode("🦊")
    assert len(emoji) > 1  # split inside the character: partial bytes decode with U+FFFD, as tiktoken's decode
    assert kimi.decode(emoji[:1]) == ref.decode(emoji[:1]) and "\ufffd" in kimi.decode(emoji[:1])
    chat = "<|im_user|>user<|im_middle|>hi<|im_end|><|tool_call_begin|>"
    assert kimi.decode(kimi.encode(chat), skip_special_tokens=True) == "userhi<|tool_call_begin|>"
    assert kimi.decode(kimi.encode(chat)[0]) == "<|im_user|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kimi.decode([len(ranks) + 10_000])


def test_vocab_tokens_offsets_and_strings(kimi, ranks):
    nb = len(ranks)
    assert kimi.vocab_size == nb + 256 == len(kimi)
    vocab = kimi.get_vocab()
    assert set(vocab.values()) == set(range(nb + 256)) and len(vocab) == nb + 256
    assert vocab["[BOS]"] == nb and vocab["<|im_end|>"] == nb + 2 and vocab[f"<|reserved_token_{nb + 5}|>"] == nb + 5
    # token strings are the GPT-2 byte alphabet: a space shows as 'Ġ', a newline as 'Ċ'
    assert vocab["Ġ"] == ranks[b" "] and vocab["Ċ"] == ranks[b"\n"] and vocab["a"] == ranks[b"a"]
    for text in TEXTS:
        tokens = kimi.tokenize(text)
        assert kimi.convert_tokens_to_ids(tokens) == kimi.encode(text)
        assert kimi.convert_tokens_to_string(tokens) == text
        assert kimi.convert_ids_to_tokens(kimi.encode(text)) == tokens
    # offsets: each token's characters (ASCII text: one byte each)
    out = kimi(CODE, return_offsets_mapping=True)
    pieces = [CODE[start:end] for start, end in out["offset_mapping"]]
    assert "".join(pieces) == CODE
    assert [kimi.decode([i]) for i in out["input_ids"]] == pieces


def test_added_tokens_get_fresh_ids(vocab_dir, ranks):
    tok = KimiTokenizer(str(vocab_dir / "tiktoken.model"))
    nb = len(ranks)
    tok.add_tokens(["<think>", "</think>", "[BOS]", "a"])
    assert tok.convert_tokens_to_ids(["<think>", "</think>", "[BOS]", "a"]) == [nb + 256, nb + 257, nb, ranks[b"a"]]
    assert len(tok) == nb + 258
    assert tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]}) == 1
    assert tok.encode("x<think>y<|new|>") == tok.encode("x") + [nb + 256] + tok.encode("y") + [nb + 258]
    assert tok.decode(tok.encode("x<think>y<|new|>"), skip_special_tokens=True) == "x<think>y"


def test_pickle_round_trip(kimi):
    clone = pickle.loads(pickle.dumps(kimi))
    for text in TEXTS:
        assert clone.encode(text) == kimi.encode(text)


def test_bad_rank_files_are_named(tmp_path, ranks):
    with pytest.raises(ValueError, match="tiktoken.model"):
        KimiTokenizer(str(tmp_path / "tiktoken.model"))
    bad = tmp_path / "bad.model"
    bad.write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match=r"bad\.model:2"):
        KimiTokenizer(str(bad))
    bad.write_text("YQ== 0\nYQ== 1\n")
    with pytest.raises(ValueError, match="appears twice"):
        KimiTokenizer(str(bad))
    partial = {t: r for t, r in ranks.items() if t != b"\x00"}
    partial = {t: i for i, t in enumerate(sorted(partial, key=partial.get))}
    write_rank_file(partial, bad)
    with pytest.raises(ValueError, match="every single byte"):
        KimiTokenizer(str(bad))
    # a special-token name that is also an ordinary token cannot have both ids in a tokenizers vocabulary
    write_rank_file({**ranks, b"[EOS]": len(ranks)}, bad)
    with pytest.raises(ValueError, match=r"'\[EOS\]' \(id \d+\) is also an ordinary token"):
        KimiTokenizer(str(bad))


# ------------------------------------------------------------------------------------------- KimiTokenizer: chat
def test_chat_template_plain_turns(kimi):
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "name": "alice", "content": "How are you?"},
    ]
    body = ("<|im_system|>system<|im_middle|>You are helpful.<|im_end|>"
            "<|im_user|>user<|im_middle|>Hello<|im_end|>"
            "<|im_assistant|>assistant<|im_middle|>Hi there!<|im_end|>"
            "<|im_user|>alice<|im_middle|>How are you?<|im_end|>")
    assert kimi.apply_chat_template(messages, tokenize=False) == body
    assert kimi.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        body + "<|im_assistant|>assistant<|im_middle|>")
    # base-class defaults: tokenize=True, return_dict=True, no generation prompt
    out = kimi.apply_chat_template(messages)
    assert out["input_ids"] == kimi.encode(body)
    assert kimi.apply_chat_template(messages, return_dict=False) == kimi.encode(body)
    assert out["input_ids"][0] == kimi.convert_tokens_to_ids("<|im_system|>")


def test_chat_template_tools_calls_results_and_images(kimi):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text",
                                                                                            "text": " where?"}]},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"},
    ]
    tools_json = ('[{"function":{"description":"Weather in a city","name":"get_weather","parameters":'
                  '{"properties":{"city":{"type":"string"}},"required":["city"],"type":"object"}},"type":"function"}]')
    expected = (
        "<|im_system|>tool_declare<|im_middle|>" + tools_json + "<|im_end|>"
        "<|im_user|>user<|im_middle|>Look: <|media_start|>image<|media_content|><|media_pad|><|media_end|> where?"
        "<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
        "<|im_system|>tool<|im_middle|>## Return of functions.get_weather:0\nsunny<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>"
    )
    got = kimi.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert got == expected

    def get_weather(city: str) -> str:
        """Weather in a city.

        Args:
            city: The city.
        """
        return city

    from transformers.utils import get_json_schema

    schema = get_json_schema(get_weather)
    with_callable = kimi.apply_chat_template(messages[:1], tools=[get_weather], tokenize=False)
    assert with_callable.startswith("<|im_system|>tool_declare<|im_middle|>")
    declared = json.loads(with_callable.split("<|im_middle|>", 1)[1].split("<|im_end|>", 1)[0])
    assert declared == [schema]
    assert list(declared[0]) == sorted(declared[0]) and list(declared[0]["function"]) == sorted(schema["function"])


# ------------------------------------------------------------------------------------------- KimiTokenizer: files
def released_tokenizer_config(num_base: int) -> dict:
    return {
        "added_tokens_decoder": {
            str(num_base + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                  "single_word": False, "special": special}
            for off, (name, special) in K2_SPECIALS.items()},
        "additional_special_tokens": CHAT_MARKERS,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False, "model_max_length": 1048576,
        "tokenizer_class": "TikTokenTokenizer",
    }


def test_loads_a_released_directory(tmp_path, ranks, kimi):
    released = tmp_path / "released"
    released.mkdir()
    write_rank_file(ranks, released / "tiktoken.model")
    (released / "tokenizer_config.json").write_text(json.dumps(released_tokenizer_config(len(ranks)), indent=2))
    tok = KimiTokenizer.from_pretrained(str(released))
    nb = len(ranks)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (nb, nb + 1, nb + 255, nb + 254)
    assert tok.convert_tokens_to_ids("<|im_middle|>") == nb + 17
    assert tok.convert_ids_to_tokens(nb + 5) == f"<|reserved_token_{nb + 5}|>"
    assert not tok.added_tokens_decoder[nb + 13].special and tok.added_tokens_decoder[nb + 2].special
    ref = reference_encoding(ranks)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, allowed_special="all")
    # saving it gives our layout: our class and auto_map, the rank file byte for byte
    tok.save_pretrained(str(tmp_path / "ours"))
    config = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "KimiTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_kimi.KimiTokenizer", None]}
    assert (tmp_path / "ours" / "tiktoken.model").read_bytes() == (released / "tiktoken.model").read_bytes()


def test_save_and_reload(tmp_path, kimi, ranks):
    out = tmp_path / "saved"
    kimi.save_pretrained(str(out))
    files = set(os.listdir(out))
    assert files == {"tiktoken.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "tokenization_kimi.py", "atomic_write.py"}
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "tiktoken.model").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert (out / "tiktoken.model").read_text() == write_rank_file(ranks, tmp_path / "expected.model").read_text()
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_kimi.KimiTokenizer", None]}
    assert config["tokenizer_class"] == "KimiTokenizer"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "[BOS]", "[EOS]", "[PAD]", "[UNK]")
    named = {int(i): (t["content"], t["special"]) for i, t in config["added_tokens_decoder"].items()}
    assert len(named) == 256 and all(named[len(ranks) + off] == entry for off, entry in K2_SPECIALS.items())
    # the copied modules import nothing from this package but each other (they must work as remote code)
    for name in ("tokenization_kimi.py", "atomic_write.py"):
        source = (out / name).read_text()
        imports = re.findall(r"^from \.(\w+) import", source, flags=re.M)
        assert set(imports) <= {"atomic_write"} and "modeling_kimi_linear" not in source.split('"""', 2)[2]
    # reloaded from tokenizer.json, and from the rank file and config alone (a converted release's files)
    again = KimiTokenizer.from_pretrained(str(out))
    (out / "tokenizer.json").unlink()
    from_ranks = KimiTokenizer.from_pretrained(str(out))
    for tok in (again, from_ranks):
        for text in TEXTS:
            assert tok.encode(text) == kimi.encode(text)
        assert tok.chat_template == kimi.chat_template
        assert tok.extra_special_tokens == kimi.extra_special_tokens
        assert tok.added_tokens_decoder == kimi.added_tokens_decoder


# ------------------------------------------------------------------------------------------- sentencepiece
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sp")
    files = sorted((REPO / "modeling_kimi_linear").glob("*.py"))[:8]
    path = train_sentencepiece(files, out / "demo" / "tokenizer", 400, progress=False)
    return Path(path)


@pytest.fixture(scope="module")
def sp_tok(sp_model) -> KimiSentencePieceTokenizer:
    return KimiSentencePieceTokenizer(str(sp_model))


SP_TEXTS = [CODE, "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(10)]\n\n\n    # trailing   \n",
            "Unicode: 日本語 Ελληνικά 😀 naïve café", "    \n\n  ", "12345 + 678 == 7023", "x"]


def test_sentencepiece_training_writes_one_model_file(sp_model):
    assert sp_model.name == "tokenizer.model" and sp_model.is_file()
    assert sorted(os.listdir(sp_model.parent)) == ["tokenizer.model"]  # nothing temporary left behind
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert sp.get_piece_size() == 400
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert "<0x0A>" in pieces and "<0xFF>" in pieces  # byte fallback
    assert any(set(p) == {"▁"} and len(p) >= 4 for p in pieces)  # indentation runs are pieces
    assert not any(len(p) > 1 and p.isdigit() for p in pieces)  # digits are split


def test_sentencepiece_ids_match_the_raw_processor(sp_tok, sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in SP_TEXTS:
        assert sp_tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert sp_tok.encode(text) == [sp.bos_id()] + sp.encode(text)  # add_bos_token=True by default
        assert sp_tok.tokenize(text) == sp.encode(text, out_type=str)
    assert (sp_tok.bos_token, sp_tok.eos_token, sp_tok.unk_token, sp_tok.pad_token) == ("<s>", "</s>", "<unk>",
                                                                                        "<pad>")
    assert sp_tok.vocab_size == len(sp_tok) == 400 and sp_tok.get_vocab()["<s>"] == sp.bos_id()
    eos = KimiSentencePieceTokenizer(str(sp_model), add_bos_token=False, add_eos_token=True)
    assert eos.encode("x") == sp.encode("x") + [sp.eos_id()]


def test_sentencepiece_decode_is_exact(sp_tok):
    for text in SP_TEXTS:
        ids = sp_tok.encode(text)
        assert sp_tok.decode(ids, skip_special_tokens=True) == text
        assert sp_tok.decode(ids) == "<s>" + text
        assert sp_tok.convert_tokens_to_string(sp_tok.tokenize(text)) == text
    # documented limit: U+2581 is sentencepiece's space marker and comes back as a space
    assert sp_tok.decode(sp_tok.encode("a\u2581b", add_special_tokens=False)) == "a b"
    assert pickle.loads(pickle.dumps(sp_tok)).encode(CODE) == sp_tok.encode(CODE)


def test_sentencepiece_training_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.py"):
        train_sentencepiece([tmp_path / "missing.py"], tmp_path / "tok", 300, progress=False)
    with pytest.raises(ValueError, match="exactly one"):
        train_sentencepiece(None, tmp_path / "tok", 300, progress=False)
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        (tmp_path / "tokenizer.model").write_bytes(b"garbage")
        KimiSentencePieceTokenizer(str(tmp_path / "tokenizer.model"))
    assert not (tmp_path / "tok.model").exists()


def test_sentencepiece_training_from_texts(tmp_path):
    texts = [CODE * 3, "for i in range(3):\n    print(i)\n" * 20]
    path = train_sentencepiece(None, tmp_path / "t", 320, texts=texts, progress=False)
    tok = KimiSentencePieceTokenizer(path)
    assert tok.decode(tok.encode(CODE), skip_special_tokens=True) == CODE


def test_sentencepiece_save_and_reload(tmp_path, sp_model, sp_tok):
    no_bos = KimiSentencePieceTokenizer(str(sp_model), add_bos_token=False)
    umask = os.umask(0)
    os.umask(umask)
    for tok, name in ((sp_tok, "bos"), (no_bos, "nobos")):
        tok.save_pretrained(str(tmp_path / name))
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert config["auto_map"] == {"AutoTokenizer": ["tokenization_kimi_sp.KimiSentencePieceTokenizer", None]}
        assert config["tokenizer_class"] == "KimiSentencePieceTokenizer"
        assert config["add_bos_token"] is tok.add_bos_token
        assert (tmp_path / name / "tokenizer.model").read_bytes() == sp_model.read_bytes()
        assert (tmp_path / name / "tokenizer.model").stat().st_mode & 0o777 == 0o666 & ~umask
        assert (tmp_path / name / "tokenization_kimi_sp.py").is_file()
        again = KimiSentencePieceTokenizer.from_pretrained(str(tmp_path / name))
        for text in SP_TEXTS:
            assert again.encode(text) == tok.encode(text)


def test_load_tokenizer_uses_this_packages_classes(tmp_path, ranks, kimi, sp_tok):
    """modeling_kimi_linear.load_tokenizer: our classes for directories that name them (no module beside the files
    needed, the release's TikTokenTokenizer included), AutoTokenizer for anything else."""
    from transformers import PreTrainedTokenizerFast

    from modeling_kimi_linear import load_tokenizer

    released, sp_dir, other = tmp_path / "released", tmp_path / "sp", tmp_path / "other"
    released.mkdir()
    write_rank_file(ranks, released / "tiktoken.model")
    (released / "tokenizer_config.json").write_text(json.dumps(released_tokenizer_config(len(ranks))))
    sp_tok.save_pretrained(str(sp_dir))
    for name in ("tokenization_kimi_sp.py", "atomic_write.py"):
        (sp_dir / name).unlink()
    tok = load_tokenizer(released)
    assert type(tok) is KimiTokenizer and tok.encode(CODE) == kimi.encode(CODE)
    tok = load_tokenizer(sp_dir)
    assert type(tok) is KimiSentencePieceTokenizer and tok.encode(CODE) == sp_tok.encode(CODE)
    PreTrainedTokenizerFast(tokenizer_object=kimi.backend_tokenizer).save_pretrained(str(other))
    tok = load_tokenizer(other)
    assert type(tok) is not KimiTokenizer and tok.encode(CODE) == kimi.encode(CODE)
    (other / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: not a JSON object"):
        load_tokenizer(other)


# ------------------------------------------------------------------------------------------- remote code
LOADER = r"""
import json, sys
sys.modules["modeling_kimi_linear"] = None  # the installed package must not be importable
from transformers import AutoTokenizer
texts = json.loads(sys.argv[1])
result = {}
for path in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    result[path] = {"class": type(tok).__module__ + "." + type(tok).__name__,
                    "ids": [tok.encode(t) for t in texts], "decoded": [tok.decode(tok.encode(t)) for t in texts]}
print(json.dumps(result))
"""


def test_auto_tokenizer_remote_code_without_the_package(tmp_path, kimi, ranks, sp_tok):
    ours, released, sp_dir = tmp_path / "kimi", tmp_path / "released", tmp_path / "sp"
    kimi.save_pretrained(str(ours))
    sp_tok.save_pretrained(str(sp_dir))
    # a released-layout directory (Moonshot's auto_map naming TikTokenTokenizer) carrying our module
    released.mkdir()
    write_rank_file(ranks, released / "tiktoken.model")
    (released / "tokenizer_config.json").write_text(json.dumps(released_tokenizer_config(len(ranks))))
    for name in ("tokenization_kimi.py", "atomic_write.py"):  # what the conversion copies
        shutil.copyfile(ours / name, released / name)

    texts = [t for t in TEXTS if t] + [CODE]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(texts), str(ours), str(released), str(sp_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for path in (ours, released):
        entry = got[str(path)]
        assert entry["class"].startswith("transformers_modules.") and entry["class"].endswith(".KimiTokenizer")
        assert entry["ids"] == [kimi.encode(t) for t in texts]
        assert entry["decoded"] == texts
    entry = got[str(sp_dir)]
    assert entry["class"].startswith("transformers_modules.")
    assert entry["class"].endswith(".KimiSentencePieceTokenizer")
    assert entry["ids"] == [sp_tok.encode(t) for t in texts]
