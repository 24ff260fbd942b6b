"""Reading a file from storage through transient failures.

A read of a large file from an object store meets dropped connections, timeouts and 5xx replies that
s3fs's own retries do not always absorb. :class:`RetryingFile` waits, reopens the file, checks that it is
still the same file and resumes at the same byte, so whatever parses the stream never sees the failure;
when the failure persists it raises :class:`ShardReadError` instead of handing back less data. The corpus
reader reads every shard through it (``core/reader.py``; docs/curation.md, "What the reader guarantees").
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import sys
import time
from typing import IO, Any

from core import storage
from core.storage import StorageOptions

logger = logging.getLogger(__name__)


class ShardReadError(Exception):
    """A shard could not be read for a reason outside its data: storage kept failing transiently, or the
    file changed between two tries. Raised, never a reject, so the shard or the run fails and a rerun
    reads it again."""


# A missing or forbidden file stays that way on retry: raised at once (the reader records an ``unreadable`` reject).
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Connection errors of the S3 client stack that are not OSErrors: (module, class names). Looked up in
# sys.modules, so local-only use imports neither; a module that was never imported raised nothing.
_CLIENT_TRANSIENT_ERRORS = (
    ("botocore.exceptions", ("ConnectionError", "HTTPClientError")),
    ("aiohttp", ("ClientConnectionError", "ClientPayloadError")),
)
_MAX_BACKOFF_S = 30.0


def is_transient(error: BaseException) -> bool:
    """Whether a storage error may go away on retry: connection errors, timeouts and the OSErrors s3fs
    makes of 5xx and throttling replies, but not a missing or forbidden file."""
    if isinstance(error, _PERMANENT_OS_ERRORS):
        return False
    if isinstance(error, OSError):  # ConnectionError, TimeoutError and fsspec's FSTimeoutError included
        return True
    for module_name, names in _CLIENT_TRANSIENT_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, name, ()) for name in names)):
            return True
    return False


def _identity(handle: IO[bytes]) -> tuple[Any, ...]:
    """What tells two versions of a file apart: its size, and its ETag (S3) or mtime (local disk)."""
    details = getattr(handle, "details", None)
    etag = details.get("ETag") if isinstance(details, dict) else None
    try:
        mtime = os.fstat(handle.fileno()).st_mtime_ns
    except (OSError, AttributeError, ValueError):
        mtime = None  # no file descriptor: an object store
    return getattr(handle, "size", None), etag, mtime


class RetryingFile(io.RawIOBase):
    """A shard open for reading that rides out transient storage errors.

    After a failed open, read or seek it waits (exponential backoff), reopens the file, checks that it is
    the same file (size, and ETag or mtime) and seeks back, so the line splitter and pyarrow never see
    the failure. When ``attempts`` are used up it raises :class:`ShardReadError`; so does a
    file that changed or vanished in between. Errors that no retry cures (missing, forbidden) propagate
    from the first open as they are.
    """

    def __init__(self, uri: str, options: StorageOptions | None, attempts: int, backoff_s: float):
        super().__init__()
        self.uri, self.options, self.attempts, self.backoff_s = uri, options, attempts, backoff_s
        self.position = 0
        self.handle: IO[bytes] | None = None
        self.identity: tuple[Any, ...] | None = None
        self._retrying("open", lambda handle: None)

    def _open(self) -> IO[bytes]:
        try:
            handle = storage.open_read(self.uri, self.options)
        except _PERMANENT_OS_ERRORS as error:
            if self.identity is None:
                raise
            raise ShardReadError(f"{self.uri} vanished while being read: {error}") from error
        identity = _identity(handle)
        if self.identity is None:
            self.identity = identity
        elif identity != self.identity:
            handle.close()
            raise ShardReadError(
                f"{self.uri} changed while being read (size, etag, mtime: {self.identity} -> {identity})"
            )
        if self.position:
            handle.seek(self.position)
        return handle

    def _retrying(self, what: str, operation: Any) -> Any:
        attempts = self.attempts
        for attempt in range(1, attempts + 1):
            try:
                if self.handle is None:
                    self.handle = self._open()
                return operation(self.handle)
            except Exception as error:
                if not is_transient(error):
                    raise
                self._drop_handle()
                failure = f"{type(error).__name__}: {error}"
                if attempt == attempts:
                    raise ShardReadError(f"{self.uri}: {what} failed {attempts} attempts; last: {failure}") from error
                delay = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1))
                delay *= random.uniform(1.0, 1.5)  # jitter, so workers hit by one outage do not retry in step
                logger.warning(
                    "%s: %s failed (%s); try %d of %d in %.1f s", self.uri, what, failure, attempt + 1, attempts, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _drop_handle(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(Exception):
                self.handle.close()
            self.handle = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self._retrying("read", lambda handle: handle.read(-1 if size is None else size))
        self.position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = self._retrying("seek", lambda handle: handle.seek(offset, whence))
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self._drop_handle()
        super().close()
