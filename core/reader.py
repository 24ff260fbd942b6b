"""Reading corpus shards robustly: every line becomes a document or a reject with its reason.

Formats (chosen by file extension):

- RedPajama JSONL, one ``{"text": ..., "meta": {...}}`` per line: plain, ``.gz`` or ``.zst``/``.zstd``.
- Parquet (``.parquet``/``.pq``) with a ``text`` column and optionally a ``meta`` column (struct or string).

The core, :func:`iter_shard`, is plain Python and streams a shard a chunk at a time. :func:`read_shard`
groups its output into Arrow tables and writes the shard's rejects file, and :func:`read_corpus` runs that
over many shards as Ray Data tasks. Nothing vanishes: a line that cannot be used goes to
``rejects/<hash of the shard uri>.parquet`` with one of the ``REJECT_*`` reasons, in the way datatrove
writes excluded documents out with their reason. Memory stays bounded whatever a shard holds (see
``CleanConfig.max_line_bytes``), and a transient storage error is retried, then raised, never turned into
rejects (:class:`ShardReadError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.errors import ConfigError, check_range, check_ranges
from core.storage import StorageOptions

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("meta", pa.string()),
        ("truncated", pa.bool_()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [("source", pa.string()), ("reason", pa.string()), ("detail", pa.string()), ("raw", pa.string())]
)

# Reject reasons. These strings land in rejects files and reports: keep them stable.
REJECT_BAD_JSON = "bad_json"
"""The line does not parse as JSON, or parses to something other than an object."""
REJECT_MISSING_TEXT = "missing_text"
"""No ``text`` field, or one that is not a string (null included)."""
REJECT_NON_UTF8 = "non_utf8"
"""The line's bytes are not valid UTF-8, or its text holds lone surrogates that UTF-8 cannot carry."""
REJECT_EMPTY = "empty"
"""The text is empty or whitespace, or the line is blank."""
REJECT_TOO_SHORT = "too_short"
"""Fewer than ``CleanConfig.min_chars`` characters after stripping."""
REJECT_TOO_LONG = "too_long"
"""More than ``CleanConfig.max_chars`` characters, with ``too_long="reject"``; or a JSONL line of more than
``CleanConfig.max_line_bytes`` bytes, whatever ``too_long`` says (its size is in the detail)."""
REJECT_TRUNCATED_STREAM = "truncated_stream"
"""The file ends early or is corrupt partway; one per shard, the rows before the break are kept. A
0-byte ``.gz``/``.zst`` file (not even a header) is one such reject, with the bare URI as its source."""
REJECT_SHARD_TOO_LARGE = "shard_too_large"
"""The shard decompresses to more than ``CleanConfig.max_shard_bytes``; one per shard, where reading stopped;
the rows before are kept."""
REJECT_UNREADABLE = "unreadable"
"""The file cannot be opened or parsed at all."""
REJECT_MISSING_TEXT_COLUMN = "missing_text_column"
"""A Parquet shard without a ``text`` column (a kind of unreadable file, counted apart)."""
REJECT_REASONS = (
    REJECT_BAD_JSON,
    REJECT_MISSING_TEXT,
    REJECT_NON_UTF8,
    REJECT_EMPTY,
    REJECT_TOO_SHORT,
    REJECT_TOO_LONG,
    REJECT_TRUNCATED_STREAM,
    REJECT_SHARD_TOO_LARGE,
    REJECT_UNREADABLE,
    REJECT_MISSING_TEXT_COLUMN,
)

RAW_MAX_CHARS = 2_000
"""A reject keeps at most this many characters of its raw input."""

