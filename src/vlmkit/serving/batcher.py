"""Request batching between HTTP handlers and one model: continuous (the default) or static.

Handlers `submit` a job (one generation request per choice) and read its deltas from an
asyncio queue. One worker thread owns the model. The wait queue is bounded, so an
overloaded server refuses quickly instead of queueing forever.

`ContinuousBatcher` keeps one batch running: between two decode steps, waiting requests
join it (their prefill) as rows free up, and a row leaves the moment its answer ends or
its client goes away. `StaticBatcher` (the way `vlmkit serve` batched before, kept for
comparison: `--batching static`) gathers the requests that arrive within `wait_ms`,
decodes them to the end together, and only then takes the next ones.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from vlmkit.inference.continuous import ContinuousChat

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
    prepared: Any = None                         # assistant.prepare(requests[0]), shared by the choices
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    unfinished: int = -1                         # choices not yet answered in full (continuous batching)
    ended: bool = False                          # its last item (None) was put

    def put(self, item: Any) -> None:
        """From the worker thread: a Delta, an exception, or None when the job is over."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Batcher:
    """The wait queue and the worker thread; subclasses say how the worker batches."""

    def __init__(self, assistant, max_batch: int = 16, max_queue: int = 64, wait_ms: float = 5.0,
                 lock: threading.Lock | None = None):
        self.assistant, self.max_batch, self.wait = assistant, max_batch, wait_ms / 1000
        # Held while the worker uses the model; the routes that use the same model outside
        # the batcher (embeddings, explain) take it too.
        self.lock = lock or threading.Lock()
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running = 0   # rows being decoded now
        self._thread = threading.Thread(target=self._work, name="vlmkit-batcher", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def submit(self, requests: Sequence[Any], prepared: Any = None) -> Job:
        job = Job(list(requests), asyncio.get_running_loop(), prepared)
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._waiting.maxsize} requests are already waiting") from None
        return job

    def _work(self) -> None:
        raise NotImplementedError


class ContinuousBatcher(Batcher):
    def _work(self) -> None:
        chat = ContinuousChat(self.assistant, self.max_batch)
        pending: deque[tuple[Job, int]] = deque()        # choices taken off the queue, not yet started
        owners: dict[int, tuple[Job, int]] = {}          # row key -> (its job, its choice index)
        keys = itertools.count()
        while True:
            if not len(chat) and not pending:            # idle: wait for work
                self._take(self._waiting.get(), pending)
            while len(pending) < chat.free:              # only what can start now; the rest waits in the queue
                try:
                    self._take(self._waiting.get_nowait(), pending)
                except queue.Empty:
                    break
            for key, (job, _) in list(owners.items()):   # clients that left free their rows now
                if job.cancelled.is_set() or job.ended:
                    chat.cancel(key)
                    del owners[key]
                    self._end(job)
            with self.lock:
                while pending and chat.free:
                    job, i = pending.popleft()
                    if job.cancelled.is_set() or job.ended:
                        self._end(job)
                        continue
                    key = next(keys)
                    owners[key] = (job, i)
                    try:   # its first token goes out now, not after the next step
                        self._send(chat.add(key, job.requests[i], job.prepared), owners)
                    except Exception as e:   # this request's fault (or its prefill's): only it fails
                        del owners[key]
                        self._end(job, e)
                try:
                    deltas = chat.step()
                except Exception as e:
                    # A step that broke leaves every running row in an unknown state: those
                    # rows fail, the batch starts afresh, and waiting requests are untouched.
                    for job in {id(job): job for job, _ in owners.values()}.values():
                        self._end(job, e)
                    owners.clear()
                    chat = ContinuousChat(self.assistant, self.max_batch)
                    deltas = []
                self.running = len(chat)
            self._send(deltas, owners)

    @staticmethod
    def _take(job: Job, pending: deque) -> None:
        job.unfinished = len(job.requests)
        pending.extend((job, i) for i in range(len(job.requests)))

    @staticmethod
    def _send(deltas, owners: dict[int, tuple[Job, int]]) -> None:
        for delta in deltas:
            job, i = owners[delta.index]
            if delta.finish_reason is not None:
                del owners[delta.index]
                job.unfinished -= 1
            if not job.ended:
                job.put(_reindex(delta, i))
                if job.unfinished == 0:
                    ContinuousBatcher._end(job)

    @staticmethod
    def _end(job: Job, error: Exception | None = None) -> None:
        """Put a job's last items, once: the error, if any, then None (which ends its handler's
        wait, also when its client left). Its other choices are dropped."""
        if not job.ended:
            job.ended = True
            if error is not None:
                job.put(_client_error(error))
            job.put(None)


class StaticBatcher(Batcher):
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
            for job in jobs:
                if job.cancelled.is_set():   # its client left while it waited
                    job.put(None)
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        """Decode the jobs together. If that fails, only the faulty request may fail: jobs that
        got nothing yet are run again one by one, jobs already answered in full keep their
        answers, and only jobs cut off mid-answer get the error."""
        owners = [(job, i) for job in jobs for i in range(len(job.requests))]
        requests = [r for job in jobs for r in job.requests]
        prepared = None if any(job.prepared is None for job in jobs) else [job.prepared for job, _ in owners]
        answered: dict[int, int] = {}   # id(job) -> its rows that finished
        touched: set[int] = set()      # id(job) of jobs that got any output
        try:
            with self.lock:
                self.running = len(requests)
                for delta in self.assistant.stream_batch(requests, prepared):
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


BATCHERS = {"continuous": ContinuousBatcher, "static": StaticBatcher}


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
