"""Jobs and admission, independent of any front door.

A :class:`Job` is one request the service has accepted: it has an id, a state, progress (stage,
step/total, place in the queue) and a cancel token. :class:`JobQueue` admits at most ``max_waiting``
jobs waiting for the GPU (the running one is not counted) and hands them to the service's one GPU
worker in arrival order. Every front door (the Gradio page and API, the CLI, later the REST API)
submits through the same queue, so the bound is one bound for all of them.

Only the standard library is used: a lock and a condition variable per job, listeners called on
every change (front doors turn them into progress bars or asyncio wake-ups).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from .errors import GenerationCancelled, QueueFull, ServiceNotReady

#: States a job moves through; the last three are final.
QUEUED, RUNNING, SAVING, DONE, FAILED, CANCELLED = "queued", "running", "saving", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
#: Stages of a running job, in order (shown to users).
STAGES = ("queued", "encoding", "denoising", "decoding", "saving")
#: The Retry-After a refused client is told, in seconds, per job ahead of it (an order of magnitude:
#: one 1024x1024 image on a GPU takes a few seconds).
RETRY_AFTER_S_PER_JOB = 5


@dataclass(frozen=True)
class Progress:
    """Where a job is. ``position`` is its 1-based place among the jobs waiting (0 once it runs)."""

    state: str = QUEUED
    stage: str = "queued"
    step: int = 0
    total: int = 0
    position: int = 0
    waiting: int = 0
    note: str = ""  # e.g. "switching the memory placement" while the pipeline is reloaded

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def describe(self) -> str:
        """One line for people: ``Queued: position 2 of 3``, ``Denoising step 3/8``, ``Decoding the image``."""
        if self.state == QUEUED:
            return f"Queued: position {self.position} of {self.waiting}" if self.position else "Queued"
        if self.state == DONE:
            return "Done"
        if self.state == FAILED:
            return "Failed"
        if self.state == CANCELLED:
            return "Cancelled"
        text = {
            "encoding": "Encoding the prompt",
            "denoising": f"Denoising step {self.step}/{self.total}",
            "decoding": "Decoding the image",
            "saving": "Saving",
        }.get(self.stage, self.stage)
        return f"{text} ({self.note})" if self.note else text

    def fraction(self) -> float:
        """Share of the job done, for a progress bar: the denoising steps plus one share for the decode, so the
        bar never sits at 100% while the image is still being decoded or saved."""
        if self.state == DONE:
            return 1.0
        if not self.total or self.stage in ("queued", "encoding"):
            return 0.0
        done = self.step if self.stage == "denoising" else self.total
        return done / (self.total + 1)


Listener = Callable[["Job"], None]


class Job:
    """One accepted request. Thread-safe: the GPU worker updates it, front doors read and cancel it."""

    def __init__(self, job_id: str, request: Any) -> None:
        self.id = job_id
        self.request = request
        self.created = time.monotonic()
        self.started: float | None = None  # when the GPU worker took it
        self._cancel = threading.Event()
        self._cond = threading.Condition()
        self._progress = Progress()
        self._result: Any = None
        self._error: BaseException | None = None
        self._listeners: list[Listener] = []
        self.cancel_reason = ""

    # --- Reading -------------------------------------------------------------------------------
    @property
    def progress(self) -> Progress:
        with self._cond:
            return self._progress

    @property
    def done(self) -> bool:
        return self.progress.final

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def error(self) -> BaseException | None:
        with self._cond:
            return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is final; True when it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._progress.final, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """The :class:`~zimage.service.GenerationResult`; raises the job's error (a ZImageError subclass).

        Raises TimeoutError when the job is not final within ``timeout`` seconds.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"job {self.id} is not finished after {timeout} s")
        with self._cond:
            if self._error is not None:
                raise self._error
            return self._result

    # --- Cancelling ------------------------------------------------------------------------------
    def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the job to stop: a queued job never starts, a running one stops within one denoising step
        and is not decoded. Returns False when the job had already finished."""
        with self._cond:
            if self._progress.final:
                return False
            if not self._cancel.is_set():
                self.cancel_reason = reason
            self._cancel.set()
        self._notify()
        return True

    def raise_if_cancelled(self) -> None:
        """Raise :class:`GenerationCancelled` when a cancel was asked for (checked between stages)."""
        if self._cancel.is_set():
            raise GenerationCancelled("The generation was cancelled.")

    # --- Listening -------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(job)`` after every change (from the thread that made it); at once if final."""
        with self._cond:
            self._listeners.append(listener)
            final = self._progress.final
        if final:
            listener(self)

    def remove_listener(self, listener: Listener) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # --- Updating (the service) ----------------------------------------------------------------------
    def update(self, **changes: Any) -> None:
        """Change the progress fields (``stage``, ``step``, ``total``, ``note``, ...) and tell the listeners."""
        with self._cond:
            if self._progress.final:
                return
            self._progress = replace(self._progress, **changes)
            self._cond.notify_all()
        self._notify()

    def finish(self, *, result: Any = None, error: BaseException | None = None) -> None:
        """Make the job final: done with ``result``, cancelled or failed with ``error``."""
        if error is None:
            state = DONE
        elif isinstance(error, GenerationCancelled):
            state = CANCELLED
        else:
            state = FAILED
        with self._cond:
            if self._progress.final:
                return
            self._result, self._error = result, error
            self._progress = replace(self._progress, state=state, position=0)
            self._cond.notify_all()
        self._notify()

    def _notify(self) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(self)
            except Exception:  # noqa: BLE001 - a broken progress bar must never break the job
                pass


