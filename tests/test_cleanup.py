"""scripts/cleanup_cache.py and zimage.cleanup: what goes, what stays, and never anything outside the root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zimage.cleanup import STALE_PARTIAL_S, FileEntry, choose_deletions, clean, folder_lock

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cleanup_cache.py"
NOW = 1_800_000_000.0
MIN = 60


def entry(name: str, age_s: float, size: int = 100) -> FileEntry:
    return FileEntry(Path("/out") / name, size, NOW - age_s)


def names(entries: list[FileEntry]) -> list[str]:
    return [e.path.name for e in entries]


@pytest.mark.parametrize("files, max_age_s, quota, expected", [
    # Age alone: older than the limit goes, the rest stays.
    ([("a.png", 40 * MIN), ("b.png", 10 * MIN)], 30 * MIN, None, ["a.png"]),
    ([("a.png", 29 * MIN)], 30 * MIN, None, []),
    # Quota: after the age rule, the oldest go first until the total fits.
    ([("a.png", 3 * MIN), ("b.png", 2 * MIN), ("c.png", 1 * MIN)], 30 * MIN, 150, ["a.png", "b.png"]),
    ([("a.png", 3 * MIN), ("b.png", 2 * MIN), ("c.png", 1 * MIN)], 30 * MIN, 300, []),
    ([("old.png", 60 * MIN), ("a.png", 3 * MIN), ("b.png", 2 * MIN)], 30 * MIN, 100, ["old.png", "a.png"]),
    # A file being written is never an age or quota victim ...
    ([(".x.png.partial", 40 * MIN), ("b.png", 1 * MIN)], 30 * MIN, 0, ["b.png"]),
    # ... unless its writer died long ago.
    ([(".x.png.partial", STALE_PARTIAL_S + 1)], 30 * MIN, None, [".x.png.partial"]),
])
def test_choose_deletions(files: list, max_age_s: float, quota: int | None, expected: list[str]) -> None:
    chosen = choose_deletions([entry(n, age) for n, age in files], NOW, max_age_s, quota)
    assert names(chosen) == expected


def make(path: Path, age_s: float, size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def run(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_") and k != "GRADIO_TEMP_DIR"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**clean_env, **(env or {})})


def test_old_files_go_new_stay_and_one_summary_line(tmp_path: Path) -> None:
    old = make(tmp_path / "old.png", 45 * MIN, 2_000_000)
    new = make(tmp_path / "new.png", 5 * MIN)
    other_kind = make(tmp_path / "notes.txt", 45 * MIN)  # not something the app writes
    done = run("--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert not old.exists() and new.exists() and other_kind.exists()
    assert done.stdout.splitlines() == [
        f"cleanup {tmp_path.resolve()}: deleted 1 files, 2.0 MB freed; kept 1 files, 0.0 MB"]


def test_quota_deletes_oldest_first(tmp_path: Path) -> None:
    files = [make(tmp_path / f"{i}.png", (10 - i) * MIN, 1_000_000) for i in range(5)]  # 0 is the oldest
    done = run("--dir", str(tmp_path), "--max-total-mb", "2.5", "--verbose")
    assert done.returncode == 0, done.stderr
    assert [f.exists() for f in files] == [False, False, False, True, True]
    assert done.stdout.count("deleted ") == 3 + 1  # three file lines and the summary


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    old = make(tmp_path / "old.png", 45 * MIN)
    done = run("--dir", str(tmp_path), "--dry-run", "--verbose")
    assert done.returncode == 0 and old.exists()
    assert f"would delete {old.resolve()}" in done.stdout and "would delete 1 files" in done.stdout


def test_symlinks_are_never_followed_nor_their_targets_touched(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    target = make(outside / "precious.png", 45 * MIN)
    root = tmp_path / "outputs"
    root.mkdir()
    (root / "link.png").symlink_to(target)
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    done = run("--dir", str(root), "--max-total-mb", "0.000001")
    assert done.returncode == 0, done.stderr
    assert target.exists() and (root / "link.png").is_symlink()
    assert "deleted 0 files" in done.stdout


def test_a_symlinked_root_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    make(real / "old.png", 45 * MIN)
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    done = run("--dir", str(tmp_path / "alias"))
    assert done.returncode == 1 and "symlink" in done.stderr and (real / "old.png").exists()


def test_a_file_being_written_is_kept(tmp_path: Path) -> None:
    partial = make(tmp_path / ".20260101-000000-abc-0.png.partial", 45 * MIN)
    done = run("--dir", str(tmp_path), "--max-total-mb", "0.000001")
    assert done.returncode == 0 and partial.exists()


def test_a_second_run_while_one_holds_the_lock_deletes_nothing(tmp_path: Path) -> None:
    old = make(tmp_path / "old.png", 45 * MIN)
    with folder_lock(tmp_path.resolve()):
        done = run("--dir", str(tmp_path))
        assert done.returncode == 0
        assert "another cleanup" in done.stdout and old.exists()
    assert run("--dir", str(tmp_path)).returncode == 0 and not old.exists()  # the lock is released


def test_two_runs_at_once_delete_each_file_once(tmp_path: Path) -> None:
    files = [make(tmp_path / f"{i:04d}.png", 45 * MIN, 10) for i in range(3000)]
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "--dir", str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    counts = []
    for out, err in outputs:
        assert "could not be deleted" not in out and not err
        counts.append(0 if "another cleanup" in out else int(out.split("deleted ")[1].split(" ")[0]))
    # One run did all the work; the other was turned away by the lock (or came after and found nothing).
    assert sorted(counts) == [0, len(files)] and not any(f.exists() for f in files)


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    done = run("--dir", str(tmp_path / "nope"))
    assert done.returncode == 1
    assert f"{tmp_path / 'nope'} does not exist" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any folder")
def test_unreadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        done = run("--dir", str(locked))
        assert done.returncode == 1 and "not readable" in done.stderr
    finally:
        locked.chmod(0o700)


def test_default_folder_comes_from_the_app_settings(tmp_path: Path) -> None:
    outputs = tmp_path / "from-env"
    old = make(outputs / "old.png", 45 * MIN)
    done = run(env={"ZIMAGE_OUTPUTS_DIR": str(outputs)})
    assert done.returncode == 0 and not old.exists()
    # And relative to the current folder, like the app: "outputs".
    old = make(tmp_path / "outputs" / "old.png", 45 * MIN)
    done = run(cwd=tmp_path)
    assert done.returncode == 0 and not old.exists()


def test_gradio_cache_is_cleaned_when_asked(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    cache = tmp_path / "gradio"
    old = make(cache / "3f2a" / "image.webp", 45 * MIN)  # Gradio's layout: one folder per file
    new = make(cache / "9c1d" / "image.png", 1 * MIN)
    env = {"ZIMAGE_OUTPUTS_DIR": str(outputs), "GRADIO_TEMP_DIR": str(cache)}
    assert run(env=env).returncode == 0 and old.exists()  # not without --gradio-cache
    done = run("--gradio-cache", env=env)
    assert done.returncode == 0 and not old.exists() and new.exists()
    assert not (cache / "3f2a").exists()  # the emptied folder goes too
    assert len(done.stdout.splitlines()) == 2  # one summary per folder


def test_clean_reports_errors_instead_of_crashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make(tmp_path / "old.png", 45 * MIN)

    def refuse(self: Path, missing_ok: bool = False) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)
    report = clean(tmp_path, max_age_s=60, max_total_bytes=None, suffixes=(".png",))
    assert report.deleted == () and len(report.errors) == 1 and "Permission denied" in report.errors[0]
    assert "1 could not be deleted" in report.summary()
