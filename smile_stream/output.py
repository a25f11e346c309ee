"""The output folder: one writer at a time, nothing of the user's ever removed, and resume only
from the same plan and the same input files.

- `OutputLock`: an exclusive `flock` on `smile-stream.lock` for the whole run; a second run into
  the same folder stops at once, naming the pid that holds it.
- `prepare_output`: refuses an output folder that is, contains, or lies inside an input (symlinks
  followed), and a folder holding files no smile-stream run wrote; `--overwrite` removes only the
  files of the earlier conversion (those its journal lists or that smile-stream names so), never
  a folder, and says what it removed and what it kept.
- The journal (`smile-journal.json`) records the plan, each finished shard's sha256, the digests of
  the metadata files, and what identifies each input file's content, so a resume notices inputs
  saved again with identical headers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
from pathlib import Path

from . import fields
from .errors import SmileError
from .modeling_smile import INDEX_FILE, SMILE_FORMAT_VERSION
from .plan import COPIED_FILES, SHARD_NAME, Plan, explain_changes
from .sources import input_identity

JOURNAL = "smile-journal.json"
LOCK_FILE = "smile-stream.lock"
REMOTE_CODE = "modeling_smile.py"
MODEL_CARD = "README.md"
SPECTRA = "smile-spectra.json"  # `--expert-rank energy:F`: every delta's spectrum, for `inspect --png`
RANK_JOURNAL = "smile-journal.rank-{}.json"  # the shards one process of a multi-process run finished
_RANK_JOURNAL_PATTERN = re.compile(r"smile-journal\.rank-\d+\.json")
_OWN_NAMES = {JOURNAL, INDEX_FILE, "config.json", REMOTE_CODE, MODEL_CARD, SPECTRA, *COPIED_FILES}
_SHARD_PATTERN = re.compile(re.escape(SHARD_NAME).replace(re.escape("{:05d}"), r"\d{5}"))  # any shard name plan gives


def crash_point(name: str) -> None:
    """Fault injection for the kill tests: send this process a signal (SIGKILL, or the one named by
    SMILE_STREAM_CRASH_SIGNAL, e.g. SIGTERM) at the named point of a run when SMILE_STREAM_CRASH_AT
    names it. Points: plan, metadata, shard-<i>-mid, shard-<i>-renamed, index."""
    rank = os.environ.get("SMILE_STREAM_CRASH_RANK")  # in a multi-process run: only this rank
    if os.environ.get("SMILE_STREAM_CRASH_AT") == name and rank in (None, os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.Signals[os.environ.get("SMILE_STREAM_CRASH_SIGNAL", "SIGKILL")])


def atomic_write(path: Path, data: bytes, crash: str | None = None) -> None:
    """Write a small file so that it is either absent, or complete: temp file, fsync, rename."""
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.unlink(missing_ok=True)  # never write through a file left behind (it could be a link)
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if crash:
            crash_point(crash)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_journal(out: Path) -> dict | None:
    """The folder's journal; None if it has none. A journal that is not one smile-stream wrote (bad
    JSON, fields of the wrong type) is refused, naming the field: such a folder is not resumed."""
    path = out / JOURNAL
    if not path.is_file():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SmileError(f"{path} is not valid JSON ({exc}); it is not a journal smile-stream wrote, or it is damaged.") from None
    where = str(path)
    fields.check(journal, "dict", where)
    fields.get(journal, "format_version", "int", where)
    fields.get(journal, "plan_hash", "str", where)
    fields.get(journal, "record", "dict", where)
    _shard_records(journal, where)
    for key in ("inputs", "metadata"):
        for name, value in fields.get(journal, key, "dict", where, {}).items():
            fields.check(value, "dict" if key == "inputs" else "str", f"{where}: {key}[{name!r}]")
    return journal


def save_journal(out: Path, journal: dict) -> None:
    atomic_write(out / JOURNAL, json.dumps(journal, indent=1, sort_keys=True).encode())


def save_rank_journal(out: Path, rank: int, plan_hash: str, shards: dict) -> None:
    """The shards process `rank` of a multi-process run finished (rank 0 merges them)."""
    record = {"plan_hash": plan_hash, "shards": shards}
    atomic_write(out / RANK_JOURNAL.format(rank), json.dumps(record, indent=1, sort_keys=True).encode())


def _shard_records(journal: dict, where: str) -> dict:
    """A journal's `shards`: {shard file: {"sha256": str, "size": int, ...}}, each field of its type."""
    shards = fields.get(journal, "shards", "dict", where)
    for name, entry in shards.items():
        fields.check(entry, "dict", f"{where}: shards[{name!r}]")
        fields.get(entry, "sha256", "str", f"{where}: shards[{name!r}]")
        fields.get(entry, "size", "int", f"{where}: shards[{name!r}]")
    return shards


def rank_journals(out: Path) -> list[Path]:
    """The journal files of the processes of a multi-process run, in `out`."""
    return sorted(p for p in out.glob("smile-journal.rank-*.json") if _RANK_JOURNAL_PATTERN.fullmatch(p.name))


