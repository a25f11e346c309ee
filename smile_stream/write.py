"""Write: stream the planned shards to disk, atomically, with a journal that makes runs resumable.

Order of a run: metadata files (config, remote code, tokenizer, model card), then each shard as
`<name>.partial` -> fsync -> rename -> journal entry, then the index, last. A folder without its
index is unfinished, and both loaders say so. Tensors that pass through unchanged are copied
file to file by the kernel (`copy_file_range`), never through Python memory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from . import modeling_smile
from .errors import SmileError
from .modeling_smile import INDEX_FILE
from .output import MODEL_CARD, REMOTE_CODE, SPECTRA, atomic_write, crash_point, save_journal
from .plan import Plan, ShardPlan, TensorPlan
from .report import model_card, spectra_record
from .sources import HASH_CHUNK
from .tensors import DTYPES, FLOAT_CODES, TensorInfo, is_finite, nonfinite_error


def write_metadata(plan: Plan, out: Path, journal: dict) -> None:
    """Everything but the weights: config, remote code, tokenizer and generation files, model card.
    Their digests go into the journal, so that `verify` notices an edited config or remote code."""
    files = {
        "config.json": (json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode(),
        REMOTE_CODE: Path(modeling_smile.__file__).read_bytes(),
        **{name: path.read_bytes() for name, path in plan.copied_files.items()},
        MODEL_CARD: model_card(plan, out.name).encode(),
    }
    if plan.spectra:
        files[SPECTRA] = json.dumps(spectra_record(plan)).encode()
    for name, data in files.items():
        atomic_write(out / name, data)
    journal["metadata"] = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    save_journal(out, journal)


def write_shards(
    plan: Plan,
    out: Path,
    journal: dict,
    produce: Callable[[TensorPlan], torch.Tensor],
    on_shard: Callable[[ShardPlan, bool], None],
    *,
    only: set[str] | None = None,
    record: Callable[[str, dict], None] | None = None,
    index: bool = True,
) -> dict[str, int]:
    """Write every shard not already finished (of `only`, when given), then the index (unless
    `index` is False). `produce` makes non-copied tensors. A finished shard's entry goes to the
    journal, or to `record(name, entry)` (a process of a multi-process run).

    The main thread only moves bytes (kernel copies, produced tensors). One worker thread, in
    order, hashes them and checks copied tensors for NaN/Inf, then commits each shard (fsync,
    rename, journal entry), so checksums and disk flushes overlap with the next tensors' work.
    Returns how many base files were placed by each method ("hard link", "reflink", "copy").
    """

    def in_journal(name: str, entry: dict) -> None:
        journal["shards"][name] = entry
        save_journal(out, journal)

    def record_placed(shard: ShardPlan, path: Path, how: str, number: int) -> None:
        crash_point(f"shard-{number}-renamed")
        placed[how] = placed.get(how, 0) + 1
        # no checksum (that would read the whole file): verify compares with the source instead
        entry = {
            "sha256": "",
            "size": shard.size,
            "placed": how,
            "source": str(shard.source),
            "mtime_ns": path.stat().st_mtime_ns,
        }
        (record or in_journal)(shard.filename, entry)
        on_shard(shard, False)

    placed: dict[str, int] = {}

    def commit(shard: ShardPlan, writer: ShardWriter, number: int) -> None:
        digest = writer.commit()
        if shard.source is not None:
            placed["copy"] = placed.get("copy", 0) + 1
        crash_point(f"shard-{number}-renamed")
        (record or in_journal)(shard.filename, {"sha256": digest, "size": shard.size})
        on_shard(shard, False)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="smile-commit") as worker:
        commits: list[Future] = []
        for number, shard in enumerate(plan.shards, 1):
            if only is not None and shard.filename not in only:
                continue
            done = journal["shards"].get(shard.filename)
            path = out / shard.filename
            if done and path.is_file() and path.stat().st_size == shard.size:
                on_shard(shard, True)
                continue
            if shard.source is not None and plan.options.base_files != "copy":
                # a base file passing unchanged: linked whole if the filesystem can, else copied below
                crash_point(f"shard-{number}-mid")
                how = place_file(shard.source, path, plan.options.base_files == "link")
                if how is not None:
                    commits.append(worker.submit(record_placed, shard, path, how, number))
                    continue
            for future in commits:
                if future.done():
                    future.result()  # a failed commit (disk full at fsync, NaN found late) stops the run
            writer, handed_over = ShardWriter(shard, path, worker), False
            try:
                writer.fill(produce, number)
                commits.append(worker.submit(commit, shard, writer, number))
                handed_over = True
            except BaseException:  # also a signal between the last byte and the hand-over: drop the file
                if not handed_over:
                    writer.abandon()
                raise
        for future in commits:
            future.result()
    if index:
        write_index(out, plan.shards, {"smile_plan_hash": plan.hash}, crash="index")
    return placed


def write_index(out: Path, shards: list[ShardPlan], metadata: dict, crash: str | None = None) -> None:
    """`model.safetensors.index.json`: weight map and `metadata.total_size` (tensor bytes)."""
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.nbytes for s in shards for t in s.tensors)
    index = {"metadata": {"total_size": total, **metadata}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode(), crash=crash)


def write_shard(shard: ShardPlan, path: Path, produce: Callable[[TensorPlan], torch.Tensor]) -> str:
    """Stream one planned shard to `path` (via `<path>.partial`, fsynced, renamed); returns its sha256."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        writer = ShardWriter(shard, path, worker)
        writer.fill(produce)
        return worker.submit(writer.commit).result()