async def watch(job: Job, heartbeat_s: float = 1.0) -> AsyncIterator[Progress]:
    """Yield the job's progress on every change, and at least every ``heartbeat_s`` seconds, until final.

    For asyncio front doors: the GPU worker's updates wake the event loop through
    ``call_soon_threadsafe``. The heartbeat lets a front door notice a client that went away.
    """
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def wake(_: Job) -> None:
        loop.call_soon_threadsafe(changed.set)

    job.add_listener(wake)
    try:
        while True:
            progress = job.progress
            yield progress
            if progress.final:
                return
            try:
                await asyncio.wait_for(changed.wait(), heartbeat_s)
            except asyncio.TimeoutError:
                pass
            changed.clear()
    finally:
        job.remove_listener(wake)


class JobQueue:
    """FIFO admission: at most ``max_waiting`` jobs wait; cancelled jobs leave at once."""

    def __init__(self, max_waiting: int, on_cancelled: Listener | None = None) -> None:
        """``on_cancelled(job)`` makes a job that was cancelled while waiting final (the service records it
        there); by default the job just finishes as cancelled."""
        if max_waiting < 1:
            raise ValueError(f"max_waiting={max_waiting} must be at least 1")
        self.max_waiting = max_waiting
        self._on_cancelled = on_cancelled or (
            lambda job: job.finish(error=GenerationCancelled("The generation was cancelled before it started.")))
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed_reason: str | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def put(self, job: Job) -> None:
        """Admit ``job``. Raises :class:`QueueFull` (with ``retry_after_s``) or :class:`ServiceNotReady` when closed."""
        with self._cond:
            if self._closed_reason is not None:
                raise ServiceNotReady(self._closed_reason)
            if len(self._waiting) >= self.max_waiting:
                waiting = len(self._waiting)
                raise QueueFull(
                    f"Queue is full! {waiting} job{'s are' if waiting != 1 else ' is'} waiting for the GPU: please try "
                    "again in a moment.", retry_after_s=RETRY_AFTER_S_PER_JOB * (waiting + 1))
            self._waiting.append(job)
            self._cond.notify_all()
        job.add_listener(self._on_job_change)
        self._publish_positions()

    def get(self, timeout: float | None = None) -> Job | None:
        """The next job to run (removed from the queue), or None after ``timeout`` seconds or when closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._closed_reason is not None, timeout):
                return None
            if not self._waiting:
                return None
            job = self._waiting.popleft()
        job.remove_listener(self._on_job_change)
        self._publish_positions()
        return job

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: :meth:`get` then returns None at once when nothing waits."""
        with self._cond:
            return self._closed_reason is not None

    def close(self, reason: str) -> list[Job]:
        """Refuse new jobs from now on; returns the jobs still waiting (the caller cancels them)."""
        with self._cond:
            self._closed_reason = reason
            left = list(self._waiting)
            self._cond.notify_all()
        return left

    def _on_job_change(self, job: Job) -> None:
        # A waiting job that is cancelled leaves the queue now and never starts.
        if not job.cancel_requested:
            return
        with self._cond:
            if job not in self._waiting:
                return
            self._waiting.remove(job)
        job.remove_listener(self._on_job_change)
        self._on_cancelled(job)
        self._publish_positions()

    def _publish_positions(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
        for index, job in enumerate(waiting, start=1):
            if job.progress.position != index or job.progress.waiting != len(waiting):
                job.update(position=index, waiting=len(waiting))
