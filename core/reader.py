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
import json
import logging
import re
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
from core.parquet_pages import PAGE_DICTIONARY, ChunkLayout, Page, chunk_pages
from core.retrying_file import RetryingFile, ShardReadError
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
"""More than ``CleanConfig.max_chars`` characters, with ``too_long="reject"``; or, whatever ``too_long`` says,
a JSONL line or decoded Parquet row of more than ``CleanConfig.max_line_bytes`` bytes (its size is in the
detail), or a Parquet row in a row group with a page over ``CleanConfig.max_page_bytes``."""
REJECT_TRUNCATED_STREAM = "truncated_stream"
"""The file ends early or is corrupt partway; one per shard, the rows before the break are kept. A
0-byte ``.gz``/``.zst`` file (not even a header) is one such reject, with the bare URI as its source."""
REJECT_SHARD_TOO_LARGE = "shard_too_large"
"""The shard decompresses to more than ``CleanConfig.max_shard_bytes``; one per shard, where reading stopped;
the rows before are kept."""
REJECT_TOO_DEEP = "too_deep"
"""A JSONL line, or a Parquet ``meta`` string, that nests JSON objects and arrays more than
``MAX_JSON_DEPTH`` levels deep; refused before it is parsed."""
REJECT_UNREADABLE = "unreadable"
"""The file cannot be opened or parsed at all; also a Parquet ``meta`` column whose type nests more than
``MAX_JSON_DEPTH`` levels deep."""
REJECT_MISSING_TEXT_COLUMN = "missing_text_column"
"""A Parquet shard without a ``text`` column (a kind of unreadable file, counted apart)."""
REJECT_REASONS = (
    REJECT_BAD_JSON,
    REJECT_MISSING_TEXT,
    REJECT_NON_UTF8,
    REJECT_EMPTY,
    REJECT_TOO_SHORT,
    REJECT_TOO_LONG,
    REJECT_TOO_DEEP,
    REJECT_TRUNCATED_STREAM,
    REJECT_SHARD_TOO_LARGE,
    REJECT_UNREADABLE,
    REJECT_MISSING_TEXT_COLUMN,
)

RAW_MAX_CHARS = 2_000
"""A reject keeps at most this many characters of its raw input."""

MAX_JSON_DEPTH = 100
"""Levels of JSON objects and arrays a record may nest (a JSONL line's own object is level 1; a RedPajama
line nests 3). Deeper input is a ``too_deep`` reject, found by scanning its brackets before it is parsed:
Python's JSON parser and encoder recurse once per level, and near the interpreter's recursion limit
whether a line parses, encodes or raises would depend on how deep the reader's own stack happens to be."""

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
    """A JSONL line, or a Parquet row once decoded, of more than this many bytes (16 MiB) is never held as
    a string: it is rejected as ``too_long`` with its size while the reader goes on to the next. It bounds
    a reader's memory whatever a shard holds (a one-line gzip bomb), at a few times this value (for
    Parquet, with ``max_page_bytes``)."""

    max_page_bytes: int = 64 << 20
    """A Parquet page that decompresses to more than this many bytes (64 MiB) is never decompressed: every
    row of its row group becomes a ``too_long`` reject. pyarrow decompresses a page whole, so this, with
    ``max_line_bytes``, bounds a Parquet reader's memory at a few times this value. pyarrow's writer checks
    its page size only every 1,024 rows, so a file of documents longer than about 64 KB on average may need
    more."""

    max_shard_bytes: int = 64 << 30
    """Decompressed bytes read from one shard at most (64 GiB, far above a real corpus shard); past it
    the shard is cut with one ``shard_too_large`` reject. It bounds the time a decompression bomb costs.
    For Parquet, the bytes the columns read decode to (a dictionary value counts at every row that uses it);
    a row group whose pages hold more than what is left is not started."""

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
        check_ranges(self, ("max_line_bytes", "max_page_bytes", "max_shard_bytes", "read_attempts"), ge=1)
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


