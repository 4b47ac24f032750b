"""Streaming safetensors I/O for checkpoint conversion, independent of the model.

What is here:

* :func:`read_header` / :func:`scan_checkpoint`: parse and validate safetensors headers (8-byte little-endian
  length + JSON) of a single ``model.safetensors`` or of the shards named by ``model.safetensors.index.json``,
  without reading tensor data; pickle weights (``.bin``, ``.pt``, ...) are refused and never opened.
* :func:`stream_convert`: write a re-sharded copy (optionally cast) into a temporary directory next to the
  destination, verify it, then move it into place. Tensor data is copied in chunks through one reusable buffer,
  so resident memory does not grow with the checkpoint or with the shard size.
* :func:`verify_checkpoint`: re-read a written checkpoint and compare every tensor with its source.
* :class:`CheckpointError`: every problem with the input, the output location or the disk, with one message
  naming the file, tensor or path concerned.

The safetensors format (header JSON with ``dtype``, ``shape`` and ``data_offsets`` relative to the end of the
header, data little-endian and contiguous) is written directly here so that a shard can be produced while only
one chunk of one tensor is in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # --dtype choices -> safetensors codes
TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

GiB = 1024**3
MiB = 1024**2


class CheckpointError(Exception):
    """Bad input, output location or disk: the message names the file, tensor or path concerned."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as stored in a safetensors file (nothing is read until it is copied)."""

    name: str
    path: Path
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in ``path``
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: its output name and dtype, and where its data comes from."""

    name: str
    source: TensorEntry
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.source.numel * ITEMSIZE[self.dtype]


@dataclass
class Summary:
    """What :func:`stream_convert` wrote."""

    dst: Path
    tensors: int
    parameters: int
    bytes: int
    shards: list[str] = field(default_factory=list)
    verified: bool = False

    def describe(self) -> str:
        where = self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards + {INDEX_NAME}"
        text = (f"wrote {self.dst}: {self.tensors:,} tensors, {self.parameters:,} parameters, "
                f"{human_bytes(self.bytes)} ({self.bytes:,} bytes) in {where}")
        if self.verified:
            text += f"\nverified: all {self.tensors:,} tensors re-read from {self.dst} match the source"
        return text


# ---------------------------------------------------------------------------------------------------- sizes
def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse a byte size: ``"5GB"`` (10^9), ``"4GiB"`` (2^30), ``"500MB"``, ``"64KiB"``, ``"123"`` (bytes)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None or (match.group(3) and not match.group(2)):
        raise ValueError(f"cannot read {text!r} as a size (examples: 5GB, 500MB, 4GiB, 1048576)")
    number, prefix, binary = float(match.group(1)), match.group(2).lower(), bool(match.group(3))
    power = "kmgt".index(prefix) + 1 if prefix else 0
    value = int(number * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


# ---------------------------------------------------------------------------------------------------- reading
def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate the header of one safetensors file: ``({name: TensorEntry}, metadata)``.

    Detects truncated files (header or data cut short), headers that are not JSON, unknown dtypes, offsets
    that disagree with shape x dtype, and gaps or overlaps in the data section.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, not even a header length)")
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if length > size - 8:
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file (header length {length:,} bytes, "
                f"file size {size:,} bytes)"
            )
        if length == 0 or length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: corrupt safetensors file (header length {length:,} bytes)")
        raw = fh.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + length, size - 8 - length
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not isinstance(begin, int) \
                    or not isinstance(end, int):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for tensor {name!r})") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        need = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != need or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (tensor {name!r}: data_offsets [{begin}, {end}] but shape "
                f"{list(shape)} x {dtype} needs {need:,} bytes)"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {data_start + end:,}, "
                f"the file has {size:,} bytes)"
            )
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, need)
    position = data_start
    for entry in sorted(entries.values(), key=lambda e: (e.offset, e.nbytes)):
        if entry.offset != position:
            raise CheckpointError(
                f"{path}: corrupt safetensors file (tensor {entry.name!r} starts at byte {entry.offset:,}, "
                f"expected {position:,}: gap or overlap in the data)"
            )
        position += entry.nbytes
    if position != size:
        raise CheckpointError(f"{path}: corrupt safetensors file ({size - position:,} bytes after the last tensor)")
    return entries, metadata


def _refuse_pickle(src: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{src}: the weights are pickle files ({', '.join(names)}); pickle can run arbitrary code, so they are "
        "never opened. Convert them to safetensors with a tool you trust, then run this again."
    )


def scan_checkpoint(src: Path) -> dict[str, TensorEntry]:
    """All tensors of the checkpoint directory ``src`` (index + shards or a single file), validated, unread.

    Raises :class:`CheckpointError` for a missing shard, an index naming a tensor no shard holds (or a shard
    holding a tensor the index does not list), corrupt or truncated files, and pickle-only weights.
    """
    src = Path(src)
    index = src / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid index (JSON object with a 'weight_map' of file names)") \
                from None
        shards = sorted(set(weight_map.values()))
        pickled = [s for s in shards if s.lower().endswith(PICKLE_SUFFIXES)]
        if pickled:
            raise _refuse_pickle(src, pickled)
        headers: dict[str, dict[str, TensorEntry]] = {}
        for shard in shards:
            path = src / shard
            if Path(shard).name != shard:
                raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name inside {src}")
            if not path.is_file():
                raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {src}")
            headers[shard] = read_header(path)[0]
        entries: dict[str, TensorEntry] = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{index} maps tensor {name!r} to {shard}, which does not hold it")
            entries[name] = headers[shard][name]
        for shard, held in headers.items():
            extra = sorted(set(held) - {n for n, s in weight_map.items() if s == shard})
            if extra:
                raise CheckpointError(f"{src / shard} holds tensor {extra[0]!r}, which {index.name} does not list")
        return entries
    single = src / SINGLE_NAME
    if single.is_file():
        return read_header(single)[0]
    pickled = sorted(p.name for p in src.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    if pickled:
        raise _refuse_pickle(src, pickled)
    loose = sorted(p.name for p in src.glob("*.safetensors"))
    if loose:
        raise CheckpointError(f"{src}: safetensors shards ({', '.join(loose[:3])}...) but no {INDEX_NAME}")
    raise CheckpointError(f"{src}: no {SINGLE_NAME} or {INDEX_NAME} (not a checkpoint directory?)")


class _SourceFiles:
    """Open source files, one handle each, reading chunks into a caller's buffer (plain reads, no mmap: pages
    of a memory-mapped file would count as resident memory until the mapping closes)."""

    def __init__(self) -> None:
        self._handles: dict[Path, BinaryIO] = {}

    def chunks(self, entry: TensorEntry, chunk_elems: int, buffer: bytearray) -> Iterator[memoryview]:
        """Yield the tensor's bytes in pieces of at most ``chunk_elems`` elements (views into ``buffer``)."""
        fh = self._handles.get(entry.path)
        if fh is None:
            fh = self._handles[entry.path] = open(entry.path, "rb")  # noqa: SIM115 (closed in close())
        step = chunk_elems * ITEMSIZE[entry.dtype]
        view = memoryview(buffer)
        fh.seek(entry.offset)
        left = entry.nbytes
        while left:
            want = min(step, left)
            got = 0
            while got < want:
                n = fh.readinto(view[got:want])
                if not n:
                    raise CheckpointError(f"{entry.path}: truncated while reading tensor {entry.name!r}")
                got += n
            left -= want
            yield view[:want]

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()


