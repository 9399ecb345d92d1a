"""Shared fixtures: one demo model per test session, services over it, fakes for GPU-only calls."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests never reach the hub (there is no network in CI): fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (opt-in: ZIMAGE_TEST_GPU=1)")
    config.addinivalue_line("markers", "server: starts the app on a loopback port")
    config.addinivalue_line("markers", "browser: drives headless Chromium")
    config.addinivalue_line("markers", "ray: starts a local Ray instance (skipped without requirements-ray.txt)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ZIMAGE_TEST_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="GPU tier is opt-in: set ZIMAGE_TEST_GPU=1 on a machine with a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding the demo model, built once per test session."""
    from zimage.demo_model import ensure_demo_model

    folder = tmp_path_factory.mktemp("zimage-data")
    ensure_demo_model(folder)
    return folder


@pytest.fixture
def demo_settings(data_dir: Path, tmp_path: Path):
    """Settings for the demo model with a fresh outputs folder."""
    from zimage.settings import Settings

    return Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path / "outputs")


@pytest.fixture(scope="session")
def shared_service(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One loaded demo service for tests that only generate (loading is the slow part)."""
    from zimage.service import GenerationService
    from zimage.settings import Settings

    settings = Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path_factory.mktemp("outputs"))
    service = GenerationService(settings)
    service.load()
    return service