_READ_CHUNK_BYTES = 1 << 20  # compressed bytes per read: big enough for S3, small enough to stream
# Compressed bytes per decompressor call. A call that hits corrupt data raises and loses its own output,
# so smaller slices bound what a corrupt shard loses; zlib's per-call overhead is negligible at 16 KiB.
_DECOMPRESS_SLICE_BYTES = 16 << 10
# Decompressed bytes per zlib call: zlib stops there and keeps the rest of its input for the next call.
_DECOMPRESS_OUT_BYTES = 1 << 20
# zstd has no output limit per call, and one 4-byte RLE block expands to 128 KiB, so its input goes in
# small slices: at most about 16 MiB come out of one call. The cost per call is negligible.
_ZSTD_SLICE_BYTES = 512
_PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"

Kind = Literal["doc", "reject"]
DOC: Kind = "doc"
REJECT: Kind = "reject"


@dataclass(frozen=True)
class CleanConfig:
    """What counts as a usable document."""

    min_chars: int = 1
    """Texts shorter than this after stripping are rejected: ``empty`` at 0 characters, else ``too_short``."""

    max_chars: int = 20_000
    """Texts longer than this are truncated or rejected, per ``too_long``."""

    too_long: Literal["truncate", "reject"] = "truncate"
    """``truncate``: keep the first ``max_chars`` characters and mark the row ``truncated``; ``reject``:
    send the row to the rejects as ``too_long``."""

    max_line_bytes: int = 16 << 20
    """A JSONL line longer than this many bytes (16 MiB) is never held in memory: it is rejected as
    ``too_long`` with its size while the reader skips to the next line. It bounds a reader's memory
    whatever a shard holds (a one-line gzip bomb), at a few times this value."""

    max_shard_bytes: int = 64 << 30
    """Decompressed bytes read from one shard at most (64 GiB, far above a real corpus shard); past it
    the shard is cut with one ``shard_too_large`` reject. It bounds the time a decompression bomb costs.
    For Parquet, the uncompressed size of the columns read, checked per row group."""

    read_attempts: int = 5
    """Tries of each open or read of a shard, the first included, when storage fails transiently
    (connection errors, timeouts, 5xx); then :class:`ShardReadError` is raised. 1: no retry."""

    read_backoff_s: float = 1.0
    """Seconds before the second try; it doubles for each further one, up to 30 s, plus up to 50% jitter."""

    def __post_init__(self) -> None:
        check_range("min_chars", self.min_chars, ge=0)
        check_range("max_chars", self.max_chars, ge=1)
        if self.max_chars <= self.min_chars:
            raise ConfigError("max_chars", self.max_chars, f"must be greater than min_chars={self.min_chars}")
        if self.too_long not in ("truncate", "reject"):
            raise ConfigError("too_long", self.too_long, "must be 'truncate' or 'reject'")
        check_ranges(self, ("max_line_bytes", "max_shard_bytes", "read_attempts"), ge=1)
        check_range("read_backoff_s", self.read_backoff_s, ge=0, hint="seconds")


def doc_id(text: str) -> str:
    """Content id: the first 16 hex digits of the SHA-1 of the UTF-8 text.

    Hashes the stripped text *before* truncation, so a document keeps its id whatever ``max_chars`` is,
    and exact duplicates get the same id in every shard.
    """
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def shard_key(uri: str) -> str:
    """A stable file name stem for a shard: first 16 hex digits of the SHA-1 of its URI."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def _reject(source: str, reason: str, detail: str, raw: str | bytes) -> tuple[Kind, dict[str, Any]]:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    row = {"source": source, "reason": reason, "detail": detail, "raw": raw[:RAW_MAX_CHARS]}
    return REJECT, row


def _meta_json(meta: Any) -> str:
    """``meta`` as JSON with sorted keys; a string that already holds JSON is re-encoded the same way."""
    if meta is None:
        return "{}"
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            pass  # free text: keep it, as a JSON string
    # ensure_ascii (the default) escapes lone surrogates too, so the result always encodes as UTF-8.
    return json.dumps(meta, sort_keys=True, default=str)


def clean_text(text: str, meta: Any, source: str, raw: str | bytes, clean: CleanConfig) -> tuple[Kind, dict[str, Any]]:
    """Apply ``clean`` to one document's text: a doc row (``DOC_SCHEMA``) or a reject row."""
    stripped = text.strip()
    try:
        identity = doc_id(stripped)
    except UnicodeEncodeError as err:
        # JSON "\ud800" escapes decode to lone surrogates, which neither UTF-8 nor Arrow can hold.
        return _reject(source, REJECT_NON_UTF8, f"text holds a lone surrogate: {err}", raw)
    length = len(stripped)
    if length < clean.min_chars:
        reason = REJECT_EMPTY if length == 0 else REJECT_TOO_SHORT
        return _reject(source, reason, f"{length} chars < min_chars={clean.min_chars}", raw)
    truncated = length > clean.max_chars
    if truncated:
        if clean.too_long == "reject":
            return _reject(source, REJECT_TOO_LONG, f"{length} chars > max_chars={clean.max_chars}", raw)
        stripped = stripped[: clean.max_chars]
    row = {
        "id": identity,
        "text": stripped,
        "source": source,
        "meta": _meta_json(meta),
        "truncated": truncated,
    }
    return DOC, row


