"""Build the demo model's training corpus: the Python standard library's own source code.

The corpus is available offline on every machine that has Python and is redistributable under the PSF License
(the demo checkpoint ships only weights and a tokenizer trained on it, not the text). Files are read in sorted
order; ``encodings/`` (mostly generated code-page tables) and ``site-packages/`` are left out; each file is
preceded by a one-line header ``# file: <relative path>`` and followed by a form-feed separator so that
documents can be split again. One file in 50 (chosen by a stable hash of its path) goes to the validation split.

    python demo/corpus.py --out corpus/        # writes train.txt, valid.txt and manifest.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
from pathlib import Path

SEPARATOR = "\n\f\n"
SKIP_TOP = ("encodings", "site-packages", "__pycache__")
VALID_EVERY = 50


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted ``.py`` files of the standard library that go into the corpus."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if p.relative_to(root).parts[0] not in SKIP_TOP and "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relative_path: str) -> bool:
    """Stable split: a file is in the validation set when the hash of its relative path says so."""
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % VALID_EVERY == 0


def document(root: Path, path: Path) -> str:
    """One corpus document: a header naming the file, then its text (undecodable bytes replaced)."""
    rel = path.relative_to(root).as_posix()
    return f"# file: {rel}\n" + path.read_bytes().decode("utf-8", errors="replace")


def build_corpus(out_dir: str | os.PathLike, root: Path | None = None) -> dict:
    """Write ``train.txt``, ``valid.txt`` and ``manifest.json`` into ``out_dir`` (atomically) and return the manifest."""
    root = root or stdlib_root()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        splits["valid" if is_validation(rel) else "train"].append(document(root, path))
    manifest = {
        "source": "Python standard library (PSF License)",
        "python": platform.python_version(),
        "root": str(root),
        "separator": SEPARATOR,
    }
    for name, docs in splits.items():
        text = SEPARATOR.join(docs)
        tmp = out / f".{name}.txt.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / f"{name}.txt")
        manifest[name] = {"documents": len(docs), "characters": len(text),
                          "sha256": hashlib.sha256(text.encode()).hexdigest()}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    manifest = build_corpus(args.out)
    print(json.dumps({k: v for k, v in manifest.items() if k in ("python", "train", "valid")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
