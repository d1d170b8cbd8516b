"""Server-side dynamic batching: concurrent requests merged into one model call.

Each request is a task of `size` examples. A batch thread takes the oldest
task, keeps taking queued tasks while they fit in `max_batch_size`, and waits
for more until `batch_timeout_micros` after that oldest task arrived; then it
concatenates the inputs along axis 0, runs the model once, and hands each
caller its slice of the outputs. The semantics follow TF Serving's
`BatchingParameters`.

A task may carry a deadline and an `alive` check (for gRPC: the call's
deadline and `context.is_active`; for REST: whether the client is still
connected). A task whose deadline has passed or whose client has gone is
never run: it is dropped from the queue when a batch is formed, and its
caller stops waiting at the deadline, so a burst of expired requests costs
no model time and does not delay the live requests queued behind it.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from tfadv.export.batching import BatchingParameters
from tfadv.serving.errors import ServingError
from tfadv.serving.metrics import METRICS


# How often a waiting caller asks `alive()` whether its client is still there.
_ALIVE_POLL_S = 0.05


def gone_reason(deadline: float | None = None, alive=None) -> str | None:
    """Why a request should not run any more, or None while it should.

    Args:
        deadline: `time.monotonic()` seconds after which nobody waits for
            the answer; None for no deadline.
        alive: callable returning False once the client has gone (cancelled
            the call or closed the connection); None if unknown.

    Returns:
        A sentence for the error message, or None.
    """
    if deadline is not None and time.monotonic() >= deadline:
        return "its deadline passed"
    if alive is not None:
        try:
            if not alive():
                return "its client cancelled it or went away"
        except Exception:  # a broken check must not keep a dead request queued
            return "its client could not be reached"
    return None


def check_alive(deadline: float | None = None, alive=None, when: str = "before it ran"):
    """Raises DEADLINE_EXCEEDED if the request's deadline passed or its client left.

    Args:
        deadline, alive: as `gone_reason`.
        when: where it was noticed, for the message.

    Raises:
        ServingError: DEADLINE_EXCEEDED, so that no model time is spent on it.
    """
    reason = gone_reason(deadline, alive)
    if reason is not None:
        raise _expired(reason, when)


def _expired(reason, when):
    return ServingError(
        "DEADLINE_EXCEEDED",
        f"The request was dropped {when}: {reason}. Give it a longer deadline, or send fewer "
        "requests at once (the server was busy).")


class _Task:
    __slots__ = ("inputs", "size", "enqueued", "deadline", "alive", "done", "outputs", "error")

    def __init__(self, inputs, size, deadline=None, alive=None):
        self.inputs = inputs
        self.size = size
        self.enqueued = time.monotonic()
        self.deadline = deadline
        self.alive = alive
        self.done = threading.Event()
        self.outputs = None
        self.error = None

    def gone(self) -> str | None:
        if self.deadline is None and self.alive is None:
            return None
        return gone_reason(self.deadline, self.alive)


class Batcher:
    """Merges concurrent calls of `fn` into batches (padded to `allowed_batch_sizes`).

    Args:
        fn: callable taking a dict of arrays batched along axis 0 and
            returning a dict of arrays batched along axis 0.
        params: a `BatchingParameters`.
        name: used in thread names and messages.

    Example:

    ```python
    batcher = Batcher(lambda d: {"y": d["x"] * 2}, BatchingParameters(max_batch_size=8))
    batcher.submit({"x": np.ones((2, 3))}, size=2)["y"]  # from many threads at once
    batcher.close()
    ```
    """

    def __init__(self, fn, params: BatchingParameters, name: str = "batcher"):
        self._fn = fn
        self._params = params
        self._timeout = params.batch_timeout_micros / 1e6
        self._queue = collections.deque()
        self._queued_examples = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    @property
    def params(self) -> BatchingParameters:
        return self._params

    def submit(self, inputs: dict, size: int, *, deadline: float | None = None,
               alive=None) -> dict:
        """Runs `fn` on `inputs` as part of a batch; blocks until done.

        After `close()` the call runs directly, so a request that picked up
        this batcher just before a version switch still gets its answer.

        Args:
            inputs: dict of arrays, `size` examples along axis 0.
            size: the number of examples.
            deadline: `time.monotonic()` seconds; a task still queued then is
                dropped and this call returns at once. None: no deadline.
            alive: callable returning False once the client has gone; a
                queued task whose client has gone is dropped (polled every
                50 ms while waiting, and again when a batch is formed).

        Raises:
            ServingError: UNAVAILABLE when the queue is full;
                DEADLINE_EXCEEDED when the task was dropped (deadline passed,
                client gone) before it ran; whatever `fn` raised.
        """
        check_alive(deadline, alive, "before it was queued")
        task = _Task(inputs, size, deadline, alive)
        limit = self._params.max_enqueued_batches * self._params.max_batch_size
        with self._cond:
            if self._closed:
                task = None
            else:
                if self._queued_examples + size > limit:
                    raise ServingError(
                        "UNAVAILABLE",
                        f"The batching queue is full ({self._queued_examples} examples waiting, "
                        f"max_enqueued_batches={self._params.max_enqueued_batches}); retry later.")
                self._queue.append(task)
                self._queued_examples += size
                # Wake a batch thread only when it has something to decide:
                # a first task to time, or a full batch to run.
                if len(self._queue) == 1 or self._queued_examples >= self._params.max_batch_size:
                    self._cond.notify()
        if task is None:
            return self._fn(inputs)
        self._wait(task)
        if task.error is not None:
            raise task.error
        return task.outputs

    def _wait(self, task):
        """Waits for `task`; gives up (dropping it if still queued) once it is gone."""
        if task.deadline is None and task.alive is None:
            task.done.wait()
            return
        while True:
            timeout = _ALIVE_POLL_S if task.alive is not None else None
            if task.deadline is not None:
                left = max(0.0, task.deadline - time.monotonic())
                timeout = left if timeout is None else min(timeout, left)
            if task.done.wait(timeout):
                return
            reason = task.gone()
            if reason is None:
                continue
            with self._cond:
                if task.done.is_set():
                    return
                try:
                    self._queue.remove(task)
                    self._queued_examples -= task.size
                    when = "while it waited in the batching queue"
                except ValueError:  # already in a running batch; its result is dropped
                    when = "while its batch ran"
            raise _expired(reason, when)

    def _drop_gone(self):
        """Removes queued tasks whose deadline passed or whose client left (lock held)."""
        if not any(t.deadline is not None or t.alive is not None for t in self._queue):
            return
        kept = collections.deque()
        for task in self._queue:
            reason = task.gone()
            if reason is None:
                kept.append(task)
                continue
            self._queued_examples -= task.size
            task.error = _expired(reason, "while it waited in the batching queue")
            task.done.set()
        self._queue = kept

    def _take_batch(self):
        """Blocks for the next batch of tasks; None once closed and drained."""
        limit = self._params.max_batch_size
        with self._cond:
            while True:
                while not self._queue:
                    if self._closed:
                        return None
                    self._cond.wait()
                self._drop_gone()
                if not self._queue:
                    continue
                # Wait for the batch to fill, at most batch_timeout after the oldest task came.
                fill_until = self._queue[0].enqueued + self._timeout
                while self._queue and self._queued_examples < limit and not self._closed:
                    remaining = fill_until - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                # Tasks that expired while earlier batches ran never reach the model.
                self._drop_gone()
                if not self._queue:  # another batch thread took them, or all were gone
                    continue
                batch = [self._queue.popleft()]
                total = batch[0].size
                while self._queue and total + self._queue[0].size <= limit:
                    task = self._queue.popleft()
                    batch.append(task)
                    total += task.size
                self._queued_examples -= total
                if self._queue:
                    self._cond.notify()  # the rest is another thread's batch
                return batch

    def _loop(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch):
        try:
            total = sum(t.size for t in batch)
            pad = self._params.padded_size(total) - total
            METRICS.batch([t.size for t in batch], total + pad)
            if len(batch) == 1 and not pad:
                outputs = [self._fn(batch[0].inputs)]
            else:
                # Padding repeats the last example; its outputs are dropped below.
                merged = {k: np.concatenate([t.inputs[k] for t in batch]
                                            + ([np.repeat(batch[-1].inputs[k][-1:], pad, axis=0)]
                                               if pad else []), axis=0)
                          for k in batch[0].inputs}
                try:
                    result = self._fn(merged)
                except ServingError as err:
                    if err.code != "INVALID_ARGUMENT" or len(batch) == 1:
                        raise
                    # One request's bad data (a photo that does not decode) fails the merged
                    # batch: run each request alone, so only its sender gets the error, with
                    # indices into its own batch.
                    self._run_alone(batch)
                    return
                ends = np.cumsum([t.size for t in batch])
                starts = ends - np.asarray([t.size for t in batch])
                outputs = [{k: v[s:e] for k, v in result.items()} for s, e in zip(starts, ends)]
            for task, out in zip(batch, outputs):
                task.outputs = out
        except BaseException as err:  # every waiting caller must wake up
            for task in batch:
                task.error = err
        finally:
            for task in batch:
                task.done.set()

    def _run_alone(self, batch):
        for task in batch:
            try:
                task.outputs = self._fn(task.inputs)
            except BaseException as err:
                task.error = err

    def close(self, wait: bool = True):
        """Stops taking new tasks; queued ones still run. Joins the threads if `wait`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