def parse_line(line: bytes, source: str, clean: CleanConfig) -> tuple[Kind, dict[str, Any]]:
    """One RedPajama JSONL line (without its newline) to a doc row or a reject row."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return _reject(source, REJECT_NON_UTF8, str(err), line)
    if not decoded.strip():
        return _reject(source, REJECT_EMPTY, "blank line", decoded)
    try:
        obj = json.loads(decoded)
    except (ValueError, RecursionError) as err:
        return _reject(source, REJECT_BAD_JSON, str(err) or type(err).__name__, decoded)
    if not isinstance(obj, dict):
        return _reject(source, REJECT_BAD_JSON, f"expected a JSON object, got {type(obj).__name__}", decoded)
    text = obj.get("text")
    if not isinstance(text, str):
        detail = "no 'text' field" if "text" not in obj else f"'text' is {type(text).__name__}, not a string"
        return _reject(source, REJECT_MISSING_TEXT, detail, decoded)
    return clean_text(text, obj.get("meta"), source, decoded, clean)


class CorruptStream(Exception):
    """A compressed stream ended early or holds bytes that do not decompress."""

    reason = REJECT_TRUNCATED_STREAM


class EmptyStream(CorruptStream):
    """A compressed file of 0 bytes, without even a header: a reject for the whole file."""


class ShardTooLarge(CorruptStream):
    """The shard decompresses to more than ``CleanConfig.max_shard_bytes``."""

    reason = REJECT_SHARD_TOO_LARGE


class ShardReadError(Exception):
    """A shard could not be read for a reason outside its data: storage kept failing transiently, or the
    file changed between two tries. Raised, never a reject, so the shard or the run fails and a rerun
    reads it again."""


# A missing or forbidden file stays that way on retry: an ``unreadable`` reject.
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


class _ResilientFile(io.RawIOBase):
    """A shard open for reading that rides out transient storage errors.

    After a failed open, read or seek it waits (exponential backoff), reopens the file, checks that it is
    the same file (size, and ETag or mtime) and seeks back, so the line splitter and pyarrow never see
    the failure. When ``clean.read_attempts`` are used up it raises :class:`ShardReadError`; so does a
    file that changed or vanished in between. Errors that no retry cures (missing, forbidden) propagate
    from the first open as they are.
    """

    def __init__(self, uri: str, options: StorageOptions | None, clean: CleanConfig):
        super().__init__()
        self.uri, self.options, self.clean = uri, options, clean
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
        attempts = self.clean.read_attempts
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
                delay = min(_MAX_BACKOFF_S, self.clean.read_backoff_s * 2 ** (attempt - 1))
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


def _read_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(_READ_CHUNK_BYTES):
        yield chunk


def _read_slices(handle: IO[bytes], size: int) -> Iterator[bytes]:
    for chunk in _read_chunks(handle):
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


def _gzip_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip stream; raises CorruptStream at a break.

    zlib is driven by hand rather than through ``gzip.GzipFile`` so that every byte before a truncation
    or corruption comes out: GzipFile raises EOFError and drops what its last read had decoded. Each call
    returns at most ``_DECOMPRESS_OUT_BYTES``, whatever the compression ratio.
    """
    decompressor = zlib.decompressobj(wbits=31)  # 16 + 15: gzip header and trailer, 32 KiB window
    member_started = False
    empty = True
    for data in _read_slices(handle, _DECOMPRESS_SLICE_BYTES):
        empty = False
        full = False
        while data or full:
            if decompressor.eof:
                # Multi-member gzip (RFC 1952, sec. 2.2), as `cat a.gz b.gz` makes: start the next member.
                if not data.strip(b"\x00"):
                    break  # zero padding after the last member, which gzip(1) tolerates too
                decompressor = zlib.decompressobj(wbits=31)
            member_started = True
            try:
                out = decompressor.decompress(data, _DECOMPRESS_OUT_BYTES)
            except zlib.error as err:
                raise CorruptStream(f"corrupt gzip data: {err}") from err
            if out:
                yield out
            # Output cut at the limit may leave more to come from input zlib has already taken.
            full = len(out) == _DECOMPRESS_OUT_BYTES and not decompressor.eof
            data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
    if empty:
        raise EmptyStream("gzip file is empty (0 bytes), without even a gzip header")
    if member_started and not decompressor.eof:
        with contextlib.suppress(zlib.error):
            if tail := decompressor.flush():
                yield tail
        raise CorruptStream("gzip stream ends early: the file is truncated")