class ShardWriter:
    """One shard being written to `<path>.partial`: header first, then tensors in plan order."""

    def __init__(self, shard: ShardPlan, path: Path, worker: ThreadPoolExecutor):
        self.shard, self.path, self.worker = shard, path, worker
        self.tmp = path.with_name(path.name + ".partial")
        self.hasher = hashlib.sha256()
        self.pending: list[Future] = []
        self.fd: int | None = None
        self.written = 0

    def fill(self, produce: Callable[[TensorPlan], torch.Tensor], number: int = 0) -> None:
        try:
            # opened inside the try: a Ctrl-C or SIGTERM right after the open still removes the file
            # a fresh file: a `.partial` left by a killed run may be a hard link to an input, and
            # truncating it would destroy the input
            self.tmp.unlink(missing_ok=True)
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._append(len(self.shard.header).to_bytes(8, "little") + self.shard.header)
            for position, tensor in enumerate(self.shard.tensors):
                if tensor.role == "copy":
                    self._copy(tensor.source)
                else:
                    data = produce(tensor)  # checked finite by tensors.cast, where it was made
                    if tuple(data.shape) != tensor.shape:
                        raise RuntimeError(f"{tensor.name}: produced shape {tuple(data.shape)}, planned {tensor.shape}")
                    self._append(memoryview(data.contiguous().view(-1).view(torch.uint8).numpy()))
                if position == 0:
                    crash_point(f"shard-{number}-mid")
                self.check()
        except BaseException:
            self.abandon()
            raise

    def _append(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        start = self.written
        while view:
            n = os.write(self.fd, view)
            view, self.written = view[n:], self.written + n
        _start_writeback(self.fd, start, self.written - start)
        self.pending.append(self.worker.submit(self.hasher.update, data))  # `data` stays alive until hashed

    def _copy(self, info: TensorInfo) -> None:
        with open(info.file, "rb") as src:
            left, offset = info.nbytes, info.offset
            while left:
                n = _kernel_copy(src.fileno(), self.fd, offset, left)
                offset, left = offset + n, left - n
        _start_writeback(self.fd, self.written, info.nbytes)
        self.written += info.nbytes
        self.pending.append(self.worker.submit(_hash_source, self.hasher, info))

    def check(self) -> None:
        """Raise what the worker found so far (NaN/Inf in a copied tensor)."""
        while self.pending and self.pending[0].done():
            self.pending.pop(0).result()

    def commit(self) -> str:
        """(On the worker, after all hashing.) fsync, close, rename; the shard's sha256."""
        try:
            for job in self.pending:
                job.result()  # the worker ran them already; re-raises NaN/Inf found in a copied tensor
            os.fsync(self.fd)

        except BaseException:
            self.abandon()
            raise
        os.close(self.fd)
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.hasher.hexdigest()

    def abandon(self) -> None:
        for future in self.pending:
            future.cancel()
        fd, self.fd = self.fd, None  # idempotent: never close a descriptor number twice
        try:
            if fd is not None:
                os.close(fd)
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)  # never leave a half-written shard behind an error we survive