def merge_rank_journals(out: Path, journal: dict) -> None:
    """Move the finished shards recorded by the processes of a multi-process run (this one, or an
    earlier one with any number of processes) into the journal, and remove their files. Records of
    another plan are dropped: those shards are written again."""
    paths = rank_journals(out)
    for path in paths:
        where = str(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise SmileError(f"{path} is not valid JSON ({exc}); remove it to resume (its shards are written again).") from None
        fields.check(record, "dict", where)
        if fields.get(record, "plan_hash", "str", where) == journal["plan_hash"]:
            journal["shards"].update(_shard_records(record, where))
    save_journal(out, journal)
    for path in paths:
        path.unlink()


def input_identities(plan: Plan) -> dict[str, dict]:
    """What identifies the content of every input file the run reads: {path: identity}."""
    paths = [*plan.base.read_paths, *(p for e in plan.experts for p in e.source.read_paths)]
    return {str(p): input_identity(p) for p in paths}


def changed_inputs(recorded: dict, current: dict) -> list[str]:
    """Input files whose identity differs between a journal and now."""
    return sorted(p for p in set(recorded) | set(current) if recorded.get(p) != current.get(p))


class OutputLock:
    """An exclusive lock on the output folder, held for the whole run (`flock` on `smile-stream.lock`,
    which is removed on release). A second run gets a SmileError naming the holder's pid."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise SmileError(
                        f"--out {out} is being written by another smile-stream run (pid {holder}). Wait for it to finish, "
                        "or stop it; two runs into one folder would mix their shards."
                    ) from None
                raise
            # the holder before us may have removed the file after we opened it: lock the one on disk
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_not_overlapping(out: Path, plan: Plan) -> None:
    """No input (folder or file, symlinks followed) may be, contain, or lie inside the output folder."""
    out_real = out.resolve()
    inputs = [("the base", plan.base)] + [(f"expert {e.name!r}", e.source) for e in plan.experts]
    for what, source in inputs:
        folder = source.folder.resolve()
        if out_real == folder or out_real.is_relative_to(folder):
            raise SmileError(
                f"--out {out} is inside the input folder of {what} ({source.folder}). Choose an output folder outside every input."
            )
        for path in [source.folder, *source.read_paths]:
            real = path.resolve()
            if real.is_relative_to(out_real):
                raise SmileError(
                    f"--out {out} contains {what} ({real}): writing there, or --overwrite, could destroy it. Choose an "
                    "output folder that neither contains nor lies inside an input."
                )


def open_output(out: Path, plan: Plan, overwrite: bool, say=print) -> tuple[OutputLock, dict]:
    """Create or reuse the output folder, lock it, and start its journal (the earlier one when
    resuming). Refuses folders that would lose or mix up data. Returns the lock, to be released
    when the run ends, and the journal."""
    check_not_overlapping(out, plan)
    if out.exists() and not out.is_dir():
        raise SmileError(f"--out {out} is a file. Choose a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(out)
    except OSError as exc:
        raise SmileError(f"--out {out} cannot be written ({exc.strerror}). Choose a writable folder.") from None
    try:
        inputs = input_identities(plan)
        journal = _check_contents(out, plan, inputs, overwrite, say)
        if journal is None:
            journal = {
                "format_version": SMILE_FORMAT_VERSION,
                "plan_hash": plan.hash,
                "record": plan.record,
                "shards": {},
            }
        journal["inputs"] = inputs
        merge_rank_journals(out, journal)  # shards finished by the processes of an earlier multi-process run
        # written before anything else, so a killed run is always recognised as unfinished; the
        # index goes next, so a repair run that stops half-way never leaves a finished-looking folder
        save_journal(out, journal)
        (out / INDEX_FILE).unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock, journal


def _check_contents(out: Path, plan: Plan, inputs: dict, overwrite: bool, say) -> dict | None:
    """The journal to resume, None to start afresh, or a SmileError saying why the folder is refused."""
    present = sorted(p for p in out.iterdir() if p.name != LOCK_FILE)
    if not present:
        return None
    journal = read_journal(out)
    if journal is None:
        raise SmileError(
            f"--out {out} already holds files that no smile-stream run wrote ({_names(present)}). --overwrite removes only "
            "the files of an earlier conversion, so choose an empty or new folder, or move those files away yourself."
        )
    own = [p for p in present if _is_own(p, journal)]
    others = [p for p in present if p not in own]
    if overwrite:
        for path in own:
            path.unlink()
        kept = f"; kept {len(others)} it did not write: {_names(others)}" if others else ""
        say(f"--overwrite: removed {len(own)} file(s) of the earlier conversion in {out} ({_names(own)}){kept}")
        return None
    if journal["plan_hash"] != plan.hash:
        changes = "; ".join(explain_changes(journal["record"], plan.record))
        raise SmileError(
            f"--out {out} holds a conversion made from different inputs or options ({changes}), so it cannot be "
            "resumed. Run the original command to finish it, choose another --out, or pass --overwrite to start over."
        )
    recorded = journal.get("inputs")
    if recorded is not None:
        changed = changed_inputs(recorded, inputs)
        if changed:
            raise SmileError(
                f"--out {out} holds an unfinished conversion whose input files changed since it started ({', '.join(changed[:3])}"
                f"{', ...' if len(changed) > 3 else ''}): their headers are the same but their contents may not be, and "
                "resuming would mix shards of old and new weights. Pass --overwrite to start over."
            )
    return journal


def _is_own(path: Path, journal: dict) -> bool:
    """A file a smile-stream run writes into its output folder (never a directory)."""
    name = path.name.removesuffix(".partial")
    if not path.is_file() or path.is_symlink():
        return False
    return (
        name in _OWN_NAMES
        or name in journal["shards"]
        or bool(_SHARD_PATTERN.fullmatch(name))
        or bool(_RANK_JOURNAL_PATTERN.fullmatch(name))
    )


def _names(paths: list[Path], limit: int = 6) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