def _zstd_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) zstd stream; raises CorruptStream at a break."""
    import zstandard  # deferred: only .zst shards need it

    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    frame_started = False
    empty = True
    for data in _read_slices(handle, _ZSTD_SLICE_BYTES):
        empty = False
        while data:
            if frame.eof:
                frame = decompressor.decompressobj()  # concatenated frames, as `cat a.zst b.zst` makes
            frame_started = True
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as err:
                raise CorruptStream(f"corrupt zstd data: {err}") from err
            if out:
                yield out
            data = frame.unused_data if frame.eof else b""
    if empty:
        raise EmptyStream("zstd file is empty (0 bytes), without even a frame header")
    if frame_started and not frame.eof:
        raise CorruptStream("zstd stream ends early: the file is truncated")


def _capped(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    """``chunks`` up to ``limit`` bytes in all; raises ShardTooLarge if there are more."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            if keep := len(chunk) - (total - limit):
                yield chunk[:keep]
            raise ShardTooLarge(f"the shard decompresses to more than max_shard_bytes={limit} bytes: reading stopped")
        yield chunk


_RAW_HEAD_BYTES = RAW_MAX_CHARS * 4  # enough bytes for RAW_MAX_CHARS characters of any UTF-8


def _split_lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[tuple[bytes, int, CorruptStream | None]]:
    """``(line, size, None)`` per line, without its ``\\n``; a stream break ends it with ``(partial, size, error)``.

    A line of more than ``max_line_bytes`` is never held whole: ``line`` is then its first bytes (enough
    for a reject's ``raw``) and ``size`` its full length, and the rest is dropped as it streams past.
    """
    buffer = bytearray()
    head, dropped = b"", 0  # while dropping an over-long line: its first bytes and its length so far
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            if dropped:
                end = chunk.find(b"\n")
                if end == -1:
                    dropped += len(chunk)
                    continue
                yield head, dropped + end, None
                head, dropped, view = b"", 0, view[end + 1 :]
            search, start = len(buffer), 0
            buffer += view
            while (end := buffer.find(b"\n", search)) != -1:
                size = end - start
                yield (
                    bytes(buffer[start : start + min(size, _RAW_HEAD_BYTES if size > max_line_bytes else size)]),
                    size,
                    None,
                )
                start = search = end + 1
            del buffer[:start]
            if len(buffer) > max_line_bytes:
                head, dropped = bytes(buffer[:_RAW_HEAD_BYTES]), len(buffer)
                buffer.clear()
    except CorruptStream as err:
        yield (head, dropped, err) if dropped else (bytes(buffer), len(buffer), err)
        return
    if dropped:
        yield head, dropped, None
    elif buffer:
        yield bytes(buffer), len(buffer), None  # last line without a trailing newline