# A JSON string (escapes included) or one bracket: what matters for nesting. Strings are matched whole so
# that the brackets inside them do not count.
_JSON_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def nests_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON in ``text`` nests objects and arrays more than ``limit`` levels deep.

    Scans brackets outside strings, without parsing and without recursion. Text with no more than
    ``limit`` opening brackets at all (nearly every record) is answered by two counts.
    """
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    for token in _JSON_STRING_OR_BRACKET.finditer(text):
        bracket = token.group()
        if bracket in ("{", "["):
            depth += 1
            if depth > limit:
                return True
        elif bracket in ("}", "]"):
            depth -= 1
    return False


class _TooDeep(Exception):
    """A value nests JSON more than ``MAX_JSON_DEPTH`` levels deep."""


def _too_deep_detail(what: str) -> str:
    return f"{what} nests JSON more than MAX_JSON_DEPTH={MAX_JSON_DEPTH} levels deep"


def _meta_json(meta: Any) -> str:
    """``meta`` as JSON with sorted keys; a string that already holds JSON is re-encoded the same way.

    Raises :class:`_TooDeep` for a string that nests more than ``MAX_JSON_DEPTH`` levels. Other values
    come bounded: from a JSONL line that was checked whole, or from a Parquet column whose type was.
    """
    if meta is None:
        return "{}"
    if isinstance(meta, str):
        if nests_too_deep(meta):
            raise _TooDeep(_too_deep_detail("'meta'"))
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
    try:
        meta_json = _meta_json(meta)
    except _TooDeep as err:
        return _reject(source, REJECT_TOO_DEEP, str(err), raw)
    except RecursionError:  # within the bound, but the caller's own stack was nearly exhausted
        return _reject(source, REJECT_TOO_DEEP, "'meta' nests too deep for the reader's stack", raw)
    row = {"id": identity, "text": stripped, "source": source, "meta": meta_json, "truncated": truncated}
    return DOC, row


def parse_line(line: bytes, source: str, clean: CleanConfig) -> tuple[Kind, dict[str, Any]]:
    """One RedPajama JSONL line (without its newline) to a doc row or a reject row."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return _reject(source, REJECT_NON_UTF8, str(err), line)
    if not decoded.strip():
        return _reject(source, REJECT_EMPTY, "blank line", decoded)
    if nests_too_deep(decoded):
        return _reject(source, REJECT_TOO_DEEP, _too_deep_detail("the line"), decoded)
    try:
        obj = json.loads(decoded)
    except ValueError as err:
        return _reject(source, REJECT_BAD_JSON, str(err) or type(err).__name__, decoded)
    except RecursionError:  # within the bound, but the caller's own stack was nearly exhausted
        return _reject(source, REJECT_TOO_DEEP, "the line nests too deep for the reader's stack", decoded)
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


@dataclass(frozen=True)
class _GroupLayout:
    """What the page headers of one row group's columns say, before anything in it is decompressed."""

    rows: int
    """Rows, as the file's metadata says."""
    chunks: list[ChunkLayout]

    @property
    def largest_page(self) -> int:
        return max((chunk.largest_page for chunk in self.chunks), default=0)

    @property
    def stored_bytes(self) -> int:
        return sum(chunk.stored_bytes for chunk in self.chunks)

    def batch_rows(self, budget: int) -> int:
        """The most rows (a power of two, at most ``_PARQUET_BATCH_ROWS``) that decode within ``budget`` bytes;
        1 where not even two rows are known to."""
        rows = _PARQUET_BATCH_ROWS
        while rows > 1 and sum(chunk.batch_bound(rows) for chunk in self.chunks) > budget:
            rows //= 2
        return rows


