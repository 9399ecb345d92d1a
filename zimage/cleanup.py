"""Keep the outputs folder (and Gradio's temporary folder) bounded: the logic behind scripts/cleanup_cache.py.

Deciding is pure (:func:`choose_deletions` over a list of :class:`FileEntry`); :func:`scan` and
:func:`clean` are the thin adapters that read and change the disk. The rules:

* only regular files are candidates: symlinks are never followed nor deleted, and the walk never
  leaves the root (``os.walk(followlinks=False)`` plus ``lstat``);
* in the outputs folder only the kinds the app writes (``storage.OUTPUT_SUFFIXES``); in Gradio's
  temporary folder, which Gradio owns, any regular file;
* a file still being written (``storage``'s ``.<name>.partial`` names) is kept, unless it is older
  than :data:`STALE_PARTIAL_S`: then the writer died long ago and the file can never complete;
* files older than ``max_age_s`` go; then, while the rest exceeds ``max_total_bytes``, the oldest go.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .storage import PARTIAL_PREFIX, PARTIAL_SUFFIX

#: A partial file this old belongs to a writer that died (a PNG is written in well under a second).
STALE_PARTIAL_S = 24 * 3600
#: Lock file in the cleaned folder: two cleanups of one folder never run at once.
LOCK_NAME = ".zimage-cleanup.lock"


class CleanupError(Exception):
    """The folder cannot be cleaned (missing, not a folder, unreadable); the message says which and why."""


class CleanupBusy(Exception):
    """Another cleanup holds the folder's lock."""


@dataclass(frozen=True)
class FileEntry:
    """One regular file under the root, as ``lstat`` saw it."""

    path: Path
    size_bytes: int
    mtime_s: float

    @property
    def is_partial(self) -> bool:
        return self.path.name.startswith(PARTIAL_PREFIX) and self.path.name.endswith(PARTIAL_SUFFIX)


@dataclass(frozen=True)
class CleanupReport:
    """What one run did (or, in a dry run, would do)."""

    root: Path
    deleted: tuple[FileEntry, ...]
    kept_files: int
    kept_bytes: int
    dry_run: bool
    errors: tuple[str, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self.deleted)

    def summary(self) -> str:
        """The one line printed per run."""
        verb = "would delete" if self.dry_run else "deleted"
        line = (f"cleanup {self.root}: {verb} {len(self.deleted)} files, {_mb(self.freed_bytes)} freed; "
                f"kept {self.kept_files} files, {_mb(self.kept_bytes)}")
        if self.errors:
            line += f"; {len(self.errors)} could not be deleted"
        return line


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def choose_deletions(entries: Sequence[FileEntry], now_s: float, max_age_s: float,
                     max_total_bytes: int | None) -> list[FileEntry]:
    """Pure: which files to delete, oldest first. Partial files are only chosen when stale."""
    deletions: list[FileEntry] = []
    survivors: list[FileEntry] = []
    for entry in entries:
        age = now_s - entry.mtime_s
        if entry.is_partial:
            (deletions if age > STALE_PARTIAL_S else survivors).append(entry)
        elif age > max_age_s:
            deletions.append(entry)
        else:
            survivors.append(entry)
    if max_total_bytes is not None:
        total = sum(entry.size_bytes for entry in survivors)
        # Oldest first; a live partial file is never a quota victim.
        for entry in sorted((e for e in survivors if not e.is_partial), key=_oldest_first):
            if total <= max_total_bytes:
                break
            deletions.append(entry)
            total -= entry.size_bytes
    return sorted(deletions, key=_oldest_first)


def _oldest_first(entry: FileEntry) -> tuple[float, str]:
    return entry.mtime_s, str(entry.path)


def scan(root: Path, suffixes: tuple[str, ...] | None) -> list[FileEntry]:
    """Regular files under ``root`` (``suffixes=None``: any kind), without following symlinks."""
    entries: list[FileEntry] = []
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        # os.walk lists a symlink to a folder among dirnames but does not enter it; drop it to be explicit.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(folder, d))]
        for name in filenames:
            if name == LOCK_NAME:
                continue
            path = Path(folder, name)
            try:
                info = path.lstat()
            except FileNotFoundError:  # deleted meanwhile (Gradio's own sweep)
                continue
            if not stat.S_ISREG(info.st_mode):
                continue  # symlinks, sockets, fifos
            kind = name[:-len(PARTIAL_SUFFIX)] if name.endswith(PARTIAL_SUFFIX) else name
            if suffixes is not None and not kind.lower().endswith(suffixes):
                continue
            entries.append(FileEntry(path, info.st_size, info.st_mtime))
    return entries


def check_root(root: Path) -> Path:
    """The absolute root, or a :class:`CleanupError` naming the problem and the fix."""
    if not root.exists():
        raise CleanupError(f"{root} does not exist: check --dir (or ZIMAGE_OUTPUTS_DIR); the app creates "
                           "the outputs folder when it saves its first image.")
    if root.is_symlink() or not root.is_dir():
        raise CleanupError(f"{root} is not a folder (or is a symlink, which is never followed): give the "
                           "real outputs folder with --dir.")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise CleanupError(f"{root} is not readable and writable by this user: run the cleanup as the user "
                           "the app runs as.")
    return root.resolve()


@contextmanager
def folder_lock(root: Path) -> Iterator[None]:
    """Hold the folder's cleanup lock; :class:`CleanupBusy` when another run holds it."""
    fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CleanupBusy(f"another cleanup of {root} is running: skipped") from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


def clean(root: Path, *, max_age_s: float, max_total_bytes: int | None, suffixes: tuple[str, ...] | None,
          dry_run: bool = False, now_s: float | None = None) -> CleanupReport:
    """Scan ``root``, delete what :func:`choose_deletions` picks (unless ``dry_run``), report."""
    root = check_root(root)
    with folder_lock(root):
        entries = scan(root, suffixes)
        chosen = choose_deletions(entries, time.time() if now_s is None else now_s, max_age_s, max_total_bytes)
        deleted: list[FileEntry] = []
        errors: list[str] = []
        for entry in chosen:
            if dry_run:
                deleted.append(entry)
                continue
            try:
                entry.path.unlink()
                deleted.append(entry)
            except FileNotFoundError:
                pass  # already gone: nothing freed by us
            except OSError as exc:
                errors.append(f"{entry.path}: {exc.strerror}")
        if not dry_run:
            _remove_empty_folders(root)
    gone = {entry.path for entry in deleted}
    kept = [entry for entry in entries if entry.path not in gone]
    return CleanupReport(root, tuple(deleted), len(kept), sum(e.size_bytes for e in kept), dry_run, tuple(errors))


def _remove_empty_folders(root: Path) -> None:
    # Gradio keeps each file in a folder of its own; those folders are left empty once the file goes.
    for folder, dirnames, filenames in os.walk(root, topdown=False, followlinks=False):
        if Path(folder) != root and not dirnames and not filenames and not os.path.islink(folder):
            try:
                os.rmdir(folder)
            except OSError:
                pass  # something new arrived, or not ours to remove

