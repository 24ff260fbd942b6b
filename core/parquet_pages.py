"""The page headers of a Parquet column chunk, read without decompressing a page.

pyarrow decompresses a Parquet page whole, into a buffer of the size the page's header declares (the codec
fails rather than write past it), and it offers no page-level API. Every value it then decodes is at most
the size of the page that holds it: a plain value lies in its page, a delta-encoded one is built from
bytes of its page, and a dictionary-encoded one is a value of the dictionary page, which it may repeat at
every row. So the headers, and not the file footer's totals, which a writer may set to anything, bound
what decoding a column chunk can produce. The reader reads them first and sizes its row batches from them
(``core/reader.py``; docs/curation.md, "What the reader guarantees").

The headers are Thrift structs in the compact protocol (https://github.com/apache/parquet-format,
``PageHeader``); only the fields that size a page are kept, everything else is skipped unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

PAGE_DATA, PAGE_INDEX, PAGE_DICTIONARY, PAGE_DATA_V2 = 0, 1, 2, 3
# Data page encodings whose values are indices into the dictionary page (PLAIN_DICTIONARY, RLE_DICTIONARY).
_DICTIONARY_ENCODINGS = (2, 8)

# Bytes read per look at a header; a header with large statistics takes a few looks.
_WINDOW_BYTES = 4096
# A page header larger than this is corrupt (pyarrow's own limit on a Thrift string is 100 MB; real headers
# are tens of bytes, a few KiB with statistics).
_MAX_HEADER_BYTES = 16 << 20
# Thrift structs nest a few levels in a page header; deeper is corrupt, and would recurse without end.
_MAX_NESTING = 16

# Compact-protocol type ids (Thrift's TCompactProtocol).
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)


class CorruptPageHeader(ValueError):
    """A page header that cannot be parsed, or pages that do not fit their column chunk."""


@dataclass(frozen=True)
class Page:
    """One page of a column chunk, as its header describes it."""

    kind: int
    """``PAGE_DATA``, ``PAGE_INDEX``, ``PAGE_DICTIONARY`` or ``PAGE_DATA_V2``."""

    uncompressed_bytes: int
    """The size it decompresses to: the buffer pyarrow allocates for it."""

    compressed_bytes: int
    """Its size in the file, after the header."""

    values: int | None
    """Values it holds (nulls included), where the header says."""

    encoding: int | None = None
    """How a data page's values are encoded (Parquet's ``Encoding``); None for other pages."""

    @property
    def is_data(self) -> bool:
        return self.kind in (PAGE_DATA, PAGE_DATA_V2)

    @property
    def dictionary_encoded(self) -> bool:
        """A data page of indices into the dictionary page: its values can decode to far more than it holds."""
        return self.is_data and self.encoding in _DICTIONARY_ENCODINGS


class _CompactReader:
    """Reads compact-protocol Thrift from a file, a small window at a time, from a byte offset."""

    def __init__(self, handle: IO[bytes], offset: int):
        self.handle, self.base, self.data, self.pos = handle, offset, b"", 0
        self.start = offset

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            if self.offset - self.start > _MAX_HEADER_BYTES:
                raise CorruptPageHeader(f"page header at byte {self.start} runs past {_MAX_HEADER_BYTES} bytes")
            self.handle.seek(self.offset)
            self.base, self.data, self.pos = self.offset, self.handle.read(_WINDOW_BYTES), 0
            if not self.data:
                raise CorruptPageHeader(f"page header at byte {self.start} runs past the end of the file")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def varint(self) -> int:
        result = 0
        for shift in range(0, 70, 7):
            value = self.byte()
            result |= (value & 0x7F) << shift
            if not value & 0x80:
                return result
        raise CorruptPageHeader(f"a varint of more than 10 bytes in the page header at byte {self.start}")

    def integer(self) -> int:
        """A zigzag-encoded i16, i32 or i64."""
        value = self.varint()
        return (value >> 1) ^ -(value & 1)

    def skip(self, kind: int, depth: int) -> None:
        """Skip one value of compact type ``kind``; ``depth`` counts the structs and containers around it."""
        if depth > _MAX_NESTING:
            raise CorruptPageHeader(f"the page header at byte {self.start} nests more than {_MAX_NESTING} levels")
        if kind in (_TRUE, _FALSE):
            return  # a struct field's boolean lives in its type id
        if kind == _BYTE:
            self.byte()
        elif kind in (_I16, _I32, _I64):
            self.varint()
        elif kind in (_DOUBLE, _BINARY):
            size = 8 if kind == _DOUBLE else self.varint()
            self.pos += size  # unread: the next byte() reads from past it
        elif kind in (_LIST, _SET, _MAP):
            self._skip_container(kind, depth)
        elif kind == _STRUCT:
            for _, field_kind in self.fields():
                self.skip(field_kind, depth + 1)
        else:
            raise CorruptPageHeader(f"unknown Thrift type {kind} in the page header at byte {self.start}")

    def _skip_container(self, kind: int, depth: int) -> None:
        if kind == _MAP:
            size = self.varint()
            kinds = self.byte() if size else 0
            element_kinds = [kinds >> 4, kinds & 0x0F]
        else:
            header = self.byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            element_kinds = [header & 0x0F]
        for _ in range(size):
            for element in element_kinds:
                if element in (_TRUE, _FALSE):
                    self.byte()  # inside a container a boolean takes a byte of its own
                else:
                    self.skip(element, depth + 1)

    def fields(self):
        """``(field id, type)`` for each field of the struct that starts here; the caller reads or skips each."""
        field_id = 0
        while header := self.byte():
            delta, kind = header >> 4, header & 0x0F
            field_id = field_id + delta if delta else self.integer()
            yield field_id, kind


# The field of the encoding in DataPageHeader (PageHeader field 5) and DataPageHeaderV2 (field 8).
_ENCODING_FIELD = {5: 2, 8: 4}


def _page_header(reader: _CompactReader) -> Page:
    sizes: dict[int, int] = {}
    values = encoding = None
    for field_id, kind in reader.fields():
        if field_id in (1, 2, 3) and kind == _I32:  # type, uncompressed_page_size, compressed_page_size
            sizes[field_id] = reader.integer()
        elif field_id in (5, 7, 8) and kind == _STRUCT:  # data, dictionary, data v2 page header
            for sub_id, sub_kind in reader.fields():
                if sub_id == 1 and sub_kind == _I32:  # num_values in all three
                    values = reader.integer()
                elif sub_id == _ENCODING_FIELD.get(field_id) and sub_kind == _I32:
                    encoding = reader.integer()
                else:
                    reader.skip(sub_kind, 2)
        else:
            reader.skip(kind, 1)
    if len(sizes) != 3 or sizes[2] < 0 or sizes[3] < 0 or (values is not None and values < 0):
        raise CorruptPageHeader(f"the page header at byte {reader.start} lacks its type or sizes: {sizes}")
    return Page(sizes[1], sizes[2], sizes[3], values, encoding)


def chunk_pages(handle: IO[bytes], start: int, length: int) -> list[Page]:
    """Every page of the column chunk stored in ``length`` bytes from byte ``start`` of ``handle``.

    ``start`` and ``length`` are what the file's metadata says of the chunk (its dictionary page offset, or
    data page offset, and ``total_compressed_size``): the range pyarrow reads and decodes. Raises
    :class:`CorruptPageHeader` for a header that does not parse or a page that runs past the chunk.
    """
    pages: list[Page] = []
    offset, end = start, start + length
    while offset < end:
        reader = _CompactReader(handle, offset)
        page = _page_header(reader)
        offset = reader.offset + page.compressed_bytes
        if offset > end:
            raise CorruptPageHeader(f"a page at byte {reader.start} runs past its column chunk's end at {end}")
        pages.append(page)
    return pages


@dataclass(frozen=True)
class ChunkLayout:
    """The pages of one column chunk, and what they allow its rows to decode to."""

    pages: list[Page]
    repeated: bool
    """A column under a list or map: a row may hold any number of its values."""
    longest_dictionary_value: int
    """Bytes of the dictionary's longest value; the dictionary page's size where that is not known."""

    @property
    def largest_page(self) -> int:
        return max((page.uncompressed_bytes for page in self.pages), default=0)

    @property
    def stored_bytes(self) -> int:
        return sum(page.uncompressed_bytes for page in self.pages)

    @property
    def dictionary_bytes(self) -> int:
        return sum(page.uncompressed_bytes for page in self.pages if page.kind == PAGE_DICTIONARY)

    def batch_bound(self, rows: int) -> int:
        """The most bytes any ``rows`` consecutive rows of this chunk can decode to, its dictionary included.

        A plain page decodes to at most its own size, so the rows count the plain pages they can touch; a
        dictionary-encoded row decodes to at most the longest dictionary value, however small its page.
        """
        data = [page for page in self.pages if page.is_data]
        sizes = [0 if page.dictionary_encoded else page.uncompressed_bytes for page in data]
        expanded = sum(page.values or 0 for page in data if page.dictionary_encoded)
        if self.repeated:  # values per row are unbounded: every value of the chunk may be in one row
            return self.dictionary_bytes + sum(sizes) + expanded * self.longest_dictionary_value
        counts = [page.values or 0 for page in data]
        plain = _widest_window(counts, sizes, rows)
        return self.dictionary_bytes + plain + min(rows, expanded) * self.longest_dictionary_value


def _widest_window(counts: list[int], sizes: list[int], rows: int) -> int:
    """The largest total of ``sizes`` over the pages that any ``rows`` consecutive rows touch.

    A window that starts at the last row of a page reaches furthest, so only those are tried; the window's
    end only moves forward as its start does.
    """
    best = total = covered = 0  # total: sizes of pages start..end; covered: rows of pages start+1..end
    end = -1
    for start in range(len(counts)):
        if end < start:
            end, total, covered = start, sizes[start], 0
        while covered < rows - 1 and end + 1 < len(counts):
            end += 1
            covered += counts[end]
            total += sizes[end]
        best = max(best, total)
        total -= sizes[start]
        if end > start:
            covered -= counts[start + 1]
    return best
