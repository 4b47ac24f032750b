"""Tokenizer benchmark: ``KimiTokenizer`` (transformers + the Rust ``tokenizers`` library) against ``tiktoken`` on
the same rank file, batch-encoding about 2 MB of Python source.

The ids are checked to be the same first (special-token strings in the text become control tokens in both:
``allowed_special="all"``, the released behaviour), so the timings compare the same result. Measured, round by
round in turn so that all see the same load on a shared machine: ``tokenizer(documents)`` (the ordinary
transformers call: ids, attention masks and the Rust encodings with their offsets), the Rust backend's
``encode_batch_fast`` (ids without offsets), and tiktoken's ``encode_batch``. Printed: medians of wall-clock and
process CPU time, and their ratios to tiktoken; also the time to build each tokenizer from the rank file and to
reload ours from its saved ``tokenizer.json``. ``--compare FILE`` also times the ``KimiTokenizer`` of another
``tokenization_kimi.py``, for instance the pure-Python BPE this one replaced
(``git show 14c9e0b:modeling_kimi_linear/tokenization_kimi.py > previous.py``).

No rank file is downloaded. ``--vocab`` takes a real one (the release's ``tiktoken.model``); without it a byte-level
BPE of ``--vocab-size`` tokens is trained here with ``tokenizers``' trainer and Kimi's pre-tokenizer on this
Python's standard library, installed packages left out (minutes for the release's 163,584 tokens; ``--vocab-size
32768`` is quicker). The timed text is another corpus (transformers' own sources), so the merges are not fitted to
it.

    python bench/tokenizer.py                          # the numbers in docs/benchmarks.md
    python bench/tokenizer.py --vocab-size 32768 --rounds 3
    python bench/tokenizer.py --vocab path/to/tiktoken.model --compare previous.py
    RAYON_NUM_THREADS=1 python bench/tokenizer.py     # one Rust thread: CPU times without idle threads spinning
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_kimi_linear.tokenization_kimi import PAT_STR, KimiTokenizer, load_tiktoken_ranks  # noqa: E402


def python_sources(root: Path, limit_bytes: int | None = None, skip: tuple[str, ...] = ()) -> list[str]:
    """UTF-8 ``.py`` files under ``root`` in path order (up to ``limit_bytes`` of UTF-8 when given), leaving out
    paths with a folder named in ``skip``."""
    texts, size = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip and any(part in skip for part in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        size += len(text.encode("utf-8"))
        if limit_bytes is not None and size >= limit_bytes:
            break
    return texts


def train_rank_file(path: Path, vocab_size: int, corpus: list[str]) -> Path:
    """Train a byte-level BPE on ``corpus`` (Kimi's pre-tokenizer) and write it as a tiktoken rank file: token
    bytes through the GPT-2 byte alphabet, rank = the trainer's id (single bytes first, then merges in order)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=True)
    tok.train_from_iterator(corpus, trainer)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    lines = [base64.b64encode(bytes(byte_of[c] for c in token)).decode() + f" {rank}\n"
             for rank, (token, _) in enumerate(vocab)]
    path.write_text("".join(lines))
    return path


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=Path, help="a tiktoken.model rank file (default: train one here)")
    parser.add_argument("--vocab-size", type=int, default=163_584, help="size of the trained rank file")
    parser.add_argument("--megabytes", type=float, default=2.0, help="how much text to encode per round")
    parser.add_argument("--text-dir", type=Path, default=None,
                        help="where the timed .py files come from (default: transformers' package sources)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare", type=Path, help="another tokenization_kimi.py whose KimiTokenizer to time too")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kimi_tokenizer_bench_"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    """The benchmark, with its files (a trained rank file, a saved tokenizer) under ``work``."""
    import tiktoken
    import transformers
    from tqdm.auto import tqdm

    if args.vocab is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        print(f"training a {args.vocab_size:,}-token byte-level BPE on {stdlib} ...", flush=True)
        corpus = python_sources(stdlib, skip=("site-packages", "dist-packages"))  # not the timed text
        args.vocab = train_rank_file(work / "tiktoken.model", args.vocab_size, corpus)
    text_dir = args.text_dir or Path(transformers.__file__).parent / "models"
    documents = python_sources(text_dir, int(args.megabytes * 1e6))
    size = sum(len(d.encode("utf-8")) for d in documents)

    build_ours, _, ours = timed(lambda: KimiTokenizer(str(args.vocab)))
    ours.save_pretrained(work / "saved")
    reload_ours, _, _ = timed(lambda: KimiTokenizer.from_pretrained(work / "saved"))
    ranks = load_tiktoken_ranks(args.vocab)
    specials = {token.content: index for index, token in ours.added_tokens_decoder.items()}
    build_tt, _, reference = timed(lambda: tiktoken.Encoding("kimi", pat_str=PAT_STR, mergeable_ranks=ranks,
                                                             special_tokens=specials))

    backend = ours.backend_tokenizer
    runs = {
        "tiktoken encode_batch": lambda: reference.encode_batch(documents, allowed_special="all"),
        "KimiTokenizer(documents)": lambda: ours(documents)["input_ids"],
        "backend encode_batch_fast": lambda: [e.ids for e in backend.encode_batch_fast(documents,
                                                                                       add_special_tokens=False)],
    }
    if args.compare is not None:
        spec = importlib.util.spec_from_file_location("compared_tokenization_kimi", args.compare)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        other = module.KimiTokenizer(str(args.vocab))
        runs[f"{args.compare.name} KimiTokenizer"] = lambda: other(documents)["input_ids"]
    results = {name: run() for name, run in runs.items()}  # warm-up, and the ids must agree
    same = all(result == results["tiktoken encode_batch"] for result in results.values())
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for name, run in runs.items():
            wall, cpu, _ = timed(run)
            times[name].append((wall, cpu))

    print(f"\ntransformers {transformers.__version__}, tokenizers {__import__('tokenizers').__version__}, "
          f"tiktoken {tiktoken.__version__}, {os.cpu_count()} CPUs")
    print(f"rank file: {args.vocab} ({len(ranks):,} tokens + {len(specials)} special)")
    print(f"text: {len(documents)} files from {text_dir}, {size / 1e6:.2f} MB; same ids: {same}")
    print(f"build from the rank file: KimiTokenizer {build_ours:.2f} s (reload from tokenizer.json "
          f"{reload_ours:.2f} s), tiktoken {build_tt:.2f} s")
    medians = {}
    for name, samples in times.items():
        wall = statistics.median(w for w, _ in samples)
        cpu = statistics.median(c for _, c in samples)
        medians[name] = (wall, cpu)
        print(f"{name:30s} wall {wall:6.3f} s ({size / 1e6 / wall:5.2f} MB/s)  cpu {cpu:6.3f} s")
    tw, tc = medians["tiktoken encode_batch"]
    for name, (wall, cpu) in medians.items():
        if name != "tiktoken encode_batch":
            print(f"{name} / tiktoken: wall {wall / tw:.2f}x, cpu {cpu / tc:.2f}x (medians of {args.rounds} rounds)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
