"""Jobs and admission on their own: states, progress text, positions, the bound, cancel, the async watcher."""

from __future__ import annotations

import asyncio
import threading

import pytest

from zimage.errors import GenerationCancelled, QueueFull, ServiceNotReady
from zimage.jobs import Job, JobQueue, Progress, watch


def test_progress_describes_each_stage_and_never_claims_done_early() -> None:
    assert Progress(position=2, waiting=3).describe() == "Queued: position 2 of 3"
    running = Progress(state="running", stage="denoising", step=3, total=8)
    assert running.describe() == "Denoising step 3/8" and running.fraction() == 3 / 9
    decoding = Progress(state="running", stage="decoding", step=8, total=8)
    assert decoding.describe() == "Decoding the image" and decoding.fraction() < 1
    assert Progress(state="saving", stage="saving", step=8, total=8).fraction() < 1
    assert Progress(state="done", stage="saving", step=8, total=8).fraction() == 1
    assert Progress(state="running", stage="encoding", note="switching the memory placement").describe() == \
        "Encoding the prompt (switching the memory placement)"


def test_the_queue_is_fifo_with_positions_and_a_bound() -> None:
    queue = JobQueue(max_waiting=2)
    first, second = Job("a", None), Job("b", None)
    queue.put(first)
    queue.put(second)
    assert (first.progress.position, second.progress.position) == (1, 2) and second.progress.waiting == 2
    with pytest.raises(QueueFull) as info:
        queue.put(Job("c", None))
    assert info.value.retry_after_s == 15
    assert queue.get(0) is first and second.progress.position == 1 and second.progress.waiting == 1
    queue.put(Job("d", None))  # a place came free


def test_a_cancelled_waiting_job_leaves_at_once_and_never_comes_out() -> None:
    ended = []
    queue = JobQueue(max_waiting=4, on_cancelled=lambda job: (ended.append(job.id),
                                                              job.finish(error=GenerationCancelled("x"))))
    first, second, third = Job("a", None), Job("b", None), Job("c", None)
    for job in (first, second, third):
        queue.put(job)
    assert second.cancel("user") and ended == ["b"] and second.progress.state == "cancelled"
    assert third.progress.position == 2 and len(queue) == 2
    assert [queue.get(0).id, queue.get(0).id] == ["a", "c"] and queue.get(0) is None
    assert not second.cancel()  # already final


def test_a_closed_queue_refuses_and_hands_back_the_waiting_jobs() -> None:
    queue = JobQueue(max_waiting=4)
    job = Job("a", None)
    queue.put(job)
    assert queue.close("shutting down") == [job]
    with pytest.raises(ServiceNotReady, match="shutting down"):
        queue.put(Job("b", None))
    job.cancel()
    assert job.progress.state == "cancelled" and queue.get(0) is None


def test_result_raises_the_jobs_error_and_times_out() -> None:
    job = Job("a", None)
    with pytest.raises(TimeoutError):
        job.result(0.01)
    threading.Timer(0.05, lambda: job.finish(error=GenerationCancelled("stopped"))).start()
    with pytest.raises(GenerationCancelled, match="stopped"):
        job.result(5)
    done = Job("b", None)
    done.finish(result="the images")
    assert done.result(0) == "the images" and done.progress.state == "done"


def test_a_broken_listener_never_breaks_the_job() -> None:
    job = Job("a", None)
    job.add_listener(lambda j: 1 / 0)
    job.update(stage="encoding")
    job.finish(result=1)
    assert job.result(0) == 1


def test_watch_yields_changes_from_another_thread_until_final() -> None:
    job = Job("a", None)

    def work() -> None:
        for step in (1, 2, 3):
            job.update(state="running", stage="denoising", step=step, total=3)
        job.finish(result="ok")

    async def follow() -> list[str]:
        seen = []
        threading.Timer(0.05, work).start()
        async for progress in watch(job, heartbeat_s=0.01):
            seen.append(progress.state)
        return seen

    seen = asyncio.run(follow())
    assert seen[-1] == "done" and seen[0] == "queued"
    assert seen.count("queued") >= 2  # heartbeats while nothing changed
