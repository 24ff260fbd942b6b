"""Reading corpus shards robustly: every line becomes a document or a reject with its reason.

Formats (chosen by file extension):

- RedPajama JSONL, one ``{"text": ..., "meta": {...}}`` per line: plain, ``.gz`` or ``.zst``/``.zstd``.
- Parquet (``.parquet``/``.pq``) with a ``text`` column and optionally a ``meta`` column (struct or string).

The core, :func:`iter_shard`, is plain Python and streams a shard a chunk at a time. :func:`read_shard`
groups its output into Arrow tables and writes the shard's rejects file, and :func:`read_corpus` runs that
over many shards as Ray Data tasks. Nothing vanishes: a line that cannot be used goes to
``rejects/<hash of the shard uri>.parquet`` with one of the ``REJECT_*`` reasons, in the way datatrove
writes excluded documents out with their reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import storage
from core.errors import ConfigError, check_range
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
"""More than ``CleanConfig.max_chars`` characters, with ``too_long="reject"``."""
REJECT_TRUNCATED_STREAM = "truncated_stream"
"""The file ends early or is corrupt partway; one per shard, the rows before the break are kept."""
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
    REJECT_UNREADABLE,
    REJECT_MISSING_TEXT_COLUMN,
)

RAW_MAX_CHARS = 2_000
"""A reject keeps at most this many characters of its raw input."""

_READ_CHUNK_BYTES = 1 << 20  # compressed bytes per read: big enough for S3, small enough to stream
# Compressed bytes per decompressor call. A call that hits corrupt data raises and loses its own output,
# so smaller slices bound what a corrupt shard loses; zlib's per-call overhead is negligible at 16 KiB.
_DECOMPRESS_SLICE_BYTES = 16 << 10
_PARQUET_BATCH_ROWS = 1024

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

    def __post_init__(self) -> None:
        check_range("min_chars", self.min_chars, ge=0)
        check_range("max_chars", self.max_chars, ge=1)
        if self.max_chars <= self.min_chars:
            raise ConfigError("max_chars", self.max_chars, f"must be greater than min_chars={self.min_chars}")
        if self.too_long not in ("truncate", "reject"):
            raise ConfigError("too_long", self.too_long, "must be 'truncate' or 'reject'")


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


def _read_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(_READ_CHUNK_BYTES):
        yield chunk


def _read_slices(handle: IO[bytes]) -> Iterator[bytes]:
    for chunk in _read_chunks(handle):
        for start in range(0, len(chunk), _DECOMPRESS_SLICE_BYTES):
            yield chunk[start : start + _DECOMPRESS_SLICE_BYTES]


def _gzip_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip stream; raises CorruptStream at a break.

    zlib is driven by hand rather than through ``gzip.GzipFile`` so that every byte before a truncation
    or corruption comes out: GzipFile raises EOFError and drops what its last read had decoded.
    """
    decompressor = zlib.decompressobj(wbits=31)  # 16 + 15: gzip header and trailer, 32 KiB window
    member_started = False
    for data in _read_slices(handle):
        while data:
            if decompressor.eof:
                # Multi-member gzip (RFC 1952, sec. 2.2), as `cat a.gz b.gz` makes: start the next member.
                if not data.strip(b"\x00"):
                    break  # zero padding after the last member, which gzip(1) tolerates too
                decompressor = zlib.decompressobj(wbits=31)
            member_started = True
            try:
                out = decompressor.decompress(data)
            except zlib.error as err:
                raise CorruptStream(f"corrupt gzip data: {err}") from err
            if out:
                yield out
            data = decompressor.unused_data if decompressor.eof else b""
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
    for data in _read_slices(handle):
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
    if frame_started and not frame.eof:
        raise CorruptStream("zstd stream ends early: the file is truncated")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[tuple[bytes, str | None]]:
    """Lines (without ``\\n``) as ``(line, None)``; a stream break ends it with ``(partial_line, error)``."""
    buffer = bytearray()
    try:
        for chunk in chunks:
            buffer += chunk
            start = 0
            while (end := buffer.find(b"\n", start)) != -1:
                yield bytes(buffer[start:end]), None
                start = end + 1
            del buffer[:start]
    except CorruptStream as err:
        yield bytes(buffer), str(err)
        return
    if buffer:
        yield bytes(buffer), None  # last line without a trailing newline


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
    for line, error in _split_lines(chunks):
        line_no += 1
        source = f"{uri}#{line_no}"
        if error is not None:
            # One reject for the break; its raw is the partial line that the break cut off.
            yield _reject(source, REJECT_TRUNCATED_STREAM, error, line)
            return
        yield parse_line(line.rstrip(b"\r"), source, clean)


def _iter_parquet(handle: IO[bytes], uri: str, clean: CleanConfig) -> Iterator[tuple[Kind, dict[str, Any]]]:
    try:
        parquet = pq.ParquetFile(handle)
    except Exception as err:  # any failure to parse the footer means an unreadable file
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
    row_index = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            texts = batch.column("text").to_pylist()
            metas = batch.column("meta").to_pylist() if "meta" in columns else [None] * len(texts)
            for text, meta in zip(texts, metas, strict=True):
                source = f"{uri}#{row_index}"
                if text is None:
                    yield _reject(source, REJECT_MISSING_TEXT, "'text' is null", "")
                else:
                    yield clean_text(text, meta, source, text, clean)
                row_index += 1
    except Exception as err:  # a corrupt row group: keep what came before it
        yield _reject(f"{uri}#{row_index}", REJECT_TRUNCATED_STREAM, f"{type(err).__name__}: {err}", "")


def iter_shard(uri: str, options: StorageOptions | None, clean: CleanConfig) -> Iterator[tuple[Kind, dict[str, Any]]]:
    """Stream one shard as ``(kind, row)`` pairs, in file order.

    ``kind`` is ``"doc"`` with a row holding the ``DOC_SCHEMA`` keys, or ``"reject"`` with a row holding
    the ``REJECT_SCHEMA`` keys. ``source`` is ``f"{uri}#{n}"``: n is the 1-based line number for JSONL
    (blank lines count) and the 0-based row index for Parquet; a reject for the whole file has the bare
    URI. A shard that cannot be opened yields one ``unreadable`` reject instead of raising; an I/O error
    partway through a read (a dropped connection after s3fs's own retries) raises, so that Ray retries
    the task rather than recording a transient failure as bad data.
    """
    compression = shard_format(uri)
    try:
        handle = storage.open_read(uri, options)
    except Exception as err:  # missing, forbidden, unreachable: the run goes on without the shard
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
