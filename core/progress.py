"""Progress lines for long stages: what is done of what is known, the rate and an ETA, every few seconds.

A `Progress` counts units (documents, tokens, rows, steps, questions) and logs one plain line at a steady
interval, e.g. `curate encode: 12,480/50,000 docs (24%) 41.3 docs/s, ETA 15m09s`, and a final line when its
`with` block ends. Lines carry no carriage returns, so they read the same in a terminal, in a log file and in
`ray job logs`. Ray Data's own progress bars are switched off (`core.runtime.init_ray`); these lines replace
them.

Where the driver itself iterates the work (SAE training, distillation's part counts) or a worker runs a loop
(fine-tuning, evaluation), the loop calls `add`. Where the driver blocks while Ray Data workers do the work
(curation's encode, which ends in `write_parquet`), `ray_counter` gives the workers a tiny counter actor to
bump once per batch and the driver's ticker thread reads it once per interval.

The interval is `$FINESCOPE_PROGRESS_S` seconds (default 30); `init_ray` passes the variable on to Ray
workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from core.errors import ConfigError

logger = logging.getLogger(__name__)

INTERVAL_ENV = "FINESCOPE_PROGRESS_S"
DEFAULT_INTERVAL_S = 30.0
RATE_WINDOW = 10
"""The rate (and so the ETA) is measured over the last this many lines, from the last line that found
nothing done yet at the earliest: it follows the current speed, not the start-up (model loads, actor
starts) averaged into the whole run. The final line gives the whole run's rate."""


def default_interval() -> float:
    """Seconds between progress lines: `$FINESCOPE_PROGRESS_S`, else 30."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or raw == "":
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(INTERVAL_ENV, raw, "must be a number of seconds > 0, e.g. 30")
    return value


def format_duration(seconds: float) -> str:
    """45s, 15m09s, 2h03m, 3d04h: the two largest units, fixed width after the first."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_rate(rate: float) -> str:
    """41.3, 0.0492, 1,234: three significant digits, never an exponent."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


class Progress:
    """Counts units done of a total (None: unknown) and logs a line every `interval` seconds.

    `add` counts and logs when a line is due; `poll`, when given, returns the count done so far from
    elsewhere (a Ray counter) and is called only when a line is due. Used as a context manager, a daemon
    thread keeps the lines coming while nothing is added (a driver blocked in Ray Data, a slow first batch),
    and the final line is logged when the block ends without an error. `enabled=False` makes every call a
    no-op (a worker that is not rank 0). `clock` and `emit` are injectable for tests.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        unit: str = "rows",
        *,
        interval: float | None = None,
        initial: int = 0,
        poll: Callable[[], int] | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], Any] | None = None,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.interval = default_interval() if interval is None else interval
        self.done, self.note = initial, ""
        self.enabled, self.poll, self.clock = enabled, poll, clock
        self.emit = emit or (lambda line: logger.info("%s", line))
        self.started = self.last_line = clock()
        self.initial = initial
        self._samples: deque[tuple[float, int]] = deque([(self.started, initial)], maxlen=RATE_WINDOW)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- counting
    def add(self, n: int = 1, note: str | None = None) -> None:
        """Count `n` more units (and remember `note`, shown after the ETA); log a line if one is due."""
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            if note is not None:
                self.note = note
        self.tick()

    def update(self, done: int, note: str | None = None) -> None:
        """Set the count done so far; log a line if one is due."""
        self.add(done - self.done, note)

    # ---- lines
    def rate(self, now: float) -> float:
        """Units per second since the oldest line kept (see RATE_WINDOW), or since the start."""
        then, done_then = self._samples[0]
        return (self.done - done_then) / (now - then) if now > then else 0.0

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The progress line: `LABEL: DONE/TOTAL UNIT (P%) RATE UNIT/s, ETA T` (no total: no share, no ETA)."""
        now = self.clock() if now is None else now
        counted = (
            f"{self.done:,}/{self.total:,} {self.unit}" if self.total is not None else f"{self.done:,} {self.unit}"
        )
        if self.total:
            counted += f" ({min(100, math.floor(100 * self.done / self.total))}%)"
        elapsed = now - self.started
        if final:
            rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
            tail = f"{format_rate(rate)} {self.unit}/s, done in {format_duration(elapsed)}"
        elif self.done == self.initial:
            tail = f"started {format_duration(elapsed)} ago"
        else:
            rate = self.rate(now)
            tail = f"{format_rate(rate)} {self.unit}/s"
            if self.total is not None and self.done < self.total and rate > 0:
                tail += f", ETA {format_duration((self.total - self.done) / rate)}"
        text = f"{self.label}: {counted} {tail}"
        return f"{text}, {self.note}" if self.note else text

    def tick(self) -> str | None:
        """Log and return a line if `interval` seconds have passed since the last one."""
        if not self.enabled:
            return None
        with self._lock:
            now = self.clock()
            if now - self.last_line < self.interval:
                return None
            self._refresh()
            text = self.line(now)
            self.last_line = now
            if self.done == self.initial:
                self._samples.clear()  # still starting: the rate is measured from the last idle line on
            self._samples.append((now, self.done))
        self.emit(text)
        return text

    def finish(self) -> str | None:
        """Log and return the final line: the count, the whole run's rate and its duration."""
        if not self.enabled:
            return None
        with self._lock:
            self._refresh()
            text = self.line(final=True)
        self.emit(text)
        return text

    def _refresh(self) -> None:
        if self.poll is not None:
            try:
                self.done = int(self.poll())
            except Exception as error:  # a line is not worth failing the stage for
                logger.debug("progress poll of %s failed: %s", self.label, error)

    # ---- the ticker thread
    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name=f"progress {self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if kind is None:
            self.finish()

    def _run(self) -> None:
        while not self._stop.wait(max(0.05, self.interval - (self.clock() - self.last_line))):
            self.tick()


class _Counter:
    """A Ray actor's body: a count that workers add to and the driver reads."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> int:
        self.done += n
        return self.done

    def value(self) -> int:
        return self.done


@contextlib.contextmanager
def ray_counter(label: str, total: int | None = None, unit: str = "rows") -> Iterator[Any]:
    """Yield a counter actor for Ray workers to `bump`; the driver logs its count every interval.

    One actor of 0 CPUs, one call per batch from the workers and one read per interval from the driver.
    Ray must be initialised.
    """
    import ray

    actor = ray.remote(num_cpus=0, max_restarts=0)(_Counter).remote()
    try:
        with Progress(label, total, unit, poll=lambda: ray.get(actor.value.remote(), timeout=60)):
            yield actor
    finally:
        ray.kill(actor)


def bump(counter: Any, n: int) -> None:
    """Worker side of `ray_counter`: add `n`, waiting for the count to land, so the final line is exact.

    A counter that is gone (its driver ended, its node died) costs a progress line, never the batch.
    """
    if counter is None or not n:
        return
    import ray

    try:
        ray.get(counter.add.remote(int(n)), timeout=60)
    except Exception as error:
        logger.debug("progress counter unreachable: %s", error)
