"""SIGINT and SIGTERM during a batch: unwind it, so that it gives its shards back, then stop as asked.

A batch killed by a signal's default action leaves its leases to expire, and the batch that takes an
expired lease over counts it as a failed attempt (it cannot tell a shard that killed its driver from an
operator's Ctrl-C). For a batch's duration, :class:`BatchSignals` turns SIGINT and SIGTERM into a
:class:`BatchInterrupted` exception raised in the main thread, so the batch releases its leases as it
unwinds. On the way out it puts back the handlers that were there before and delivers the signal to them,
so the process then does what it would have done anyway (Python's KeyboardInterrupt for SIGINT, the
default action or Ray's handler for SIGTERM).

Only SIGKILL (or a lost host) still leaves leases to expire; docs/scheduled-curation.md says what that costs.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class BatchInterrupted(BaseException):
    """A batch got SIGINT or SIGTERM. A BaseException, like KeyboardInterrupt: no `except Exception` in the
    batch swallows it, and every `finally` and lease release on the way out runs."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"batch interrupted by {signal.Signals(signum).name}")


class BatchSignals:
    """For the duration of a `with` block, SIGINT and SIGTERM raise :class:`BatchInterrupted`.

    Inside :meth:`shielded` the first signal is held until the block ends (a claim is created and
    recorded as held, or a commit finishes, as one step); a second signal raises at once. Handlers are
    installed from the main thread only (Python runs signal handlers there), and a signal that was
    ignored, or whose handler Python cannot put back (one set outside Python), is left alone.
    """

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}
        self.received: int | None = None
        self._shield = 0

    def __enter__(self) -> BatchSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous is None or previous == signal.SIG_IGN:
                    continue
                self.previous[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def reclaim(self) -> None:
        """Install the handlers again where something replaced them during the batch (`ray.init` sets a
        SIGTERM handler of its own); the replacement becomes the handler that is put back afterwards."""
        for signum in self.previous:
            current = signal.getsignal(signum)
            if current != self._handle and current is not None:
                self.previous[signum] = current
                signal.signal(signum, self._handle)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        for signum, previous in self.previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous)
        if isinstance(exc, BatchInterrupted) and exc.signum in self.previous:
            # What the signal would have done without us: KeyboardInterrupt, Ray's exit, or the default
            # action. A handler that returns lets BatchInterrupted go on up.
            signal.raise_signal(exc.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        logger.warning("%s: giving this batch's shards back, then stopping", signal.Signals(signum).name)
        if self._shield and first:
            return  # raised when the shielded step ends
        raise BatchInterrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """A step a first signal does not cut in two; the signal is raised once it ends."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if not self._shield and self.received is not None:
            raise BatchInterrupted(self.received)
