"""Files that the ranks of a process group write together, by slices, and then map read-only.

Each rank writes its rows into one temporary file that rank 0 renames over the target (ranks on several machines
need a shared file system). Every function here is a collective: every rank calls it with the same target."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Callable

import faiss
import numpy as np

from naics_hnm.atomic import create_temp, ensure_folder, remove_stale_temp_files
from naics_hnm.index.index_file import faiss_metric
from naics_hnm.index.sharded_search import Shard

_TEXT_SLOTS = 1024


def broadcast_text(shard: Shard, text: str) -> str:
    """Rank 0's ``text`` on every rank (at most :data:`_TEXT_SLOTS` UTF-8 bytes)."""
    slots = np.zeros(_TEXT_SLOTS + 1, dtype=np.int64)
    if shard.rank == 0:
        data = text.encode("utf-8")
        if len(data) > _TEXT_SLOTS:
            raise ValueError(f"broadcast_text: {len(data)} bytes; at most {_TEXT_SLOTS} fit (a shorter folder?)")
        slots[0] = len(data)
        slots[1:1 + len(data)] = np.frombuffer(data, dtype=np.uint8)
    first = shard.all_gather(slots)[0]
    return bytes(first[1:1 + int(first[0])].astype(np.uint8)).decode("utf-8")


def barrier(shard: Shard) -> None:
    """Wait until every rank of ``shard`` got here."""
    shard.all_gather(np.zeros(1, dtype=np.int64))


def write_together(target: str | Path, shard: Shard, create: Callable[[Path], None], write: Callable[[Path], None],
                   *, by_turns: bool = False) -> Path:
    """Rank 0 runs ``create(temp)``; then every rank ``write(temp)`` (rank by rank with ``by_turns``);
    then ``temp`` replaces ``target`` atomically. Returns ``target``."""
    target = Path(target)
    temp = None
    if shard.rank == 0:
        ensure_folder(target.parent)
        remove_stale_temp_files(target)
        temp = create_temp(target)
    try:
        if temp is not None:
            create(temp)
        shared = Path(broadcast_text(shard, "" if temp is None else str(temp)))
        for turn in range(shard.world_size if by_turns else 1):
            if not by_turns or turn == shard.rank:
                write(shared)
            barrier(shard)
        if temp is not None:
            os.replace(temp, target)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    barrier(shard)
    return target


def _write_at(path: Path, offset: int, rows: np.ndarray) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
        handle.flush()
        os.fsync(handle.fileno())


def _create_sized(header: bytes, data_bytes: int) -> Callable[[Path], None]:
    def create(path: Path) -> None:
        with open(path, "r+b") as handle:
            handle.write(header)
            handle.truncate(len(header) + data_bytes)
    return create


def write_rows(target: str | Path, shard: Shard, header: bytes, rows: np.ndarray, lo: int, n: int) -> Path:
    """A file of ``header`` + ``n`` fixed-size rows like ``rows``, this rank's ``rows`` at row ``lo``."""
    row_bytes = int(np.prod(rows.shape[1:], dtype=np.int64)) * rows.dtype.itemsize
    return write_together(target, shard, _create_sized(header, n * row_bytes),
                          lambda path: _write_at(path, len(header) + lo * row_bytes, rows) if len(rows) else None)


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def write_npy_rows(target: str | Path, shard: Shard, rows: np.ndarray, lo: int, n: int) -> np.ndarray:
    """Write a ``.npy`` array [n, *rows.shape[1:]] together (this rank's ``rows`` at ``lo``); return it mapped."""
    write_rows(target, shard, npy_header((n, *rows.shape[1:]), rows.dtype), rows, lo, n)
    return np.load(target, mmap_mode="r")


def flat_index_header(n: int, d: int, metric: str) -> bytes:
    """The bytes faiss writes before the vectors of a flat index of ``n`` rows (checked on one row)."""
    def header(index: faiss.Index, rows: int) -> bytes:
        empty = bytes(faiss.serialize_index(index))
        if len(empty) < 16 or empty[-8:] != bytes(8) or empty[8:16] != bytes(8):
            raise RuntimeError(f"faiss {faiss.__version__} writes flat indexes in a layout this code does not know")
        return empty[:8] + struct.pack("<q", rows) + empty[16:-8] + struct.pack("<Q", rows * d)

    make = faiss.IndexFlatL2 if faiss_metric(metric) == faiss.METRIC_L2 else faiss.IndexFlatIP
    probe = np.arange(1, d + 1, dtype=np.float32)[None]
    check = faiss.deserialize_index(np.frombuffer(header(make(d), 1) + probe.tobytes(), dtype=np.uint8))
    if check.ntotal != 1 or not np.array_equal(check.reconstruct(0), probe[0]):
        raise RuntimeError(f"faiss {faiss.__version__} writes flat indexes in a layout this code does not know")
    return header(make(d), n)


def write_flat_index_rows(target: str | Path, shard: Shard, rows: np.ndarray, lo: int, n: int, metric: str) -> Path:
    """A faiss flat index file over ``n`` float32 rows written together (this rank's ``rows`` at ``lo``), byte for
    byte what ``faiss.write_index`` writes for the whole matrix."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return write_rows(target, shard, flat_index_header(n, rows.shape[1], metric), rows, lo, n)


def write_index_together(target: str | Path, shard: Shard, build: Callable[[], faiss.Index]) -> Path:
    """Rank 0 writes the CPU faiss index ``build()`` returns; every rank waits for the file."""
    return write_together(target, shard, lambda temp: faiss.write_index(build(), str(temp)), lambda _: None)


def read_mapped_index(path: str | Path) -> faiss.Index:
    """A faiss index whose vectors (flat) or inverted lists (IVF) are the file's pages, mapped read-only."""
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
