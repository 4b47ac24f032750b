"""Copy the package's current modules into the demo checkpoint (its remote code), leaving the weights alone.

The demo checkpoint carries copies of ``modeling_kimi_linear/`` so that ``trust_remote_code=True`` loads it where
the package is not installed. Run this after changing the package's modules (tests/test_cli.py fails until the
copies match):

    python demo/refresh_code.py            # or --check: exit 1 and list the stale files, change nothing
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "kimi-linear-demo"
sys.path.insert(0, str(ROOT))

from conversion.convert_released_checkpoint import code_files, package_dir  # noqa: E402


def wanted_files() -> list[Path]:
    """The package modules the demo checkpoint must carry: the model's and its tokenizer's."""
    return code_files(("configuration_kimi_linear", "modeling_kimi_linear", "tokenization_kimi_sp"))


def stale_files(demo: Path = DEMO) -> list[str]:
    """Names of the modules that are missing from ``demo``, differ from the package's, or are no longer used."""
    wanted = {p.name: p for p in wanted_files()}
    stale = [name for name, src in wanted.items()
             if not (demo / name).is_file() or (demo / name).read_bytes() != src.read_bytes()]
    stale += [p.name for p in demo.glob("*.py") if p.name not in wanted and (package_dir() / p.name).is_file()]
    return sorted(stale)


def refresh(demo: Path = DEMO) -> list[str]:
    """Bring the copies in ``demo`` up to date (each written to a temp file, then renamed). Returns their names."""
    wanted = {p.name: p for p in wanted_files()}
    changed = stale_files(demo)
    for name in changed:
        if name not in wanted:
            (demo / name).unlink()
            continue
        fd, tmp = tempfile.mkstemp(dir=demo, suffix=".tmp")
        os.close(fd)
        shutil.copyfile(wanted[name], tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, demo / name)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only list stale files; exit 1 if there are any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        print("\n".join(stale) if stale else "demo checkpoint code is up to date")
        return 1 if stale else 0
    changed = refresh()
    print(f"refreshed {len(changed)} file(s): {', '.join(changed)}" if changed else "already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
