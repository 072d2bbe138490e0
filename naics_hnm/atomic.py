"""Atomic file writes (a temporary ``.{target name}.{host}.{pid}.{random}.tmp`` beside the target, then
``os.replace``), removal of the temporaries of killed writers, and :func:`exclusive_lock` for work on one target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

STALE_AFTER_S = 24 * 3600
_CREATE_ATTEMPTS = 8


def this_host() -> str:
    """This machine's name as temporary and lock files carry it."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "host"


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(
        rf"\.{re.escape(target.name)}\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{{8}}\.tmp"
        rf"|\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp"  # mkstemp names of earlier versions
    )


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with that pid runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def is_stale_temp(temp: Path, match: re.Match[str], now: float) -> bool:
    """Whether a temporary's writer is gone: older than ``STALE_AFTER_S``, or a dead process of this host."""
    try:
        age = now - temp.stat().st_mtime
    except FileNotFoundError:  # its writer finished or another cleaner removed it
        return False
    return age > STALE_AFTER_S or (match["host"] == this_host() and not pid_alive(int(match["pid"])))


def remove_stale_temp_files(target: str | Path) -> list[Path]:
    """Remove the temporary files of earlier writes to ``target`` whose writers are gone."""
    target = Path(target)
    pattern = _temp_pattern(target)
    now = time.time()
    removed = []
    with os.scandir(target.parent) as entries:
        candidates = [(Path(e.path), m) for e in entries if (m := pattern.fullmatch(e.name))]
    for temp, match in candidates:
        if is_stale_temp(temp, match, now):
            temp.unlink(missing_ok=True)
            removed.append(temp)
            log.warning("removed %s, left behind by an interrupted write of %s", temp.name, target)
    return removed


def ensure_folder(folder: Path) -> None:
    """Create ``folder`` and its parents; a NotADirectoryError naming the file when it or a parent is one."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    folder.mkdir(parents=True, exist_ok=True)


def create_temp(target: Path) -> Path:
    """Create an empty ``.{target name}.{host}.{pid}.{random}.tmp`` beside ``target``; return its path."""
    for _ in range(_CREATE_ATTEMPTS):
        temp = target.with_name(f".{target.name}.{this_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue
        except OSError as err:  # report the target, not the hidden temporary name
            raise OSError(err.errno, err.strerror, str(target)) from None
    raise FileExistsError(errno.EEXIST, f"{_CREATE_ATTEMPTS} temporary names were taken", str(target))


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces it on success; on any error ``target`` stays as it was."""
    target = Path(target)
    ensure_folder(target.parent)
    remove_stale_temp_files(target)
    temp = create_temp(target)
    try:
        yield temp
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def atomic_write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, flushed to disk before it replaces ``target``."""
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


class LockTimeoutError(TimeoutError):
    """Another process held the lock on a target for longer than the caller would wait."""


def lock_holder(lock_path: str | Path) -> str:
    """Who holds (or last held) a lock file: ``"pid N on HOST"``, or ``"an unknown process"``."""
    try:
        fields = Path(lock_path).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):  # gone or unreadable: say so rather than fail the error message
        fields = []
    if len(fields) >= 2 and fields[0].isdigit():
        return f"pid {fields[0]} on {fields[1]}"
    return "an unknown process"


def _lock_until(fd: int, target: Path, lock_path: Path, timeout: float | None) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        log.info("waiting for %s, working on %s", lock_holder(lock_path), target)
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    errno.EAGAIN, f"{str(target)!r} is being written by {lock_holder(lock_path)} (lock "
                    f"{str(lock_path)!r} held for more than {timeout:g} s); expected it to finish: try again later "
                    "or stop that process", str(target)) from None
            time.sleep(0.05)


@contextlib.contextmanager
def exclusive_lock(target: str | Path, *, timeout: float | None = None, hidden: bool = False,
                   remove: bool = False) -> Iterator[Path]:
    """Hold an inter-process lock (``flock`` on ``{target}.lock``) for work on ``target``; yield the lock path.

    ``hidden``: the lock file is ``.{target name}.lock``; ``remove``: the holder deletes it before letting go. A waiter
    gives up after ``timeout`` seconds (None: never) with a :class:`LockTimeoutError` naming the holder's pid and host.
    """
    target = Path(target)
    ensure_folder(target.parent)
    lock_path = target.with_name(f".{target.name}.lock" if hidden else f"{target.name}.lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            _lock_until(fd, target, lock_path, timeout)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:  # the previous holder removed it after we opened it
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {this_host()}\n".encode(), 0)
        yield lock_path
    finally:
        if remove:
            lock_path.unlink(missing_ok=True)
        os.close(fd)
