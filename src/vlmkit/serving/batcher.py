"""Continuous request batching between HTTP handlers and one model.

Handlers `submit` a job (one generation request per choice) and read its deltas from an
asyncio queue. One worker thread owns the model: it takes the first waiting job, gathers
every other job that arrives within `wait_ms` (up to `max_batch` rows), and decodes them
together through `VisionLanguageAssistant.stream_batch`, fanning the deltas back out. The
wait queue is bounded, so an overloaded server refuses quickly instead of queueing forever.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

log = logging.getLogger("vlmkit.serving")


class QueueFull(Exception):
    """The wait queue is at capacity; the caller should answer 503 and retry later."""


class BadRequest(ValueError):
    """A request the model refused (prompt too long, placeholder mismatch...): a 400."""


class InternalError(RuntimeError):
    """The model failed on a valid request: a 500 whose details stay in the server log."""


@dataclass
class Job:
    requests: Sequence[Any]                      # assistant.Request, one per choice
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """From the worker thread: a Delta, an exception, or None when the job is over."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher:
    def __init__(self, assistant, max_batch: int = 16, max_queue: int = 64, wait_ms: float = 5.0,
                 lock: threading.Lock | None = None):
        self.assistant, self.max_batch, self.wait = assistant, max_batch, wait_ms / 1000
        self.lock = lock or threading.Lock()     # shared with other users of the model (explain)
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running = 0   # rows being decoded now
        self._thread = threading.Thread(target=self._work, name="vlmkit-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, requests: Sequence[Any]) -> Job:
        job = Job(list(requests), asyncio.get_running_loop())
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None
        return job

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            rows = len(jobs[0].requests)
            deadline = time.monotonic() + self.wait
            while rows < self.max_batch:
                try:
                    job = self._waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                rows += len(job.requests)
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        """Decode the jobs together. If that fails, only the faulty request may fail: jobs that
        got nothing yet are run again one by one, jobs already answered in full keep their
        answers, and only jobs cut off mid-answer get the error."""
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        requests = [r for job in jobs for r in job.requests]
        answered: dict[int, int] = {}   # id(job) -> its rows that finished
        touched: set[int] = set()      # id(job) of jobs that got any output
        try:
            with self.lock:
                self.running = len(requests)
                for delta in self.assistant.stream_batch(requests):
                    job, i = owners[delta.index]
                    touched.add(id(job))
                    if delta.finish_reason is not None:
                        answered[id(job)] = answered.get(id(job), 0) + 1
                    if not job.cancelled.is_set():
                        job.put(_reindex(delta, i))
        except Exception as e:  # never let one request kill the worker, or fail the others
            self.running = 0
            retried = [job for job in jobs if id(job) not in touched] if len(jobs) > 1 else []
            for job in retried:
                self._run([job])
            error = _client_error(e)
            for job in jobs:
                if job not in retried:
                    if answered.get(id(job), 0) < len(job.requests):
                        job.put(error)
                    job.put(None)
            return
        self.running = 0
        for job in jobs:
            job.put(None)


def _client_error(error: Exception) -> Exception:
    """What a client is told: a ValueError is the request's fault (400); anything else is ours (500),
    its details kept in the server log."""
    if isinstance(error, ValueError):
        return BadRequest(str(error))
    log.error("generation failed", exc_info=error)
    return InternalError("the model failed on this request")


def _reindex(delta, index: int):
    """The same delta, numbered within its own job (its choice index)."""
    return type(delta)(index, delta.text, delta.finish_reason, delta.prompt_tokens, delta.completion_tokens)
