"""Errors the service reports to people. Each message says what happened and what to do."""

from __future__ import annotations

from typing import Any


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error (and the log) never echoes megabytes back. A cut text
    says how long the value is (a string's own characters, else its repr's)."""
    text = repr(value)
    length = len(value) if isinstance(value, str) else len(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({length} characters)"


def openai_error_body(message: str, type_: str, code: str | None, param: str | None = None) -> dict:
    """OpenAI's error JSON, ``{"error": {"message", "type", "param", "code"}}``: what the REST API answers, and the
    sign-in in front of it, so that the SDKs raise their usual exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, cut at a word to at most ``limit`` characters and then marked with
    "..." (its type's name when empty)."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if len(line) <= limit:
        return line
    cut = line[:limit - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."


class ZImageError(Exception):
    """Base class: the message is meant for the user, never a stack trace."""


class ValidationError(ZImageError):
    """A request parameter is out of range; the message names the value and the allowed range.

    ``param`` names the request field at fault (GenerationRequest's name: ``width``, ``num_images``, ``image``, ...)
    when one is, for APIs that report it apart from the message (OpenAI's ``error.param``); None otherwise.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFoundError(ZImageError):
    """The model id or folder cannot be found or loaded."""


class OutOfMemoryAfterRetries(ZImageError):
    """Every step of the out-of-memory ladder was tried and the job still did not fit."""


class NaNOutputError(ZImageError):
    """The pipeline produced NaN pixels (a black image) and no safer dtype could fix it."""


class GenerationCancelled(ZImageError):
    """The job was cancelled (by the user, a disconnect or shutdown) before it finished."""


class ServiceNotReady(ZImageError):
    """The model is still loading, failed to load, or the service is shutting down."""


class QueueFull(ZImageError):
    """The service already has ``queue_size`` jobs waiting; try again after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(ValidationError):
    """The request is predicted not to fit any placement on this GPU; the message names the largest size that does."""


class ServiceFailed(ZImageError):
    """The service lost its pipeline (a reload failed, or the GPU is unusable) and must be restarted."""


class StorageError(ZImageError):
    """The outputs folder cannot take the images (disk full, read-only, no permission, folder gone).

    The message names the folder, the cause in words and what to do; no image of the request was kept.
    """


class LoraError(ValidationError):
    """A LoRA adapter cannot be used: not in the LoRA folder, not a .safetensors file, made for another model or
    size, or refused by the memory placement. The message names the file and, where known, what it was made for.
    Its ``param`` is ``loras``."""

    def __init__(self, message: str, *, param: str | None = "loras") -> None:
        super().__init__(message, param=param)
