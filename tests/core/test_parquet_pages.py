"""core.parquet_pages: page headers read without decoding, and the batch bounds drawn from them."""

from __future__ import annotations

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import parquet_pages
from core.parquet_pages import PAGE_DICTIONARY, ChunkLayout, CorruptPageHeader, Page, chunk_pages


def written(table: pa.Table, **options: object) -> io.BytesIO:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    buffer.seek(0)
    return buffer


def all_chunks(buffer: io.BytesIO) -> list[tuple[object, list[Page]]]:
    metadata = pq.ParquetFile(buffer).metadata
    found = []
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            found.append((chunk, chunk_pages(buffer, start, chunk.total_compressed_size)))
    return found


def corpus_table(rows: int = 3000) -> pa.Table:
    rng = random.Random(0)
    texts = ["".join(rng.choices("abcdefghij ", k=rng.randint(10, 4000))) for _ in range(rows)]
    metas = [{"url": f"u{index}", "tags": ["a", "b"] * (index % 3), "n": index} for index in range(rows)]
    return pa.table({"text": texts, "meta": metas})


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"data_page_version": "2.0", "compression": "gzip", "row_group_size": 1000},
        {"use_dictionary": False, "compression": "none", "data_page_size": 1 << 16, "write_page_index": True},
        {"compression": "zstd", "data_page_version": "2.0", "use_dictionary": False, "write_statistics": True},
    ],
)
def test_pages_agree_with_the_file_metadata(options):
    for chunk, pages in all_chunks(written(corpus_table(), **options)):
        data = [page for page in pages if page.is_data]
        assert sum(page.values for page in data) == chunk.num_values
        assert sum(page.compressed_bytes for page in pages) < chunk.total_compressed_size
        assert sum(page.uncompressed_bytes for page in pages) < chunk.total_uncompressed_size
        assert [page.kind for page in pages if page.kind == PAGE_DICTIONARY] == (
            [PAGE_DICTIONARY] if chunk.has_dictionary_page else []
        )
        assert all(page.dictionary_encoded == ("DICTIONARY" in str(chunk.encodings)) for page in data[:1])


def test_large_statistics_are_skipped_unread():
    texts = ["x" * 100_000 + str(index) for index in range(20)]  # min/max statistics of 100 KB strings
    [(chunk, pages)] = all_chunks(written(pa.table({"text": texts}), use_dictionary=False))
    assert sum(page.values for page in pages) == 20 and pages[0].uncompressed_bytes > 2_000_000


def test_header_that_runs_past_its_chunk_or_file_is_corrupt():
    buffer = written(pa.table({"text": ["a", "b"]}), use_dictionary=False)
    [(chunk, _)] = all_chunks(buffer)
    with pytest.raises(CorruptPageHeader, match="runs past its column chunk"):
        chunk_pages(buffer, chunk.data_page_offset, chunk.total_compressed_size - 1)
    with pytest.raises(CorruptPageHeader, match="end of the file"):
        chunk_pages(io.BytesIO(b"\x15"), 0, 10)  # a field header, then nothing
    nested = b"\x1c" * 40  # struct field after struct field, never closed
    with pytest.raises(CorruptPageHeader, match="nests more than"):
        chunk_pages(io.BytesIO(nested), 0, len(nested))


def test_widest_window_matches_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        counts = [rng.randint(1, 6) for _ in range(rng.randint(1, 8))]
        sizes = [rng.randint(0, 100) for _ in counts]
        page_of_row = [page for page, count in enumerate(counts) for _ in range(count)]
        for rows in range(1, len(page_of_row) + 2):
            windows = [set(page_of_row[start : start + rows]) for start in range(len(page_of_row))]
            expected = max(sum(sizes[page] for page in window) for window in windows)
            assert parquet_pages._widest_window(counts, sizes, rows) == expected, (counts, sizes, rows)


def test_batch_bound_counts_dictionary_values_at_every_row():
    dictionary = Page(PAGE_DICTIONARY, 32 << 20, 10, 1)
    indices = Page(parquet_pages.PAGE_DATA, 9, 9, 16, encoding=8)  # 16 rows, all of the one 32 MiB value
    plain = Page(parquet_pages.PAGE_DATA, 1000, 1000, 10, encoding=0)
    chunk = ChunkLayout([dictionary, indices, plain], repeated=False, longest_dictionary_value=32 << 20)
    assert chunk.batch_bound(1) == (32 << 20) + 1000 + (32 << 20)
    assert chunk.batch_bound(4) == (32 << 20) + 1000 + 4 * (32 << 20)
    assert chunk.batch_bound(1024) == (32 << 20) + 1000 + 16 * (32 << 20)  # only 16 rows use the dictionary
    repeated = ChunkLayout([dictionary, indices, plain], repeated=True, longest_dictionary_value=100)
    assert repeated.batch_bound(1) == (32 << 20) + 1000 + 16 * 100
