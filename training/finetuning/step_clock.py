"""Where a fine-tuning step's wall time goes, per worker: a few `time.perf_counter` calls per step.

A step is the time between the end of one optimizer step's compute and the end of the next one's, so
the bookkeeping after a step (metrics, Ray reports, checkpoints, progress lines) is paid by the step
that follows it, and the phases of consecutive steps tile the loop's wall time with no gap:

    data         next batch: Ray Data rows, tokenizing (once per window), padding into tensors
    forward      model forward and loss
    backward     autograd backward, without the gradient reduction below
    grad_reduce  DeepSpeed's gradient reduction across workers at the end of backward (gloo or NCCL),
                 waiting for the slowest worker included
    optimizer    engine.step(): clipping, AdamW on this worker's partition, ZeRO's parameter all-gather,
                 the learning-rate schedule
    report       the step metrics' all-gather, Ray Train reports, progress lines
    checkpoint   DeepSpeed checkpoints handed to Ray Train
    other        the rest of the loop (Python between the phases)

On a GPU kernels run asynchronously, so the phases are host-side times; their sum, the step time, is
exact at every synchronising collective.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

PHASES = ("data", "forward", "backward", "grad_reduce", "optimizer", "report", "checkpoint", "other")
"""Phase names in the order they are reported; `other` is the step time not inside any phase."""


class StepClock:
    """Accumulates wall seconds per phase until `lap`, which returns them with `other` filled in.

    Phases may nest (the gradient reduction runs inside DeepSpeed's backward): a nested phase's time is
    taken out of the enclosing one, so every second is counted once.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started = clock()
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._open: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the block's wall time under `name` (one of PHASES other than `other`)."""
        if name not in self._seconds or name == "other":
            raise ValueError(f"unknown step phase {name!r}; expected one of {PHASES[:-1]}")
        started = self._clock()
        self._open.append(name)
        try:
            yield
        finally:
            self._open.pop()
            elapsed = self._clock() - started
            self._seconds[name] += elapsed
            if self._open:
                self._seconds[self._open[-1]] -= elapsed

    def lap(self) -> dict[str, float]:
        """Seconds per phase since the previous lap (or since the clock was made); resets the counts.

        The values, `other` included, sum to the wall time of the lap.
        """
        now = self._clock()
        seconds = dict(self._seconds)
        seconds["other"] = max(0.0, (now - self._started) - sum(seconds.values()))
        self._started = now
        self._seconds = dict.fromkeys(PHASES, 0.0)
        return seconds

    def wrap(self, name: str, function: Callable) -> Callable:
        """`function`, timed under `name` on every call."""

        def timed(*args, **kwargs):
            with self.phase(name):
                return function(*args, **kwargs)

        return timed
