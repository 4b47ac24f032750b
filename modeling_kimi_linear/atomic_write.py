"""Whole-or-nothing file writes for the tokenizers' saved files.

Neither the standard library nor transformers has a public helper for this, so it is written once here and imported
by both tokenizer modules (it is copied into checkpoints beside them as remote code: standard library only).
"""

from __future__ import annotations

import os
import tempfile


def write_atomically(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename, so that ``path`` is
    either the old file or the whole new one. The file gets the usual mode (``0o666`` minus the umask), not the
    ``0o600`` of a temporary file. Parent directories are created. Returns ``path`` as a string."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
