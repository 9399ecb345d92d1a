"""Output storage: atomic writes, safe names, metadata that PIL reads back."""

from __future__ import annotations

import builtins
import errno
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from zimage.errors import StorageError, ZImageError
from zimage.storage import MIN_FREE_BYTES, PARTIAL_SUFFIX, STALE_PARTIAL_AGE_S, OutputStore, read_metadata


def image() -> Image.Image:
    return Image.new("RGB", (32, 16), (10, 200, 30))


def test_round_trip_and_names(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out")
    meta = {"prompt": "夕阳下的山 mountains at sunset", "seed": 7, "steps": 8, "width": 32, "height": 16,
            "guidance_scale": 0.0, "model": "demo", "profile": "cpu (bf16)", "version": "0.1.0"}
    path = store.save(image(), "req/../1", 0, meta)
    assert path.parent == tmp_path / "out" and path.name.endswith("-req1-0.png")
    assert read_metadata(path) == meta
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (32, 16)
        assert png.text["Description"] == meta["prompt"]
    assert os.listdir(tmp_path / "out") == [path.name]  # no temporary file left behind


def test_distinct_names_for_distinct_jobs_and_indices(tmp_path: Path) -> None:
    store = OutputStore(tmp_path)
    paths = {store.save(image(), rid, i, {}) for rid in ("a", "b") for i in range(2)}
    assert len(paths) == 4


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    class Broken:
        def save(self, handle, **kwargs):
            handle.write(b"half a png")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        OutputStore(tmp_path).save(Broken(), "x", 0, {})
    assert list(tmp_path.iterdir()) == []


def test_partial_file_is_written_first_then_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name, Path(src).exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    final = OutputStore(tmp_path).save(image(), "job", 0, {"seed": 1})
    (src, dst, existed), = seen
    assert src == f".{final.name}{PARTIAL_SUFFIX}" and dst == final.name and existed


def test_missing_metadata_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "plain.png"
    image().save(path)
    with pytest.raises(ValueError, match="no 'zimage' metadata"):
        read_metadata(path)


# --- All or nothing, and failures of the folder itself ----------------------------------------------

def test_save_all_keeps_every_image_with_its_metadata(tmp_path: Path) -> None:
    store = OutputStore(tmp_path / "out")
    images = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(3)]
    paths = store.save_all(images, "req", [{"seed": 10 + i} for i in range(3)])
    assert [p.name.rsplit("-", 1)[1] for p in paths] == ["0.png", "1.png", "2.png"]
    assert [read_metadata(p)["seed"] for p in paths] == [10, 11, 12]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(p.name for p in paths)
    with pytest.raises(ValueError, match="2 images but 1 metadata"):
        store.save_all(images[:2], "req", [{}])


def test_second_image_failing_leaves_no_file_of_the_request(tmp_path: Path) -> None:
    class FullDisk:
        def save(self, handle, **kwargs):
            handle.write(b"half a png")
            raise OSError(errno.ENOSPC, "No space left on device")

    folder = tmp_path / "out"
    with pytest.raises(StorageError) as caught:
        OutputStore(folder).save_all([image(), FullDisk()], "two", [{}, {}])
    assert os.listdir(folder) == []  # neither the first image nor any partial
    message = str(caught.value)
    assert f"the disk holding {folder} is full (no space left)" in message and "--outputs-dir" in message
    assert isinstance(caught.value, ZImageError)


