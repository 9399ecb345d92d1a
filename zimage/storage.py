"""Output storage: PNGs saved atomically, with their generation parameters as PNG text metadata.

A file is written under a temporary name (``.<name>.partial``) in the same folder, flushed to disk,
and renamed into place, so a reader (the web app, ``scripts/cleanup_cache.py``) never sees half an
image. A request's images are kept all or none: every partial file is written before the first
rename. File names never contain the prompt: ``<UTC time>-<request id>-<index>.png``.

Failures of the folder itself (disk full, read-only, no permission, folder gone) become a
:class:`~zimage.errors.StorageError` that names the folder, the cause and the fix.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import StorageError

#: Prefix and suffix of files being written; the cleanup script leaves these alone.
PARTIAL_PREFIX = "."
PARTIAL_SUFFIX = ".partial"
#: The kinds of files the app writes (and the cleanup script may delete).
OUTPUT_SUFFIXES = (".png",)
#: zlib level for PNGs. Saving is host work on every job (it overlaps the next job's denoising, and on a
#: CPU competes with it); on a 1024x1024 photo-like image level 1 took 0.11 s against 0.42 s for PIL's
#: default 6, for files about 17% larger.
PNG_COMPRESS_LEVEL = 1
#: The PNG text key holding all parameters as one JSON object.
METADATA_KEY = "zimage"

#: problem() reports a folder whose disk has less free space than this (bytes). A 2048x2048 PNG at
#: PNG_COMPRESS_LEVEL is at most about 13 MiB, so 64 MiB still takes one full request of 4 such images.
MIN_FREE_BYTES = 64 * 1024**2
#: remove_stale_partials() leaves partial files younger than this (seconds) alone: a request's partials
#: exist only while its PNGs are written (seconds), and several processes may share one outputs folder
#: (deploy/supervisor/z-image-turbo-multi-gpu.conf), so a young one may be another live process's.
STALE_PARTIAL_AGE_S = 60.0
#: Where to point people whose outputs folder does not work.
_FIX_ELSEWHERE = "or set --outputs-dir (ZIMAGE_OUTPUTS_DIR) to a folder this process can write"

_SAFE_ID = re.compile(r"[^A-Za-z0-9_-]")


def describe_storage_error(folder: Path, exc: OSError) -> str | None:
    """One sentence naming ``folder``, what went wrong in words, and what to do; None for an OSError
    without an errno (raised by a library, not by the file system)."""
    code = exc.errno
    if code is None:
        return None
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "full (no space left)" if code == errno.ENOSPC else "over this user's disk quota"
        return (f"the disk holding {folder} is {what}: free space there (scripts/cleanup_cache.py deletes old "
                "images) or set --outputs-dir (ZIMAGE_OUTPUTS_DIR) to a folder on a disk with room.")
    if code == errno.EROFS:
        return f"{folder} is on a read-only file system: remount it read-write {_FIX_ELSEWHERE}."
    if code in (errno.EACCES, errno.EPERM):
        return (f"this process may not write in {folder} (permission denied): give its user write permission "
                f"there (chown/chmod) {_FIX_ELSEWHERE}.")
    if code == errno.ENOENT:
        return (f"{folder} does not exist any more (deleted, or its disk was unmounted): create it again "
                f"{_FIX_ELSEWHERE}.")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{folder} cannot be a folder: it or a part of its path is a file. Remove that file {_FIX_ELSEWHERE}."
    name = errno.errorcode.get(code, str(code))
    return f"writing in {folder} failed ({exc.strerror or name}, {name}): check that disk {_FIX_ELSEWHERE}."


class OutputStore:
    """The outputs folder. Thread-safe: names are unique per request id and index."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, image: Any, request_id: str, index: int, metadata: Mapping[str, Any]) -> Path:
        """Save ``image`` (a PIL image) with ``metadata`` and return the final path.

        Raises :class:`StorageError` when the folder cannot take it (nothing is left behind).
        """
        return self._save_indexed([(index, image, metadata)], request_id)[0]

    def save_all(self, images: Sequence[Any], request_id: str, metadatas: Sequence[Mapping[str, Any]],
                 check: Callable[[], None] | None = None) -> tuple[Path, ...]:
        """Save every image of one request (image ``i`` gets index ``i`` in its name), or none of them.

        ``check()`` is called after each image is written and before the files are renamed into place; whatever
        it raises (a cancel) removes the written files and propagates.

        All partial files are written and flushed before the first rename, so a full disk or a failing
        image leaves no file of this request; a failed rename removes the ones already renamed.
        Returns the final paths in order. Raises :class:`StorageError` for a folder that cannot take the
        images (disk full, read-only, no permission, folder gone), the original exception otherwise,
        and ``ValueError`` when the two sequences differ in length.
        """
        if len(images) != len(metadatas):
            raise ValueError(f"save_all got {len(images)} images but {len(metadatas)} metadata dicts: "
                             "give one metadata dict per image.")
        return self._save_indexed(list(zip(range(len(images)), images, metadatas)), request_id, check)

    def _save_indexed(self, items: Iterable[tuple[int, Any, Mapping[str, Any]]], request_id: str,
                      check: Callable[[], None] | None = None) -> tuple[Path, ...]:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        safe_id = _SAFE_ID.sub("", request_id)[:32] or "job"
        partials: list[Path] = []
        finals: list[Path] = []
        renamed: list[Path] = []  # only these finals are ours to delete again
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for index, image, metadata in items:
                name = f"{stamp}-{safe_id}-{index}.png"
                partial = self.root / f"{PARTIAL_PREFIX}{name}{PARTIAL_SUFFIX}"
                partials.append(partial)  # before the write: a half-written file is removed too
                _write_png(partial, image, metadata)
                finals.append(self.root / name)
                if check is not None:
                    check()
            for partial, final in zip(partials, finals):
                os.replace(partial, final)
                renamed.append(final)
        except BaseException as exc:
            for path in partials + renamed:
                try:
                    path.unlink(missing_ok=True)
                except OSError:  # the folder itself is gone or read-only: nothing more to clean
                    pass
            if isinstance(exc, OSError):
                message = describe_storage_error(self.root, exc)
                if message is not None:
                    raise StorageError(f"The image(s) were not saved: {message}") from exc
            raise
        return tuple(finals)

    def problem(self, min_free_bytes: int = MIN_FREE_BYTES) -> str | None:
        """Why images cannot be saved here now, in one line naming the folder and the fix; None when they can.

        Creates the folder if needed, creates and deletes a small probe file in it (the only reliable test:
        permissions, read-only mounts and ACLs all show up), and checks that its disk has at least
        ``min_free_bytes`` (bytes, default :data:`MIN_FREE_BYTES`) free for this user. Never raises.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return describe_storage_error(self.root, exc) or f"{self.root} cannot be created ({exc})."
        if not self.root.is_dir():
            return describe_storage_error(self.root, OSError(errno.ENOTDIR, "Not a directory"))
        # A partial-style name: the cleanup script skips it, and remove_stale_partials deletes a leftover.
        probe = self.root / f"{PARTIAL_PREFIX}write-probe-{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"z")
            finally:
                os.close(fd)
            probe.unlink(missing_ok=True)
        except OSError as exc:
            try:
                probe.unlink(missing_ok=True)
            except OSError:
                pass
            return describe_storage_error(self.root, exc) or f"writing in {self.root} failed ({exc})."
        if hasattr(os, "statvfs"):
            stats = os.statvfs(self.root)
            free = stats.f_bavail * stats.f_frsize  # f_bavail: what an unprivileged user may still use
            if free < min_free_bytes:
                return (f"the disk holding {self.root} has only {free // 1024**2} MiB free (less than "
                        f"{min_free_bytes // 1024**2} MiB): free space there (scripts/cleanup_cache.py deletes "
                        "old images) or set --outputs-dir (ZIMAGE_OUTPUTS_DIR) to a folder on a disk with room.")
        return None

    def remove_stale_partials(self, older_than_s: float = STALE_PARTIAL_AGE_S) -> int:
        """Delete ``.<name>.partial`` files last modified more than ``older_than_s`` seconds ago; return how many.

        Called at start: a partial file outlives its writer only when that process died mid-save, and is
        never completed afterwards. Younger ones may belong to another process sharing the folder (see
        :data:`STALE_PARTIAL_AGE_S`). A missing folder gives 0; files that cannot be deleted are skipped.
        """
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        now = time.time()
        removed = 0
        for entry in entries:
            if not (entry.name.startswith(PARTIAL_PREFIX) and entry.name.endswith(PARTIAL_SUFFIX)):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime >= older_than_s:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed


def _write_png(path: Path, image: Any, metadata: Mapping[str, Any]) -> None:
    """Write ``image`` as a PNG carrying ``metadata`` to ``path`` and flush it to disk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(dict(metadata), ensure_ascii=False, sort_keys=True))
    # The prompt also goes under the key most image tools show (iTXt: UTF-8, so Chinese survives).
    if "prompt" in metadata:
        info.add_itxt("Description", str(metadata["prompt"]))
    info.add_text("Software", f"z-image-turbo-server {metadata.get('version', '')}".strip())
    with open(path, "wb") as handle:
        image.save(handle, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
        handle.flush()
        os.fsync(handle.fileno())


def gradio_cache_dir(settings: Any, environ: Mapping[str, str]) -> Path:
    """Gradio's temporary folder for this app: the operator's ``GRADIO_TEMP_DIR``, else ``<data_dir>/gradio-cache``.

    app.py exports it before Gradio is imported; the cleanup script finds the same folder with it.
    """
    given = environ.get("GRADIO_TEMP_DIR")
    return Path(given) if given else (Path(settings.data_dir) / "gradio-cache").resolve()


def read_metadata(path: Path) -> dict[str, Any]:
    """The parameters stored in a PNG written by :class:`OutputStore`."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(METADATA_KEY)  # type: ignore[attr-defined]
    if text is None:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata")
    return json.loads(text)