def _hash_source(hasher: hashlib._Hash, info: TensorInfo) -> None:
    """Hash a copied tensor's bytes from the source's pages (as copied), checking them for NaN/Inf."""
    if not info.nbytes:
        return
    with open(info.file, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
        finite = True
        for start in range(info.offset, info.offset + info.nbytes, HASH_CHUNK):
            with view[start : min(start + HASH_CHUNK, info.offset + info.nbytes)] as chunk:
                hasher.update(chunk)
                if info.dtype in FLOAT_CODES and finite:
                    finite = _finite_bytes(chunk, DTYPES[info.dtype])
    if not finite:
        raise nonfinite_error(info)


def _finite_bytes(chunk: memoryview, dtype: torch.dtype) -> bool:
    with warnings.catch_warnings():  # a read-only view: nothing writes through it
        warnings.simplefilter("ignore", UserWarning)
        return is_finite(torch.frombuffer(chunk, dtype=dtype))


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    # Ask the kernel to start flushing what was just written, so the shard's final fsync is short.
    if _LIBC is not None and nbytes:
        _LIBC.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(nbytes), _SYNC_FILE_RANGE_WRITE)


@contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """Turn a full disk or an unwritable folder into a clear message; finished shards stay."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise SmileError(
                f"The disk holding {out} is full ({exc.filename or 'while writing'}). Free space and run the same "
                "command again: finished shards are kept and the run resumes after them."
            ) from None
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise SmileError(
                f"{out} cannot be written ({exc.strerror}: {exc.filename}). Choose a writable output folder."
            ) from None
        raise


FICLONE = 0x40049409  # linux/fs.h: share the source's blocks copy-on-write (btrfs, XFS, bcachefs, ...)
_LINK_ERRORS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES, errno.ENOSYS)


def place_file(source: Path, path: Path, required: bool) -> str | None:
    """Put the input file `source` at `path` as a hard link, else a reflink (copy-on-write clone),
    never opening an existing file for writing; None when the filesystem offers neither (the
    caller copies it), or a SmileError when a link is `required` (`--base-files link`)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return "hard link"
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in _LINK_ERRORS:
            raise
    src, dst = os.open(source, os.O_RDONLY), None
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.ioctl(dst, FICLONE, src)
        os.fsync(dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno not in (*_LINK_ERRORS, errno.EINVAL, errno.ENOTTY, errno.EBADF):
            raise
        if required:
            raise SmileError(
                f"--base-files link: {source} can be neither hard-linked nor reflinked into {path.parent} (another "
                "filesystem, or one without links). Use --base-files auto to copy it, or an output folder on the "
                "base's filesystem."
            ) from None
        return None
    finally:
        if dst is not None:
            os.close(dst)
        os.close(src)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return "reflink"


def _kernel_copy(src: int, dst: int, offset: int, count: int) -> int:
    try:
        n = os.copy_file_range(src, dst, count, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        n = os.sendfile(dst, src, offset, count)
    if n <= 0:
        raise OSError(errno.EIO, f"short copy from an input file at offset {offset}; is it truncated?")
    return n


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