def cast_chunk(chunk: memoryview, src_dtype: str, dst_dtype: str) -> memoryview:
    """Cast raw little-endian floats from ``src_dtype`` to ``dst_dtype`` (safetensors codes); no-op if equal."""
    if src_dtype == dst_dtype or len(chunk) == 0:
        return chunk
    values = torch.frombuffer(chunk, dtype=FLOAT_DTYPES[src_dtype]).to(FLOAT_DTYPES[dst_dtype])
    return memoryview(values.view(torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------------- writing
def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy split in the given order; a shard exceeds ``max_shard_size`` only to hold one larger tensor."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-0000N.safetensors``..."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _shard_header(tensors: list[OutTensor]) -> tuple[bytes, list[OutTensor]]:
    """Header bytes (length prefix included) and the data order: widest dtype first, so that every tensor
    starts at a multiple of its element size; the JSON is padded with spaces to a multiple of 8 bytes."""
    ordered = sorted(tensors, key=lambda t: -ITEMSIZE[t.dtype])
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in ordered:
        header[tensor.name] = {"dtype": tensor.dtype, "shape": list(tensor.source.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, ordered


def chunk_elements(memory_budget_bytes: int) -> int:
    """Elements per copy chunk: the working set (read buffer, cast result, and the two buffers of --verify) is at
    most 4 chunks of 8-byte elements, kept to an eighth of the budget, at least 4 KiB and at most 64 MiB per
    buffer."""
    chunk_bytes = max(4096, min(64 * MiB, memory_budget_bytes // 8))
    return chunk_bytes // 8


def write_shards(tensors: list[OutTensor], out_dir: Path, max_shard_size: int, chunk_elems: int,
                 desc: str = "writing") -> list[str]:
    """Write ``tensors`` (in order) into shards under ``out_dir`` plus the index when there are several."""
    shards = plan_shards(tensors, max_shard_size)
    names = shard_names(len(shards))
    files = _SourceFiles()
    buffer = bytearray(chunk_elems * 8)
    total = sum(t.nbytes for t in tensors)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
            for name, shard in zip(names, shards):
                head, ordered = _shard_header(shard)
                with open(out_dir / name, "wb") as out:
                    out.write(head)
                    for tensor in ordered:
                        for chunk in files.chunks(tensor.source, chunk_elems, buffer):
                            data = cast_chunk(chunk, tensor.source.dtype, tensor.dtype)
                            out.write(data)
                            bar.update(len(data))
    finally:
        files.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total, "total_parameters": sum(t.source.numel for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard},
        }
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


# ---------------------------------------------------------------------------------------------------- verify
def verify_checkpoint(out_dir: Path, tensors: list[OutTensor], chunk_elems: int, desc: str = "verifying") -> None:
    """Re-read ``out_dir`` from disk (index, headers, data) and compare every tensor with its source, byte for
    byte after the same dtype cast. The safetensors library must also accept every shard and list the same
    names, dtypes and shapes."""
    from safetensors import safe_open

    written = scan_checkpoint(out_dir)
    expected = {t.name: t for t in tensors}
    missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    if missing or extra:
        what = f"tensor {missing[0]!r} is missing" if missing else f"unexpected tensor {extra[0]!r}"
        raise CheckpointError(f"verify: {out_dir}: {what}")
    for path in sorted({e.path for e in written.values()}):
        with safe_open(str(path), framework="pt") as reader:  # header only; no tensor data is touched
            for name in reader.keys():
                piece = reader.get_slice(name)
                want = expected[name]
                if piece.get_dtype() != want.dtype or tuple(piece.get_shape()) != want.source.shape:
                    raise CheckpointError(f"verify: {path}: tensor {name!r} is {piece.get_dtype()} "
                                          f"{piece.get_shape()}, expected {want.dtype} {list(want.source.shape)}")
    files = _SourceFiles()
    buf_src, buf_dst = bytearray(chunk_elems * 8), bytearray(chunk_elems * 8)
    try:
        with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc) as bar:
            for tensor in tensors:
                got = written[tensor.name]
                if got.dtype != tensor.dtype or got.shape != tensor.source.shape:
                    raise CheckpointError(f"verify: {got.path}: tensor {tensor.name!r} is {got.dtype} "
                                          f"{list(got.shape)}, expected {tensor.dtype} {list(tensor.source.shape)}")
                pairs = zip(files.chunks(tensor.source, chunk_elems, buf_src),
                            files.chunks(got, chunk_elems, buf_dst))
                for src_chunk, dst_chunk in pairs:
                    if cast_chunk(src_chunk, tensor.source.dtype, tensor.dtype) != dst_chunk:
                        raise CheckpointError(
                            f"verify: tensor {tensor.name!r} in {got.path} differs from {tensor.source.path}"
                        )
                    bar.update(len(dst_chunk))
    finally:
        files.close()


# ---------------------------------------------------------------------------------------------------- destination
def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an existing ``dst`` without ``overwrite``, and any ``dst`` that is, contains or lies in ``src``."""
    src_r, dst_r = Path(src).resolve(), Path(dst).resolve()
    if dst_r == src_r or src_r in dst_r.parents or dst_r in src_r.parents:
        raise CheckpointError(f"destination {dst} must lie outside the source {src} (and not contain it)")
    if Path(dst).exists() or Path(dst).is_symlink():
        if not overwrite:
            raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it")
        if Path(dst).is_symlink() or not Path(dst).is_dir():
            what = "a symbolic link" if Path(dst).is_symlink() else "not a directory"
            raise CheckpointError(f"destination {dst} is {what}; --overwrite replaces a checkpoint directory only")


def check_disk_space(dst: Path, needed: int) -> None:
    """Raise if the file system that will hold ``dst`` has less than ``needed`` bytes free."""
    probe = Path(dst).resolve().parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise CheckpointError(
            f"not enough disk space for {dst}: {human_bytes(needed)} needed, {human_bytes(free)} free on {probe}"
        )


@contextlib.contextmanager
def staged_directory(dst: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``dst``; on success it replaces ``dst`` (atomically when
    ``dst`` does not exist), on any failure it is deleted and ``dst`` is left as it was."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        if dst.exists() or dst.is_symlink():
            if not overwrite:
                raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
            os.replace(dst, old / "previous")
            try:
                os.replace(tmp, dst)
            except BaseException:
                os.replace(old / "previous", dst)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- driver
def default_memory_budget(tensors: list[OutTensor]) -> int:
    """The issue's bound: twice the largest tensor (source or cast) plus 1 GiB."""
    largest = max((max(t.source.nbytes, t.nbytes) for t in tensors), default=0)
    return 2 * largest + GiB


def stream_convert(
    tensors: list[OutTensor],
    dst: Path,
    *,
    write_extras: Callable[[Path], None] | None = None,
    max_shard_size: int = 5 * 10**9,
    memory_budget_bytes: int | None = None,
    verify: bool = False,
    overwrite: bool = False,
    extra_bytes: int = 64 * MiB,
) -> Summary:
    """Write ``tensors`` as a safetensors checkpoint at ``dst``, streaming chunk by chunk.

    Args:
        tensors: what to write, in output order (see :class:`OutTensor`); key and shape checks are the caller's.
        dst: destination directory. The checkpoint is assembled in a temporary directory next to it and moved
            into place only after everything (weights, ``write_extras``, ``verify``) succeeded.
        write_extras: called with the staging directory to add config, code and tokenizer files.
        max_shard_size: bytes per shard (a single larger tensor gets a shard of its own).
        memory_budget_bytes: bound on the working buffers; default :func:`default_memory_budget` (twice the
            largest tensor plus 1 GiB). Copy chunks are sized from it (:func:`chunk_elements`), so the resident
            memory does not depend on the checkpoint, tensor or shard size.
        verify: re-read the written files and compare every tensor with the source.
        overwrite: replace an existing ``dst``.
        extra_bytes: disk space reserved beyond the tensor data (headers, index, config, code, tokenizer).
    """
    dst = Path(dst)
    if memory_budget_bytes is None:
        memory_budget_bytes = default_memory_budget(tensors)
    chunk_elems = chunk_elements(memory_budget_bytes)
    total = sum(t.nbytes for t in tensors)
    header_bytes = sum(len(t.name) + 96 for t in tensors)
    check_disk_space(dst, total + 2 * header_bytes + extra_bytes)
    with staged_directory(dst, overwrite) as stage:
        names = write_shards(tensors, stage, max_shard_size, chunk_elems, desc=f"writing {dst.name}")
        if write_extras is not None:
            write_extras(stage)
        if verify:
            verify_checkpoint(stage, tensors, chunk_elems, desc=f"verifying {dst.name}")
    return Summary(dst=dst, tensors=len(tensors), parameters=sum(t.source.numel for t in tensors), bytes=total,
                   shards=names, verified=verify)


__all__ = [
    "CheckpointError", "FLOAT_DTYPES", "DTYPE_NAMES", "INDEX_NAME", "ITEMSIZE", "OutTensor", "SINGLE_NAME",
    "MiB", "PICKLE_SUFFIXES", "Summary", "TORCH_NAMES", "TensorEntry", "cast_chunk", "check_destination",
    "check_disk_space", "chunk_elements",
    "default_memory_budget", "human_bytes", "natural_key", "parse_size", "plan_shards", "read_header",
    "scan_checkpoint", "staged_directory", "stream_convert", "verify_checkpoint", "write_shards",
]
