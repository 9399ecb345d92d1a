"""A least-recently-used cache of prompt embeddings, bounded in bytes. Pure: no torch here.

The text encoder (Qwen3-4B, 8 GB in bf16) runs once per request before the transformer; a repeated prompt gives
the same embeddings, so the service keeps them in host RAM (:mod:`zimage.service`, ``--prompt-cache-mb``) and a hit
skips the encoder entirely: under model offload the encoder is then never moved to the GPU for that request.

What identifies an entry (:class:`PromptKey`): the prompt, the negative prompt (only when guidance is on: without
guidance the pipeline never encodes it), guidance on/off, the token limit, and the text encoder's identity (the
model, its compute dtype and whether its weights are stored in fp8). LoRA adapters are not part of the key: in this
project they change the transformer only, never the text encoder.

The values are opaque to this module; the caller gives their size in bytes (``size_bytes``) and is responsible for
storing copies that nothing else mutates (the service stores CPU copies of the tensors).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

MIB = 1024**2
#: Default bound (``--prompt-cache-mb``): a prompt's embeddings are its token count x 2560 x 2 bytes for the real
#: model, at most 512 tokens = 2.5 MiB, so 256 MiB holds at least a hundred prompts (thousands of short ones).
DEFAULT_PROMPT_CACHE_MB = 256


@dataclass(frozen=True)
class PromptKey:
    """What the embeddings of one request depend on (see the module docstring)."""

    prompt: str
    negative_prompt: str | None  # None without guidance: the negative prompt is not encoded then
    guidance: bool
    max_tokens: int
    encoder: str  # the text encoder's identity: model, compute dtype, storage dtype


def prompt_key(prompt: str, negative_prompt: str, guidance_scale: float, max_tokens: int, encoder: str) -> PromptKey:
    """The key of one request's embeddings; the negative prompt counts only with guidance (``guidance_scale > 0``)."""
    guidance = guidance_scale > 0
    return PromptKey(prompt, negative_prompt if guidance else None, guidance, max_tokens, encoder)


@dataclass(frozen=True)
class PromptCacheStats:
    """Counters since start (``hits``, ``misses``, ``evictions``) and the current content (``entries``, ``bytes``)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int = 0


class PromptCache:
    """LRU of values bounded by the sum of their sizes in bytes. Thread-safe (the GPU worker reads and writes it,
    the metrics scrape reads its stats). ``max_bytes=0`` disables it: every lookup misses and nothing is stored.

    ``size_bytes(value)`` gives an entry's size; a value larger than ``max_bytes`` is not stored.
    """

    def __init__(self, max_bytes: int, size_bytes: Callable[[Any], int]) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} must be 0 (off) or more")
        self.max_bytes = max_bytes
        self._size_bytes = size_bytes
        self._entries: OrderedDict[PromptKey, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: PromptKey) -> Any | None:
        """The value stored for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: PromptKey, value: Any) -> bool:
        """Store ``value``, evicting the least recently used entries until the total fits; False when it was not
        stored (the cache is off, or the value alone is larger than the bound)."""
        size = int(self._size_bytes(value))
        with self._lock:
            if not self.enabled or size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._entries and self._bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self._evictions += 1
            self._entries[key] = (value, size)
            self._bytes += size
            return True

    def clear(self) -> None:
        """Drop every entry (the model was reloaded: its text encoder may differ); the counters stay."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PromptCacheStats:
        with self._lock:
            return PromptCacheStats(hits=self._hits, misses=self._misses, evictions=self._evictions,
                                    entries=len(self._entries), bytes=self._bytes, max_bytes=self.max_bytes)
