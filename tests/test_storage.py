"""Output storage: atomic writes, safe names, metadata that PIL reads back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from zimage.storage import PARTIAL_SUFFIX, OutputStore, read_metadata


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