def shard_format(uri: str) -> Literal["parquet", "gzip", "zstd", "jsonl"]:
    """The shard's format, from its extension."""
    name = uri.lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith(".gz"):
        return "gzip"
    if name.endswith((".zst", ".zstd")):
        return "zstd"
    return "jsonl"


def _iter_jsonl(
    handle: IO[bytes], uri: str, compression: str, clean: CleanConfig
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    chunks = {"gzip": _gzip_chunks, "zstd": _zstd_chunks, "jsonl": _read_chunks}[compression](handle)
    line_no = 0
    for line, size, error in _split_lines(_capped(chunks, clean.max_shard_bytes), clean.max_line_bytes):
        line_no += 1
        source = f"{uri}#{line_no}"
        if error is not None:
            # One reject for the break; its raw is the partial line that the break cut off.
            yield _reject(uri if isinstance(error, EmptyStream) else source, error.reason, str(error), line)
            return
        if size > clean.max_line_bytes:
            yield _reject(
                source, REJECT_TOO_LONG, f"line of {size} bytes > max_line_bytes={clean.max_line_bytes}", line
            )
            continue
        if line.startswith(_BOM):
            line = line[len(_BOM) :]  # a byte order mark, as editors put at the start of a file: not JSON
        yield parse_line(line.rstrip(b"\r"), source, clean)


@dataclass(frozen=True)
class _NotUtf8:
    """A Parquet value whose bytes are not UTF-8, in place of the string it should have been."""

    detail: str
    raw: bytes


def _column_values(column: pa.Array) -> list[Any]:
    """A column as Python values; a value that is not valid UTF-8 becomes a :class:`_NotUtf8`, so that
    one bad value costs its own row, not its batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    values: list[Any] = []
    for index in range(len(column)):
        try:
            values.append(column[index].as_py())
        except UnicodeDecodeError as err:
            raw = b""
            with contextlib.suppress(pa.ArrowException):
                raw = column.slice(index, 1).cast(pa.binary())[0].as_py()  # a string column's bytes
            values.append(_NotUtf8(str(err), raw))
    return values


def _row_group_bytes(metadata: pq.RowGroupMetaData, columns: list[str]) -> int:
    """Uncompressed bytes of ``columns`` (and their nested fields) in one row group."""
    chunks = (metadata.column(index) for index in range(metadata.num_columns))
    return sum(chunk.total_uncompressed_size for chunk in chunks if chunk.path_in_schema.split(".")[0] in columns)


def _parquet_rows(
    parquet: pq.ParquetFile, uri: str, columns: list[str], clean: CleanConfig
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    row_index = 0
    budget = clean.max_shard_bytes
    try:
        for group in range(parquet.num_row_groups):
            budget -= _row_group_bytes(parquet.metadata.row_group(group), columns)
            if budget < 0:
                detail = f"the shard holds more than max_shard_bytes={clean.max_shard_bytes} bytes: reading stopped"
                yield _reject(f"{uri}#{row_index}", REJECT_SHARD_TOO_LARGE, detail, "")
                return
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], columns=columns):
                texts = _column_values(batch.column("text"))
                metas = _column_values(batch.column("meta")) if "meta" in columns else [None] * len(texts)
                for text, meta in zip(texts, metas, strict=True):
                    yield _parquet_row(text, meta, f"{uri}#{row_index}", clean)
                    row_index += 1
    except ShardReadError:
        raise  # storage, not data: the caller fails the shard
    except Exception as err:  # a corrupt row group: keep what came before it
        yield _reject(f"{uri}#{row_index}", REJECT_TRUNCATED_STREAM, f"{type(err).__name__}: {err}", "")


def _parquet_row(text: Any, meta: Any, source: str, clean: CleanConfig) -> tuple[Kind, dict[str, Any]]:
    if isinstance(text, _NotUtf8):
        return _reject(source, REJECT_NON_UTF8, f"'text' is not UTF-8: {text.detail}", text.raw)
    if text is None:
        return _reject(source, REJECT_MISSING_TEXT, "'text' is null", "")
    if isinstance(meta, _NotUtf8):
        return _reject(source, REJECT_NON_UTF8, f"'meta' is not UTF-8: {meta.detail}", text)
    return clean_text(text, meta, source, text, clean)


def _iter_parquet(handle: IO[bytes], uri: str, clean: CleanConfig) -> Iterator[tuple[Kind, dict[str, Any]]]:
    try:
        parquet = pq.ParquetFile(handle)
    except ShardReadError:
        raise
    except Exception as err:  # any other failure to parse the footer means an unreadable file
        yield _reject(uri, REJECT_UNREADABLE, f"{type(err).__name__}: {err}", "")
        return
    names = parquet.schema_arrow.names
    if "text" not in names:
        yield _reject(uri, REJECT_MISSING_TEXT_COLUMN, f"columns are {names}", "")
        return
    text_type = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        yield _reject(uri, REJECT_UNREADABLE, f"'text' column has type {text_type}, expected string", "")
        return
    columns = ["text", "meta"] if "meta" in names else ["text"]
    yield from _parquet_rows(parquet, uri, columns, clean)


def iter_shard(uri: str, options: StorageOptions | None, clean: CleanConfig) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """Stream one shard as ``(kind, row)`` pairs, in file order.

    ``kind`` is ``"doc"`` with a row holding the ``DOC_SCHEMA`` keys, or ``"reject"`` with a row holding
    the ``REJECT_SCHEMA`` keys. ``source`` is ``f"{uri}#{n}"``: n is the 1-based line number for JSONL
    (blank lines count) and the 0-based row index for Parquet; a reject for the whole file has the bare
    URI. A shard that does not exist or may not be read yields one ``unreadable`` reject instead of
    raising. A transient storage error (a dropped connection, a timeout, a 5xx after s3fs's own retries)
    is retried per ``clean.read_attempts``; if it persists, :class:`ShardReadError` is raised, so that the
    shard or the run fails instead of a transient failure being recorded as bad data.
    """
    compression = shard_format(uri)
    try:
        handle = _ResilientFile(uri, options, clean)
    except ShardReadError:
        raise
    except Exception as err:  # missing, forbidden, malformed URI: the run goes on without the shard
        yield _reject(uri, REJECT_UNREADABLE, f"{type(err).__name__}: {err}", "")
        return
    with handle:
        if compression == "parquet":
            yield from _iter_parquet(handle, uri, clean)
        else:
            yield from _iter_jsonl(handle, uri, compression, clean)


class _RejectSink:
    """Collects a shard's rejects as compressed Parquet in memory, a batch at a time."""

    def __init__(self, batch_rows: int = 1024):
        self.batch_rows = batch_rows
        self.pending: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.buffer = pa.BufferOutputStream()
        self.writer = pq.ParquetWriter(self.buffer, REJECT_SCHEMA)

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        self.counts[row["reason"]] += 1
        if len(self.pending) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=REJECT_SCHEMA))
            self.pending = []

    def finish(self, uri: str, options: StorageOptions | None) -> None:
        """Write every reject to ``uri`` at once (an empty file when there were none)."""
        self._flush()
        self.writer.close()
        storage.write_bytes_atomic(uri, self.buffer.getvalue().to_pybytes(), options)