class _ParquetShard:
    """A Parquet shard open for reading: the file, its handle, the columns read and their leaf columns."""

    def __init__(self, parquet: pq.ParquetFile, handle: IO[bytes], uri: str, columns: list[str]):
        self.parquet, self.handle, self.uri, self.columns = parquet, handle, uri, columns
        leaves = (parquet.schema.column(index) for index in range(parquet.metadata.num_columns))
        self.leaves = [(index, leaf) for index, leaf in enumerate(leaves) if leaf.path.split(".")[0] in columns]
        self._probe: pq.ParquetFile | None = None

    def layout(self, group: int, budget: int) -> _GroupLayout:
        """The group's page headers. A dictionary too large to bound a batch by its page size is decoded, on
        its own, to find its longest value."""
        metadata = self.parquet.metadata.row_group(group)
        chunks = []
        for index, leaf in self.leaves:
            chunk = metadata.column(index)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            pages = chunk_pages(self.handle, start, chunk.total_compressed_size)
            dictionaries = [page for page in pages if page.kind == PAGE_DICTIONARY]
            longest = sum(page.uncompressed_bytes for page in dictionaries)
            if longest * _PARQUET_BATCH_ROWS > budget and _probe_finds_the_dictionary(leaf, pages, budget):
                longest = self._longest_dictionary_value(group, leaf.path, dictionaries[0])
            chunks.append(ChunkLayout(pages, leaf.max_repetition_level > 0, longest))
        return _GroupLayout(metadata.num_rows, chunks)

    def _longest_dictionary_value(self, group: int, path: str, dictionary: Page) -> int:
        """Bytes of the longest value in the dictionary of leaf ``path`` in ``group``: one row read with the leaf
        kept dictionary-encoded decodes its dictionary page and one data page, and expands nothing."""
        if self._probe is None:
            byte_arrays = [leaf.path for _, leaf in self.leaves if leaf.physical_type == "BYTE_ARRAY"]
            self._probe = pq.ParquetFile(
                self.handle, read_dictionary=byte_arrays, pre_buffer=False, buffer_size=_READ_CHUNK_BYTES
            )
        batch = next(self._probe.iter_batches(batch_size=1, row_groups=[group], columns=[path]), None)
        array = batch.column(0) if batch is not None else None
        while isinstance(array, pa.StructArray | pa.ListArray | pa.LargeListArray) and array.type.num_fields == 1:
            array = array.field(0) if isinstance(array, pa.StructArray) else array.values
        # Only the whole page's dictionary says how long a value can be (not one built from a plain page).
        if not isinstance(array, pa.DictionaryArray) or len(array.dictionary) != dictionary.values:
            return dictionary.uncompressed_bytes
        return int(pc.max(pc.binary_length(array.dictionary)).as_py() or 0)


def _probe_finds_the_dictionary(leaf: Any, pages: list[Page], budget: int) -> bool:
    """Whether decoding one row of this chunk shows its dictionary whole, within ``budget`` bytes a page: a
    string chunk with one dictionary page, whose first data page holds indices into it."""
    data = [page for page in pages if page.is_data]
    return (
        leaf.physical_type == "BYTE_ARRAY"
        and sum(page.kind == PAGE_DICTIONARY for page in pages) == 1
        and bool(data)
        and data[0].dictionary_encoded
        and max(page.uncompressed_bytes for page in pages) <= budget
    )


@dataclass
class _ParquetProgress:
    """Where a Parquet shard's read stands: the next row's index, and decoded bytes left to read."""

    row: int
    budget: int

    def source(self, uri: str) -> str:
        return f"{uri}#{self.row}"


def _shard_too_large(uri: str, progress: _ParquetProgress, clean: CleanConfig) -> tuple[Kind, dict[str, Any]]:
    detail = f"the shard decodes to more than max_shard_bytes={clean.max_shard_bytes} bytes: reading stopped"
    return _reject(progress.source(uri), REJECT_SHARD_TOO_LARGE, detail, "")


