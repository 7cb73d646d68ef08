"""Opportunistic micro-batching of concurrent single-row predictions, with no wait window.

Contract: `MicroBatcher.run(run_rows, numbers, texts)` returns what `run_rows` gives for that
row (or raises its error), whether the row ran alone or in a batch with rows of concurrent
callers. A lone caller never waits; a queued caller waits at most for the run in progress
plus its own batch. Thread-safe; holds no reference to the model (see `run`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

RowsRunner = Callable[[list[list[float]], list[list[str]]], tuple[list[Any], list[list[float]]]]


class _Slot:
    """A queued row of `MicroBatcher`: its inputs, then its answer (or error)."""

    __slots__ = ("error", "event", "label", "lead", "numbers", "probabilities", "texts")

    def __init__(self, numbers: list[float], texts: list[str]) -> None:
        self.numbers = numbers
        self.texts = texts
        self.label: str = ""
        self.probabilities: list[float] = []
        self.error: BaseException | None = None
        self.event: threading.Event | None = None  # only a queued row waits
        self.lead = False  # set by the finishing leader: this waiter runs the next batch


class MicroBatcher:
    """Opportunistic micro-batching of concurrent single-row predictions, with no wait window.

    A request that finds no session run in progress runs its row at once, so a lone request
    never waits. Requests arriving while a run is in progress (onnxruntime releases the GIL)
    queue up; when the run ends, the finishing thread wakes the first waiter, which takes the
    queue (up to `max_rows` rows) and runs it as one batch, and so on. A session run of k rows
    costs much less than k runs of one row (a run's fixed cost dominates a gradient-boosting
    model's single-row prediction), so rows that meet share that cost; no request waits
    longer than the run in progress plus its own batch. How often rows meet depends on how
    much of a request holds the GIL: measured in docs/predict.md (Benchmark).
    """

    def __init__(self, max_rows: int = 32) -> None:
        self._max_rows = max_rows
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._busy = False

    def run(
        self, run_rows: RowsRunner, numbers: list[float], texts: list[str]
    ) -> tuple[str, list[float]]:
        """`run_rows` runs the session on rows; it comes with each call rather than being
        kept, so that the model, which owns this batcher, is not in a reference cycle (a
        swapped-out model is then freed at once, also when gc.freeze() has frozen it)."""
        with self._lock:
            busy = self._busy
            self._busy = True
            if busy:
                slot = _Slot(numbers, texts)
                slot.event = threading.Event()
                self._queue.append(slot)
        if not busy:  # nobody running: run this row now
            slot = _Slot(numbers, texts)
            self._run_batch(run_rows, [slot])
        else:
            slot.event.wait()  # type: ignore[union-attr]
            if slot.lead:  # the previous run handed the queue over to this thread
                with self._lock:
                    batch = self._queue[: self._max_rows]
                    del self._queue[: self._max_rows]
                self._run_batch(run_rows, batch)
        if slot.error is not None:
            raise slot.error
        return slot.label, slot.probabilities

    def _run_batch(self, run_rows: RowsRunner, batch: list[_Slot]) -> None:
        try:
            labels, probabilities = run_rows([s.numbers for s in batch], [s.texts for s in batch])
            for s, label, probs in zip(batch, labels, probabilities, strict=True):
                s.label, s.probabilities = str(label), probs
        except BaseException as exc:  # every row of the batch gets the error
            for s in batch:
                s.error = exc
        with self._lock:
            following = self._queue[0] if self._queue else None
            if following is None:
                self._busy = False
        for s in batch[1:]:  # batch[0] is this thread's own row
            s.event.set()  # type: ignore[union-attr]
        if following is not None:  # hand over: that waiter takes the queue, itself first
            following.lead = True
            following.event.set()  # type: ignore[union-attr]