def rejects_uri(rejects_dir: str, shard_uri: str) -> str:
    """Where the rejects of ``shard_uri`` go: ``{rejects_dir}/{sha1(uri)[:16]}.parquet``."""
    return storage.join(rejects_dir, f"{shard_key(shard_uri)}.parquet")


def read_shard(
    uri: str,
    options: StorageOptions | None,
    clean: CleanConfig,
    rejects_dir: str,
    rows_per_batch: int = 1024,
) -> Iterator[pa.Table]:
    """The documents of one shard as ``DOC_SCHEMA`` tables of at most ``rows_per_batch`` rows.

    After the last table, the shard's rejects file is written (always, even with no rejects), so that a
    retried task overwrites the same file and counts stay right.
    """
    docs: list[dict[str, Any]] = []
    sink = _RejectSink()
    doc_count = 0
    for kind, row in iter_shard(uri, options, clean):
        if kind == REJECT:
            sink.add(row)
            continue
        docs.append(row)
        doc_count += 1
        if len(docs) >= rows_per_batch:
            yield pa.Table.from_pylist(docs, schema=DOC_SCHEMA)
            docs = []
    if docs:
        yield pa.Table.from_pylist(docs, schema=DOC_SCHEMA)
    sink.finish(rejects_uri(rejects_dir, uri), options)
    logger.info("shard %s: %d docs, %d rejects %s", uri, doc_count, sum(sink.counts.values()), dict(sink.counts))