def _undecoded_group(
    uri: str, group: int, layout: _GroupLayout, clean: CleanConfig, progress: _ParquetProgress
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """One ``too_long`` reject per row of a row group holding a page too large to decompress."""
    detail = (
        f"row group {group} holds a Parquet page of {layout.largest_page} bytes uncompressed > "
        f"max_page_bytes={clean.max_page_bytes}: its {layout.rows} rows are not decoded"
    )
    for _ in range(layout.rows):
        yield _reject(progress.source(uri), REJECT_TOO_LONG, detail, "")
        progress.row += 1


def _row_bytes(batch: pa.RecordBatch) -> list[int]:
    """Per row, the bytes of its text and of a string meta, read from the Arrow offsets (nothing is copied)."""
    sizes = pc.fill_null(pc.binary_length(batch.column("text")), 0)
    if "meta" in batch.schema.names and pa.types.is_string(batch.schema.field("meta").type):
        sizes = pc.add(sizes, pc.fill_null(pc.binary_length(batch.column("meta")), 0))
    return sizes.to_pylist()


def _text_head(column: pa.Array) -> bytes:
    """The first bytes of a one-row text column, enough for a reject's ``raw``, without converting the rest."""
    binary = column.cast(pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
    return pc.binary_slice(binary, 0, _RAW_HEAD_BYTES)[0].as_py() or b""


def _converted_rows(
    batch: pa.RecordBatch, columns: list[str], clean: CleanConfig, uri: str, progress: _ParquetProgress
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    texts = _column_values(batch.column("text"))
    metas = _column_values(batch.column("meta")) if "meta" in columns else [None] * len(texts)
    for text, meta in zip(texts, metas, strict=True):
        yield _parquet_row(text, meta, progress.source(uri), clean)
        progress.row += 1


def _batch_rows(
    batch: pa.RecordBatch, columns: list[str], clean: CleanConfig, uri: str, progress: _ParquetProgress
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """The rows of one decoded batch. A row of more than ``max_line_bytes`` (its text and a string meta) is a
    ``too_long`` reject with its size, as in JSONL, and never becomes a Python string."""
    sizes = _row_bytes(batch)
    if max(sizes, default=0) <= clean.max_line_bytes:
        yield from _converted_rows(batch, columns, clean, uri, progress)
        return
    for index, size in enumerate(sizes):
        if size <= clean.max_line_bytes:
            yield from _converted_rows(batch.slice(index, 1), columns, clean, uri, progress)
            continue
        head = _text_head(batch.column("text").slice(index, 1))
        detail = f"row of {size} bytes > max_line_bytes={clean.max_line_bytes}"
        yield _reject(progress.source(uri), REJECT_TOO_LONG, detail, head)
        progress.row += 1


def _decoded_group(
    shard: _ParquetShard, group: int, layout: _GroupLayout, clean: CleanConfig, progress: _ParquetProgress
) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """The rows of one row group, in batches sized from its page headers to decode within ``max_page_bytes``.

    Decoded bytes count against ``max_shard_bytes``: a dictionary value decodes again at every row using it.
    """
    batch_rows = layout.batch_rows(clean.max_page_bytes)
    for batch in shard.parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=shard.columns):
        progress.budget -= batch.nbytes
        if progress.budget < 0:
            yield _shard_too_large(shard.uri, progress, clean)
            return
        yield from _batch_rows(batch, shard.columns, clean, shard.uri, progress)


def _parquet_rows(shard: _ParquetShard, clean: CleanConfig) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """Every row of a Parquet shard, row group by row group, each sized from its page headers first."""
    progress = _ParquetProgress(row=0, budget=clean.max_shard_bytes)
    try:
        for group in range(shard.parquet.num_row_groups):
            layout = shard.layout(group, clean.max_page_bytes)
            if layout.largest_page > clean.max_page_bytes:
                yield from _undecoded_group(shard.uri, group, layout, clean, progress)
                continue
            if layout.stored_bytes > progress.budget:
                yield _shard_too_large(shard.uri, progress, clean)
                return
            yield from _decoded_group(shard, group, layout, clean, progress)
            if progress.budget < 0:
                return  # cut inside the group, with its shard_too_large reject
    except ShardReadError:
        raise  # storage, not data: the caller fails the shard
    except Exception as err:  # a corrupt row group or page header: keep what came before it
        yield _reject(progress.source(shard.uri), REJECT_TRUNCATED_STREAM, f"{type(err).__name__}: {err}", "")


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
    if "meta" in names and (depth := _type_depth(parquet.schema_arrow.field("meta").type)) > MAX_JSON_DEPTH:
        yield _reject(uri, REJECT_UNREADABLE, _too_deep_detail(f"the 'meta' column's type ({depth} levels)"), "")
        return
    columns = ["text", "meta"] if "meta" in names else ["text"]
    yield from _parquet_rows(_ParquetShard(parquet, handle, uri, columns), clean)


def _type_depth(arrow_type: pa.DataType) -> int:
    """Levels of structs, lists and maps in ``arrow_type``: the JSON nesting of its values (a scalar: 0)."""
    deepest, pending = 0, [(arrow_type, 0)]
    while pending:
        current, depth = pending.pop()
        if pa.types.is_nested(current):
            pending.extend((current.field(index).type, depth + 1) for index in range(current.num_fields))
        else:
            deepest = max(deepest, depth)
    return deepest


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
        handle = RetryingFile(uri, options, clean.read_attempts, clean.read_backoff_s)
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
