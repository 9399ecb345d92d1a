"""The prompt-embedding cache: the pure LRU, and the service skipping the text encoder on a hit (demo model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zimage.prompt_cache import PromptCache, prompt_key
from zimage.service import GenerationRequest, GenerationService
from zimage.settings import Settings

SMALL = dict(width=256, height=256, steps=2, seed=5)


def key(prompt: str, **kw):
    return prompt_key(prompt, kw.get("negative", ""), kw.get("guidance", 0.0), 512, kw.get("encoder", "m"))


# --- The pure LRU ------------------------------------------------------------------------------------------

def test_eviction_is_by_bytes_least_recently_used_first() -> None:
    cache = PromptCache(100, size_bytes=len)
    assert cache.put(key("a"), b"x" * 40) and cache.put(key("b"), b"x" * 40)
    assert cache.get(key("a")) is not None  # a is now the most recently used
    assert cache.put(key("c"), b"x" * 40)  # 120 > 100: b goes, not a
    assert cache.get(key("b")) is None and cache.get(key("a")) is not None and cache.get(key("c")) is not None
    stats = cache.stats()
    assert (stats.entries, stats.bytes, stats.evictions, stats.hits, stats.misses) == (2, 80, 1, 3, 1)
    assert not cache.put(key("huge"), b"x" * 101)  # larger than the bound: not stored, nothing evicted
    assert cache.stats().entries == 2
    cache.put(key("a"), b"x" * 10)  # replacing an entry counts its new size only
    assert cache.stats().bytes == 50
    cache.clear()
    assert (cache.stats().entries, cache.stats().bytes, cache.stats().hits) == (0, 0, 3)


def test_off_stores_nothing_and_every_lookup_misses() -> None:
    cache = PromptCache(0, size_bytes=len)
    assert not cache.enabled and not cache.put(key("a"), b"x")
    assert cache.get(key("a")) is None and cache.stats().misses == 1
    with pytest.raises(ValueError, match="max_bytes=-1"):
        PromptCache(-1, size_bytes=len)


def test_the_key_ignores_the_negative_prompt_without_guidance() -> None:
    assert key("a", negative="ugly") == key("a", negative="")  # not encoded without guidance
    assert key("a", negative="ugly", guidance=4.0) != key("a", negative="", guidance=4.0)
    assert key("a", guidance=4.0) != key("a")
    assert key("a", encoder="m (compute bf16, storage fp8)") != key("a", encoder="m (compute bf16, storage bf16)")


# --- The service on the demo model -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    svc = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path_factory.mktemp("out")))
    svc.load()
    yield svc
    svc.close()


def encoder_forwards(svc: GenerationService) -> list:
    """Count the text encoder's forwards with a forward hook (torch's public API); returns the list and the handle."""
    calls: list = []
    handle = svc._pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_hit_skips_the_text_encoder_and_gives_the_same_pixels(service: GenerationService) -> None:
    from zimage.metrics import Metrics

    metrics = Metrics(service)
    before = service.prompt_cache.stats()
    calls, handle = encoder_forwards(service)
    try:
        miss = service.generate(GenerationRequest(prompt="a lighthouse, cache test", **SMALL))
        assert len(calls) == 1
        hit = service.generate(GenerationRequest(prompt="a lighthouse, cache test", **SMALL))
        assert len(calls) == 1  # the encoder did not run
        other = service.generate(GenerationRequest(prompt="a different prompt, cache test", **SMALL))
        assert len(calls) == 2
    finally:
        handle.remove()
    assert np.array_equal(pixels(miss.paths[0]), pixels(hit.paths[0]))
    assert not np.array_equal(pixels(miss.paths[0]), pixels(other.paths[0]))
    after = service.prompt_cache.stats()
    assert (after.hits - before.hits, after.misses - before.misses) == (1, 2)
    assert after.bytes > 0
    text = metrics.render()[0].decode()
    assert f"zimage_prompt_cache_hits_total {after.hits}.0" in text
    assert f"zimage_prompt_cache_misses_total {after.misses}.0" in text
    assert f"zimage_prompt_cache_bytes {after.bytes}.0" in text


def test_guidance_and_the_negative_prompt_are_part_of_the_key(service: GenerationService) -> None:
    calls, handle = encoder_forwards(service)
    try:
        base = dict(prompt="a cat, guidance test", guidance_scale=2.0, **SMALL)
        first = service.generate(GenerationRequest(negative_prompt="blurry", **base))
        assert len(calls) == 2  # prompt and negative prompt
        again = service.generate(GenerationRequest(negative_prompt="blurry", **base))
        assert len(calls) == 2
        service.generate(GenerationRequest(negative_prompt="dark", **base))
        assert len(calls) == 4  # another negative prompt: encoded again
    finally:
        handle.remove()
    assert np.array_equal(pixels(first.paths[0]), pixels(again.paths[0]))


def test_the_cache_is_dropped_with_the_pipeline_and_can_be_off(data_dir: Path, tmp_path: Path) -> None:
    svc = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path, prompt_cache_mb=0))
    svc.load()
    try:
        calls, handle = encoder_forwards(svc)
        for _ in range(2):
            svc.generate(GenerationRequest(prompt="no cache", **SMALL))
        handle.remove()
        assert len(calls) == 2 and svc.prompt_cache.stats().entries == 0
    finally:
        svc.close()
    svc = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path))
    svc.load()
    svc.generate(GenerationRequest(prompt="kept until the reload", **SMALL))
    assert svc.prompt_cache.stats().entries == 1
    svc.unload()  # the same path as a reload: the pipeline (and its text encoder) is dropped
    assert svc.prompt_cache.stats().entries == 0
    svc.close()