def _read_shards_udf(
    batch: pa.Table,
    options: StorageOptions | None,
    clean: CleanConfig,
    rejects_dir: str,
    rows_per_batch: int,
) -> Iterator[pa.Table]:
    for uri in batch.column("uri").to_pylist():
        yield from read_shard(uri, options, clean, rejects_dir, rows_per_batch)


def read_corpus(
    uris: list[str],
    options: StorageOptions | None,
    clean: CleanConfig,
    rejects_dir: str,
    rows_per_batch: int = 1024,
    num_cpus: float = 0.5,
) -> ray.data.Dataset:
    """A Ray Dataset of the documents in ``uris`` (``DOC_SCHEMA``), one read task per shard.

    Rejects go to ``rejects_dir``, one Parquet file per shard; :func:`count_rejects` sums them. Read tasks
    ask for ``num_cpus`` (default 0.5) so that on a 2-CPU machine they run alongside a pool of actors
    downstream instead of waiting on them forever (docs/design.md, "Ray on small machines"). Lazy, like
    every Ray Dataset: shards are read when the dataset is consumed.
    """
    import ray  # deferred: the core above runs without Ray

    if not uris:
        raise ConfigError("uris", uris, "give at least one shard (see storage.expand)")
    if rows_per_batch < 1:
        raise ConfigError("rows_per_batch", rows_per_batch, "must be >= 1")
    # Resolve env fallbacks here, on the driver: a worker's environment may differ (storage.py).
    resolved = (options or StorageOptions()).resolved()
    storage.makedirs(rejects_dir, resolved)
    logger.info("reading %d shards, rejects to %s", len(uris), rejects_dir)
    items = [{"uri": uri} for uri in uris]
    return ray.data.from_items(items, override_num_blocks=len(uris)).map_batches(
        _read_shards_udf,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={
            "options": resolved,
            "clean": clean,
            "rejects_dir": rejects_dir,
            "rows_per_batch": rows_per_batch,
        },
        num_cpus=num_cpus,
    )


def count_rejects(rejects_dir: str, options: StorageOptions | None = None) -> dict[str, int]:
    """Rejects per reason over every ``*.parquet`` file in ``rejects_dir``; empty if there is none."""
    try:
        files = storage.expand(rejects_dir, options, config_field="rejects_dir")
    except ConfigError:
        return {}  # no rejects directory yet, or an empty one
    counts: Counter[str] = Counter()
    for info in files:
        if not info.uri.endswith(".parquet"):
            continue
        reasons = storage.read_parquet(info.uri, options, columns=["reason"]).column("reason")
        for entry in pc.value_counts(reasons).to_pylist():
            counts[entry["values"]] += entry["counts"]
    return dict(sorted(counts.items()))