def test_a_failed_rename_removes_the_images_already_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace
    calls = []

    def replace_once(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EROFS, "Read-only file system")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_once)
    with pytest.raises(StorageError, match=r"is on a read-only file system: remount it read-write"):
        OutputStore(tmp_path).save_all([image(), image(), image()], "three", [{}, {}, {}])
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "is full (no space left)"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "may not write in"),
    (errno.EPERM, "(permission denied)"),
    (errno.ENOENT, "does not exist any more"),
    (errno.EIO, "EIO"),
])
def test_folder_failures_become_one_clear_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        code: int, words: str) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    real_open = builtins.open

    def failing_open(path, *args, **kwargs):
        if str(path).endswith(PARTIAL_SUFFIX):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    with pytest.raises(StorageError) as caught:
        OutputStore(folder).save(image(), "job", 0, {})
    message = str(caught.value)
    assert words in message and str(folder) in message and "ZIMAGE_OUTPUTS_DIR" in message
    assert "Traceback" not in message and "\n" not in message
    assert os.listdir(folder) == []


def test_an_error_without_errno_is_passed_on_unchanged(tmp_path: Path) -> None:
    class Broken:
        def save(self, handle, **kwargs):
            raise ValueError("cannot encode this image")

    with pytest.raises(ValueError, match="cannot encode"):
        OutputStore(tmp_path).save_all([image(), Broken()], "x", [{}, {}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o500 folder anyway")
def test_a_read_only_folder_for_real(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(StorageError, match="may not write in"):
            OutputStore(folder).save(image(), "job", 0, {})
        assert "may not write in" in OutputStore(folder).problem()
    finally:
        folder.chmod(0o700)


# --- problem(): what /healthz and the start-up check report ----------------------------------------

def test_problem_is_none_for_a_usable_folder_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "outputs"
    assert OutputStore(folder).problem() is None
    assert folder.is_dir() and list(folder.iterdir()) == []  # created; the probe file is gone again


def test_problem_for_a_path_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    reason = OutputStore(tmp_path / "file" / "sub").problem()
    assert reason is not None and str(tmp_path / "file" / "sub") in reason and "is a file" in reason
    reason = OutputStore(tmp_path / "file").problem()
    assert reason is not None and "is a file" in reason and "\n" not in reason


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only file system"),
                                             (errno.EACCES, "may not write in"),
                                             (errno.ENOSPC, "is full")])
def test_problem_when_the_probe_file_cannot_be_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       code: int, words: str) -> None:
    def failing_open(path, flags, mode=0o777):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(os, "open", failing_open)
    reason = OutputStore(tmp_path).problem()
    assert reason is not None and words in reason and str(tmp_path) in reason and "--outputs-dir" in reason


def test_problem_when_the_disk_is_nearly_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs(tmp_path)

    class NearlyFull:
        f_frsize = 4096
        f_bavail = (MIN_FREE_BYTES // 4096) - 1
        f_blocks = real.f_blocks

    monkeypatch.setattr(os, "statvfs", lambda path: NearlyFull())
    reason = OutputStore(tmp_path).problem()
    assert reason is not None and "has only 63 MiB free (less than 64 MiB)" in reason and str(tmp_path) in reason
    assert OutputStore(tmp_path).problem(min_free_bytes=MIN_FREE_BYTES - 4096) is None


# --- Partial files left by a process that died mid-save -----------------------------------------

def test_stale_partials_are_removed_and_young_ones_kept(tmp_path: Path) -> None:
    old = time.time() - STALE_PARTIAL_AGE_S - 5
    stale = [tmp_path / ".20260101-000000-a-0.png.partial", tmp_path / ".write-probe-1-2.partial"]
    for path in stale:
        path.write_bytes(b"half")
        os.utime(path, (old, old))
    young = tmp_path / ".20260101-000000-b-0.png.partial"  # maybe another live process's write
    young.write_bytes(b"half")
    kept = [tmp_path / "20260101-000000-a-1.png", tmp_path / "notes.partial", tmp_path / ".hidden"]
    for path in kept:
        path.write_bytes(b"keep")
        os.utime(path, (old, old))
    assert OutputStore(tmp_path).remove_stale_partials() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept + [young])
    assert OutputStore(tmp_path).remove_stale_partials(older_than_s=0) == 1 and not young.exists()
    assert OutputStore(tmp_path / "missing").remove_stale_partials() == 0
