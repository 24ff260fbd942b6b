"""core.reader: every line of a shard ends up as a document or as a counted reject."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import time
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from core import reader, storage
from core.errors import ConfigError
from core.reader import CleanConfig, count_rejects, iter_shard, read_corpus, read_shard

GOOD_TEXTS = ["The first document.", "Second: über naïve café ☕", "  padded text  ", "x" * 40]

# (raw line, expected reject reason) for every kind of bad line a RedPajama shard can hold.
BAD_LINES: list[tuple[bytes, str]] = [
    (b"this is not json", reader.REJECT_BAD_JSON),
    (b'{"text": "unterminated', reader.REJECT_BAD_JSON),
    (b"[1, 2, 3]", reader.REJECT_BAD_JSON),
    (b'{"meta": {"source": "x"}}', reader.REJECT_MISSING_TEXT),
    (b'{"text": null}', reader.REJECT_MISSING_TEXT),
    (b'{"text": 42}', reader.REJECT_MISSING_TEXT),
    (b'{"text": "caf\xe9 latin-1"}', reader.REJECT_NON_UTF8),
    (b'{"text": "lone \\ud800 surrogate"}', reader.REJECT_NON_UTF8),
    (b'{"text": ""}', reader.REJECT_EMPTY),
    (b'{"text": " \\n\\t "}', reader.REJECT_EMPTY),
    (b"", reader.REJECT_EMPTY),  # a blank line
    (b"   ", reader.REJECT_EMPTY),
]


def good_line(text: str, **meta: object) -> bytes:
    return json.dumps({"text": text, "meta": meta}).encode("utf-8")


def mixed_lines() -> list[bytes]:
    """Good and bad lines interleaved; the good ones carry their index in meta."""
    lines = []
    for index, text in enumerate(GOOD_TEXTS):
        lines.append(good_line(text, index=index, lang="en"))
        lines.append(BAD_LINES[index * 3][0])
        lines.append(BAD_LINES[index * 3 + 1][0])
        lines.append(BAD_LINES[index * 3 + 2][0])
    return lines


def expected_bad_counts() -> dict[str, int]:
    return dict(Counter(reason for _, reason in BAD_LINES))


def sha_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def split(results: list[tuple[str, dict]]) -> tuple[list[dict], list[dict]]:
    docs = [row for kind, row in results if kind == reader.DOC]
    rejects = [row for kind, row in results if kind == reader.REJECT]
    assert len(docs) + len(rejects) == len(results)
    return docs, rejects


def reason_counts(rejects: list[dict]) -> dict[str, int]:
    return dict(Counter(row["reason"] for row in rejects))


def write_shard(path: Path, lines: list[bytes], trailing_newline: bool = True) -> str:
    data = b"\n".join(lines) + (b"\n" if trailing_newline else b"")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("name", ["shard.jsonl", "shard.jsonl.gz", "shard.jsonl.zst"])
def test_jsonl_every_line_is_a_doc_or_a_counted_reject(tmp_path, name):
    lines = mixed_lines()
    uri = write_shard(tmp_path / name, lines)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))

    assert [doc["text"] for doc in docs] == [text.strip() for text in GOOD_TEXTS]
    assert [doc["id"] for doc in docs] == [sha_id(text.strip()) for text in GOOD_TEXTS]
    assert [doc["source"] for doc in docs] == [f"{uri}#{1 + 4 * index}" for index in range(len(GOOD_TEXTS))]
    assert docs[1]["meta"] == '{"index": 1, "lang": "en"}'
    assert not any(doc["truncated"] for doc in docs)
    assert set(docs[0]) == set(reader.DOC_SCHEMA.names)

    assert reason_counts(rejects) == expected_bad_counts()
    assert len(docs) + len(rejects) == len(lines)
    for row in rejects:
        assert set(row) == set(reader.REJECT_SCHEMA.names) and row["detail"]
    by_line = {int(row["source"].rsplit("#", 1)[1]): row for row in rejects}
    assert by_line[2]["raw"] == "this is not json" and "Expecting value" in by_line[2]["detail"]
    assert by_line[10]["raw"] == '{"text": "caf\ufffd latin-1"}'  # decoded with errors="replace"


def test_min_chars_and_missing_meta(tmp_path):
    uri = write_shard(tmp_path / "s.jsonl", [b'{"text": "abc"}', b'{"text": "abcde"}', b'{"text": " "}'])
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(min_chars=5))))
    assert [(doc["text"], doc["meta"]) for doc in docs] == [("abcde", "{}")]
    assert [row["reason"] for row in rejects] == [reader.REJECT_TOO_SHORT, reader.REJECT_EMPTY]


def test_last_line_without_newline_and_crlf(tmp_path):
    uri = write_shard(tmp_path / "s.jsonl", [good_line("one") + b"\r", good_line("two")], trailing_newline=False)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == ["one", "two"] and rejects == []


def test_too_long_truncate_versus_reject(tmp_path):
    long_text = "0123456789" * 5
    uri = write_shard(tmp_path / "s.jsonl", [good_line(long_text), good_line("short")])

    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_chars=20))))
    assert rejects == []
    assert [(doc["text"], doc["truncated"]) for doc in docs] == [(long_text[:20], True), ("short", False)]
    assert docs[0]["id"] == sha_id(long_text)  # the id hashes the text before truncation

    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_chars=20, too_long="reject"))))
    assert [doc["text"] for doc in docs] == ["short"]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TOO_LONG, f"{uri}#1")]
    assert "50 chars > max_chars=20" in rejects[0]["detail"]


def test_raw_is_cut_to_2000_chars(tmp_path):
    uri = write_shard(tmp_path / "s.jsonl", [b"x" * 5000])
    [(kind, row)] = list(iter_shard(uri, None, CleanConfig()))
    assert kind == reader.REJECT and row["reason"] == reader.REJECT_BAD_JSON and len(row["raw"]) == 2000


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_chars": -1}, "min_chars"),
        ({"min_chars": 10, "max_chars": 10}, "max_chars"),
        ({"too_long": "drop"}, "too_long"),
    ],
)
def test_clean_config_validates(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        CleanConfig(**kwargs)
    assert caught.value.field == field


def corpus_lines(count: int, seed: int = 0) -> list[bytes]:
    """Many distinct documents of random words: big enough for several compressed blocks."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    return [good_line(f"doc {index}: " + " ".join(rng.choices(words, k=25)), n=index) for index in range(count)]


def expected_from_prefix(prefix: bytes) -> tuple[list[str], str]:
    """The texts of the complete lines in a decompressed prefix, and its trailing partial line."""
    *complete, partial = prefix.split(b"\n")
    return [json.loads(line)["text"] for line in complete], partial.decode("utf-8", errors="replace")


def check_truncated(uri: str, prefix: bytes, total_lines: int) -> None:
    expected_texts, partial = expected_from_prefix(prefix)
    assert 0 < len(expected_texts) < total_lines
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    # Every line that can be decompressed comes through, in order; the break is one reject.
    assert [doc["text"] for doc in docs] == expected_texts
    assert reason_counts(rejects) == {reader.REJECT_TRUNCATED_STREAM: 1}
    [reject] = rejects
    assert reject["source"] == f"{uri}#{len(expected_texts) + 1}"
    assert reject["raw"] == partial[:2000]
    assert "truncated" in reject["detail"]


def test_truncated_gzip_keeps_every_complete_line(tmp_path):
    lines = corpus_lines(3000)
    data = gzip.compress(b"\n".join(lines) + b"\n")
    half = data[: len(data) // 2]
    (tmp_path / "cut.jsonl.gz").write_bytes(half)
    check_truncated(str(tmp_path / "cut.jsonl.gz"), zlib.decompressobj(wbits=31).decompress(half), len(lines))


def test_truncated_zstd_keeps_every_complete_line(tmp_path):
    lines = corpus_lines(3000)
    data = zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
    half = data[: len(data) // 2]
    (tmp_path / "cut.jsonl.zst").write_bytes(half)
    prefix = zstandard.ZstdDecompressor().decompressobj().decompress(half)
    check_truncated(str(tmp_path / "cut.jsonl.zst"), prefix, len(lines))


def test_zstd_cut_inside_the_first_block_is_a_reject_not_silence(tmp_path):
    data = zstandard.ZstdCompressor().compress(b"\n".join(corpus_lines(10)) + b"\n")
    (tmp_path / "tiny.jsonl.zst").write_bytes(data[:-5])
    docs, rejects = split(list(iter_shard(str(tmp_path / "tiny.jsonl.zst"), None, CleanConfig())))
    assert docs == [] and reason_counts(rejects) == {reader.REJECT_TRUNCATED_STREAM: 1}


def test_corrupt_gzip_member_is_one_reject(tmp_path):
    lines = corpus_lines(3000)
    data = bytearray(gzip.compress(b"\n".join(lines) + b"\n"))
    data[-6] ^= 0xFF  # inside the CRC-32 trailer: all text decodes, the check fails at the end
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(data))
    docs, rejects = split(list(iter_shard(str(tmp_path / "bad.jsonl.gz"), None, CleanConfig())))
    assert reason_counts(rejects) == {reader.REJECT_TRUNCATED_STREAM: 1}
    assert "corrupt gzip" in rejects[0]["detail"]
    # Only the output of the last decompressor call is lost, and what comes through is in order.
    expected = [json.loads(line)["text"] for line in lines]
    assert 2500 <= len(docs) < len(lines)
    assert [doc["text"] for doc in docs] == expected[: len(docs)]


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    first, second = corpus_lines(20, seed=1), corpus_lines(30, seed=2)
    part1, part2 = b"\n".join(first) + b"\n", b"\n".join(second) + b"\n"
    (tmp_path / "m.jsonl.gz").write_bytes(gzip.compress(part1) + gzip.compress(part2) + b"\x00" * 8)
    compressor = zstandard.ZstdCompressor()
    (tmp_path / "m.jsonl.zst").write_bytes(compressor.compress(part1) + compressor.compress(part2))
    expected = [json.loads(line)["text"] for line in first + second]
    for name in ("m.jsonl.gz", "m.jsonl.zst"):
        docs, rejects = split(list(iter_shard(str(tmp_path / name), None, CleanConfig())))
        assert [doc["text"] for doc in docs] == expected and rejects == []


def write_parquet_shard(path: Path, meta_type: str = "struct") -> str:
    texts = ["parquet one", None, "", "parquet two", "  parquet one  "]
    metas = [{"url": f"u{index}", "rank": index} for index in range(len(texts))]
    columns: dict[str, object] = {"text": pa.array(texts, pa.string()), "other": list(range(len(texts)))}
    if meta_type == "struct":
        columns["meta"] = pa.array(metas)
    elif meta_type == "string":
        columns["meta"] = [json.dumps(meta) for meta in metas[:-1]] + ["free text"]
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("meta_type", ["struct", "string", "none"])
def test_parquet_shard(tmp_path, meta_type):
    uri = write_parquet_shard(tmp_path / "s.parquet", meta_type)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [(doc["text"], doc["source"]) for doc in docs] == [
        ("parquet one", f"{uri}#0"),
        ("parquet two", f"{uri}#3"),
        ("parquet one", f"{uri}#4"),
    ]
    assert docs[0]["id"] == docs[2]["id"] == sha_id("parquet one")
    assert [(row["reason"], row["source"]) for row in rejects] == [
        (reader.REJECT_MISSING_TEXT, f"{uri}#1"),
        (reader.REJECT_EMPTY, f"{uri}#2"),
    ]
    expected_meta = {
        "struct": ['{"rank": 0, "url": "u0"}', '{"rank": 3, "url": "u3"}', '{"rank": 4, "url": "u4"}'],
        "string": ['{"rank": 0, "url": "u0"}', '{"rank": 3, "url": "u3"}', '"free text"'],
        "none": ["{}", "{}", "{}"],
    }[meta_type]
    assert [doc["meta"] for doc in docs] == expected_meta


def test_unreadable_shards_are_rejects(tmp_path):
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "notext.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet")
    cases = {
        "notext.parquet": reader.REJECT_MISSING_TEXT_COLUMN,
        "garbage.parquet": reader.REJECT_UNREADABLE,
        "missing.jsonl": reader.REJECT_UNREADABLE,
    }
    for name, reason in cases.items():
        uri = str(tmp_path / name)
        [(kind, row)] = list(iter_shard(uri, None, CleanConfig()))
        assert (kind, row["reason"], row["source"]) == (reader.REJECT, reason, uri)
    [(_, row)] = list(iter_shard(str(tmp_path / "notext.parquet"), None, CleanConfig()))
    assert "content" in row["detail"]


def test_duplicate_texts_share_an_id_across_shards(tmp_path):
    jsonl = write_shard(tmp_path / "a.jsonl.gz", [good_line("parquet one"), good_line("unique")])
    parquet = write_parquet_shard(tmp_path / "b.parquet")
    ids: dict[str, set[str]] = {}
    for uri in (jsonl, parquet):
        for kind, row in iter_shard(uri, None, CleanConfig()):
            if kind == reader.DOC:
                ids.setdefault(row["text"], set()).add(row["id"])
    assert ids["parquet one"] == {sha_id("parquet one")}
    assert len({next(iter(value)) for value in ids.values()}) == len(ids) == 3


def test_read_shard_batches_and_always_writes_rejects(tmp_path):
    lines = [good_line(f"document number {index}") for index in range(7)] + [b"oops"]
    uri = write_shard(tmp_path / "s.jsonl", lines)
    rejects_dir = str(tmp_path / "rejects")
    tables = list(read_shard(uri, None, CleanConfig(), rejects_dir, rows_per_batch=3))
    assert [table.num_rows for table in tables] == [3, 3, 1]
    assert all(table.schema.equals(reader.DOC_SCHEMA) for table in tables)
    written = storage.read_parquet(reader.rejects_uri(rejects_dir, uri))
    assert written.schema.equals(reader.REJECT_SCHEMA)
    assert written.to_pylist() == [
        {
            "source": f"{uri}#8",
            "reason": reader.REJECT_BAD_JSON,
            "detail": written["detail"][0].as_py(),
            "raw": "oops",
        }
    ]
    assert reader.rejects_uri(rejects_dir, uri).endswith(hashlib.sha1(uri.encode()).hexdigest()[:16] + ".parquet")

    clean_uri = write_shard(tmp_path / "clean.jsonl", lines[:2])
    assert sum(table.num_rows for table in read_shard(clean_uri, None, CleanConfig(), rejects_dir)) == 2
    assert storage.read_parquet(reader.rejects_uri(rejects_dir, clean_uri)).num_rows == 0
    assert count_rejects(rejects_dir) == {reader.REJECT_BAD_JSON: 1}
    assert count_rejects(str(tmp_path / "no-such-dir")) == {}


def build_corpus(base: str) -> tuple[list[str], set[tuple[str, str]], dict[str, int]]:
    """Three shards in three formats under ``base``: their URIs, the expected (id, text) set and rejects."""
    jsonl = b"\n".join(mixed_lines()) + b"\n"
    many = corpus_lines(40)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": ["from parquet", None, GOOD_TEXTS[0]]}), buffer)
    shards = {
        "a.jsonl": jsonl,
        "b.jsonl.gz": gzip.compress(b"\n".join(many) + b"\n"),
        "c.parquet": buffer.getvalue().to_pybytes(),
    }
    uris = []
    for name, data in shards.items():
        uris.append(storage.join(base, name))
        storage.write_bytes_atomic(uris[-1], data)
    texts = [text.strip() for text in GOOD_TEXTS] + [json.loads(line)["text"] for line in many]
    texts += ["from parquet", GOOD_TEXTS[0]]
    expected_docs = {(sha_id(text), text) for text in texts}
    rejects = expected_bad_counts()
    rejects[reader.REJECT_MISSING_TEXT] += 1
    return uris, expected_docs, rejects


def check_read_corpus(base: str, rejects_dir: str) -> None:
    uris, expected_docs, expected_rejects = build_corpus(base)
    dataset = read_corpus(uris, None, CleanConfig(), rejects_dir, rows_per_batch=16)
    rows = dataset.take_all()
    assert len(rows) == 4 + 40 + 2  # duplicates across shards are kept here; dedup is a later stage
    assert {(row["id"], row["text"]) for row in rows} == expected_docs
    assert {row["source"].rsplit("#", 1)[0] for row in rows} == set(uris)
    assert count_rejects(rejects_dir) == expected_rejects
    files = sorted(info.uri for info in storage.expand(rejects_dir))
    assert files == sorted(reader.rejects_uri(rejects_dir, uri) for uri in uris)

    # A rerun (as after a retried task) overwrites the same files: counts do not double.
    assert dataset.count() == len(rows)
    assert count_rejects(rejects_dir) == expected_rejects
    assert len(storage.expand(rejects_dir)) == 3


@pytest.mark.timeout(180)
def test_read_corpus_local(ray_local, tmp_path):
    check_read_corpus(str(tmp_path / "corpus"), str(tmp_path / "out" / "rejects"))


@pytest.mark.timeout(180)
def test_read_corpus_s3(ray_local, s3_bucket):
    check_read_corpus(f"s3://{s3_bucket}/corpus", f"s3://{s3_bucket}/out/rejects")


def test_read_corpus_rejects_empty_input(tmp_path):
    with pytest.raises(ConfigError) as caught:
        read_corpus([], None, CleanConfig(), str(tmp_path))
    assert caught.value.field == "uris"


# Memory bounds: over-long lines and decompression bombs ----------------------------------------------

BOMB_SCRIPT = """
import json, sys
from core.reader import CleanConfig, iter_shard

def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))

before = peak_kib()
results = [(kind, row["reason"] if kind == "reject" else row["text"], row.get("detail", ""))
           for kind, row in iter_shard(sys.argv[1], None, CleanConfig())]
print(json.dumps({"before_kib": before, "after_kib": peak_kib(), "results": results}))
"""


def bomb_shard(path: Path, bomb_bytes: int) -> str:
    """One good line, one line of ``bomb_bytes`` bytes (a few hundred KB compressed), one good line."""
    bomb = b'{"text": "' + b"a" * (bomb_bytes - 12) + b'"}'
    return write_shard(path, [good_line("before the bomb"), bomb, good_line("after the bomb")])


def test_overlong_line_is_rejected_with_its_size_and_reading_goes_on(tmp_path):
    size = reader.CleanConfig().max_line_bytes + 5_000_000
    uri = bomb_shard(tmp_path / "s.jsonl.gz", size)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == ["before the bomb", "after the bomb"]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TOO_LONG, f"{uri}#2")]
    assert f"line of {size} bytes > max_line_bytes" in rejects[0]["detail"]
    assert rejects[0]["raw"] == ('{"text": "' + "a" * 5000)[: reader.RAW_MAX_CHARS]

    # A small cap, on every format; the line after the long one is read, also within the same chunk.
    lines = [good_line("one"), good_line("x" * 500), good_line("three"), good_line("y" * 300)]
    for name in ("c.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        uri = write_shard(tmp_path / name, lines, trailing_newline=False)
        docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_line_bytes=200))))
        assert [doc["text"] for doc in docs] == ["one", "three"]
        assert [(row["reason"], row["source"]) for row in rejects] == [
            (reader.REJECT_TOO_LONG, f"{uri}#2"),
            (reader.REJECT_TOO_LONG, f"{uri}#4"),
        ]
        assert [row["detail"].split(" >")[0] for row in rejects] == [
            f"line of {len(lines[1])} bytes",
            f"line of {len(lines[3])} bytes",
        ]


@pytest.mark.parametrize("name", ["bomb.jsonl.gz", "bomb.jsonl.zst"])
def test_decompression_bomb_keeps_peak_memory_bounded(tmp_path, name):
    import subprocess
    import sys

    bomb_bytes = 128 << 20
    uri = bomb_shard(tmp_path / name, bomb_bytes)
    assert Path(uri).stat().st_size < 400_000  # a small file that expands to 128 MiB in one line
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, uri], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [tuple(item[:2]) for item in result["results"]] == [
        ("doc", "before the bomb"),
        ("reject", reader.REJECT_TOO_LONG),
        ("doc", "after the bomb"),
    ]
    assert f"line of {bomb_bytes} bytes" in result["results"][1][2]
    grown_mib = (result["after_kib"] - result["before_kib"]) / 1024
    # max_line_bytes (16 MiB) of buffer plus a decompressed chunk; unbounded, a line costs a few times its size.
    assert grown_mib < 96, f"peak memory grew by {grown_mib:.0f} MiB reading a {bomb_bytes >> 20} MiB line"


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.jsonl.zst"])
def test_decompressed_bytes_per_shard_are_bounded(tmp_path, name):
    lines = corpus_lines(200)
    uri = write_shard(tmp_path / name, lines)
    limit = sum(len(line) + 1 for line in lines[:50]) + 10  # stops 10 bytes into line 51
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_shard_bytes=limit))))
    assert [doc["text"] for doc in docs] == [json.loads(line)["text"] for line in lines[:50]]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_SHARD_TOO_LARGE, f"{uri}#51")]
    assert f"max_shard_bytes={limit}" in rejects[0]["detail"]
    assert rejects[0]["raw"] == lines[50][:10].decode()


def test_parquet_shard_over_max_shard_bytes_stops_at_a_row_group(tmp_path):
    texts = [f"parquet row {index} " + "z" * 100 for index in range(300)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=100)
    uri = str(tmp_path / "big.parquet")
    metadata = pq.ParquetFile(uri).metadata
    first = metadata.row_group(0).column(0).total_uncompressed_size
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_shard_bytes=first + 10))))
    assert [doc["text"] for doc in docs] == texts[:100]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_SHARD_TOO_LARGE, f"{uri}#100")]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_line_bytes": 0}, "max_line_bytes"),
        ({"max_shard_bytes": 0}, "max_shard_bytes"),
        ({"read_attempts": 0}, "read_attempts"),
        ({"read_backoff_s": -1.0}, "read_backoff_s"),
    ],
)
def test_clean_config_validates_read_limits(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        CleanConfig(**kwargs)
    assert caught.value.field == field


# Transient storage errors ----------------------------------------------------------------------------


class FlakyStorage:
    """Wraps ``storage.open_read``: the first ``open_failures`` opens and ``read_failures`` reads raise."""

    def __init__(self, monkeypatch, open_failures: int = 0, read_failures: int = 0, error: type = ConnectionError):
        self.open_failures, self.read_failures, self.error = open_failures, read_failures, error
        self.opens = self.reads = 0
        self.real_open = storage.open_read
        monkeypatch.setattr(storage, "open_read", self.open_read)
        self.sleeps: list[float] = []
        monkeypatch.setattr(time, "sleep", self.sleeps.append)  # no real waits; the delays are recorded

    def open_read(self, uri, options=None):
        self.opens += 1
        if self.opens <= self.open_failures:
            raise self.error(f"blip opening {uri} (call {self.opens})")
        return FlakyHandle(self, self.real_open(uri, options))


class FlakyHandle:
    def __init__(self, flaky: FlakyStorage, handle):
        self.flaky, self.handle = flaky, handle

    def read(self, size=-1):
        self.flaky.reads += 1
        # The second read of the shard fails: mid-stream, after some bytes have come through.
        if 2 <= self.flaky.reads < 2 + self.flaky.read_failures:
            raise self.flaky.error(f"blip reading (call {self.flaky.reads})")
        return self.handle.read(size)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def small_reads(monkeypatch):
    """Read 4 KiB at a time, so that a shard takes many reads and a failure can land mid-stream."""
    monkeypatch.setattr(reader, "_READ_CHUNK_BYTES", 4096)


def flaky_corpus(base: str) -> dict[str, list[str]]:
    """A gzip JSONL shard and a Parquet shard under ``base``: uri -> expected texts."""
    lines = corpus_lines(600)
    texts = [json.loads(line)["text"] for line in lines]
    gz_uri, pq_uri = storage.join(base, "f.jsonl.gz"), storage.join(base, "f.parquet")
    storage.write_bytes_atomic(gz_uri, gzip.compress(b"\n".join(lines) + b"\n"))
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), buffer, row_group_size=100)
    storage.write_bytes_atomic(pq_uri, buffer.getvalue().to_pybytes())
    return {gz_uri: texts, pq_uri: texts}


def check_blips_are_retried(monkeypatch, base: str) -> None:
    small_reads(monkeypatch)
    for uri, texts in flaky_corpus(base).items():
        flaky = FlakyStorage(monkeypatch, open_failures=2, read_failures=2)
        docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
        assert rejects == [] and [doc["text"] for doc in docs] == texts, uri
        assert flaky.opens == 5  # two failed opens, the open that worked, two reopens after failed reads
        assert len(flaky.sleeps) == 4 and flaky.sleeps[1] > flaky.sleeps[0]  # backoff grows


def test_transient_errors_are_retried_local(monkeypatch, tmp_path):
    check_blips_are_retried(monkeypatch, str(tmp_path))


def test_transient_errors_are_retried_s3(monkeypatch, s3_bucket):
    check_blips_are_retried(monkeypatch, f"s3://{s3_bucket}/flaky")


@pytest.mark.parametrize("where", ["open", "read"])
def test_persistent_transient_errors_fail_the_shard_not_its_rows(monkeypatch, tmp_path, where):
    small_reads(monkeypatch)
    for uri in flaky_corpus(str(tmp_path)):
        failures = {"open_failures": 100} if where == "open" else {"read_failures": 100}
        flaky = FlakyStorage(monkeypatch, error=TimeoutError, **failures)
        rejects_dir = str(tmp_path / "rejects")
        with pytest.raises(reader.ShardReadError) as caught:
            for _ in read_shard(uri, None, CleanConfig(read_attempts=3), rejects_dir):
                pass
        assert uri in str(caught.value) and "3 attempts" in str(caught.value)
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert len(flaky.sleeps) == 2  # bounded: three attempts, two waits
        # No rejects file: the shard is not recorded as read, so a rerun reads it again.
        assert not storage.exists(reader.rejects_uri(rejects_dir, uri))


def test_botocore_connection_errors_count_as_transient(monkeypatch, tmp_path):
    from botocore.exceptions import EndpointConnectionError

    def endpoint_error(message: str) -> Exception:
        return EndpointConnectionError(endpoint_url=message)

    uri = write_shard(tmp_path / "s.jsonl", [good_line("one"), good_line("two")])
    flaky = FlakyStorage(monkeypatch, open_failures=1, error=endpoint_error)  # type: ignore[arg-type]
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == ["one", "two"] and rejects == [] and flaky.opens == 2


def test_shard_that_changes_between_retries_fails(monkeypatch, tmp_path):
    small_reads(monkeypatch)
    lines = corpus_lines(600)
    uri = write_shard(tmp_path / "s.jsonl", lines)
    flaky = FlakyStorage(monkeypatch, read_failures=1)
    real_read = FlakyHandle.read

    def read_then_replace(self, size=-1):
        if flaky.reads == 1:  # the next read fails; the file is rewritten before the reopen
            Path(uri).write_bytes(b"\n".join(lines[:10]) + b"\n")
        return real_read(self, size)

    monkeypatch.setattr(FlakyHandle, "read", read_then_replace)
    with pytest.raises(reader.ShardReadError, match="changed"):
        list(iter_shard(uri, None, CleanConfig()))


# Rows that used to be lost or mislabelled ------------------------------------------------------------


def test_parquet_invalid_utf8_value_rejects_only_its_row(tmp_path):
    values = [f"row {index}".encode() for index in range(3000)]
    values[1500] = b"bad \xff value"
    metas = [f'{{"n": {index}}}'.encode() for index in range(3000)]
    metas[2500] = b'{"n": "\xfe"}'
    as_string = {
        name: pa.Array.from_buffers(pa.string(), 3000, pa.array(column, pa.binary()).buffers())
        for name, column in (("text", values), ("meta", metas))
    }
    pq.write_table(pa.table(as_string), tmp_path / "s.parquet")
    uri = str(tmp_path / "s.parquet")
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [(row["reason"], row["source"]) for row in rejects] == [
        (reader.REJECT_NON_UTF8, f"{uri}#1500"),
        (reader.REJECT_NON_UTF8, f"{uri}#2500"),
    ]
    assert rejects[0]["raw"] == "bad \ufffd value" and "'text'" in rejects[0]["detail"]
    assert "'meta'" in rejects[1]["detail"]
    expected = [f"row {index}" for index in range(3000) if index not in (1500, 2500)]
    assert [doc["text"] for doc in docs] == expected
    assert docs[0]["meta"] == '{"n": 0}'


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz", "s.jsonl.zst"])
def test_leading_bom_is_dropped(tmp_path, name):
    uri = write_shard(tmp_path / name, [b"\xef\xbb\xbf" + good_line("first"), good_line("second")])
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == ["first", "second"] and rejects == []


@pytest.mark.parametrize("name", ["empty.jsonl.gz", "empty.jsonl.zst"])
def test_zero_byte_compressed_shard_is_a_reject(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    uri = str(tmp_path / name)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert docs == []
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TRUNCATED_STREAM, uri)]
    assert "0 bytes" in rejects[0]["detail"]
    rejects_dir = str(tmp_path / "rejects")
    assert list(read_shard(uri, None, CleanConfig(), rejects_dir)) == []
    assert count_rejects(rejects_dir) == {reader.REJECT_TRUNCATED_STREAM: 1}


CANARY_KEY, CANARY_SECRET = "AKIAFINESCOPECANARY7", "finescope-canary-secret-3f9c1d7e5b"


def record_shipped(monkeypatch) -> list[bytes]:
    """Every payload Ray serialises on this driver from now on: task and actor arguments, remote functions,
    Ray Data's map functions with their fn_kwargs, ray.put objects (all go through ray.cloudpickle.dumps)."""
    import ray.cloudpickle

    shipped: list[bytes] = []
    dumps = ray.cloudpickle.dumps

    def recording_dumps(obj, *args, **kwargs):
        data = dumps(obj, *args, **kwargs)
        shipped.append(bytes(data))
        return data

    monkeypatch.setattr(ray.cloudpickle, "dumps", recording_dumps)
    return shipped


@pytest.mark.timeout(180)
def test_s3_credentials_never_travel_as_task_arguments(ray_local, s3_bucket, monkeypatch, caplog):
    """A corpus read on moto's S3 with distinctive credentials in the driver's environment: nothing Ray ships
    to a task, no log line and no object written holds them; the workers sign with their own environment."""
    import ray

    base, rejects_dir = f"s3://{s3_bucket}/corpus", f"s3://{s3_bucket}/out/rejects"
    uris, expected_docs, expected_rejects = build_corpus(base)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY)  # moto's server accepts any key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)
    needles = [CANARY_KEY.encode(), CANARY_SECRET.encode()]
    shipped = record_shipped(monkeypatch)
    caplog.set_level("DEBUG")
    rows = read_corpus(uris, None, CleanConfig(), rejects_dir, rows_per_batch=16).take_all()
    assert {(row["id"], row["text"]) for row in rows} == expected_docs  # the run really read S3
    assert count_rejects(rejects_dir) == expected_rejects  # and wrote it
    assert shipped, "nothing was recorded: Ray no longer serialises through ray.cloudpickle.dumps"
    leaked = [blob[:160] for blob in shipped if any(needle in blob for needle in needles)]
    assert leaked == [], f"{len(leaked)} of {len(shipped)} shipped payloads hold the credentials"
    messages = [record.getMessage() for record in caplog.records]
    assert not [message for message in messages if CANARY_SECRET in message or CANARY_KEY in message]
    fs, _ = storage.filesystem(base)
    assert [path for path in fs.find(s3_bucket) if any(needle in fs.cat_file(path) for needle in needles)] == []
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert [p for p in logs.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)] == []


# Deeply nested JSON ------------------------------------------------------------------------------------


def nested_line(depth: int, text: str) -> bytes:
    """A JSONL line whose ``meta`` nests ``depth - 1`` objects, so that the line nests ``depth`` levels."""
    meta = b'{"a": ' * (depth - 1) + b"1" + b"}" * (depth - 1)
    return b'{"text": "' + text.encode() + b'", "meta": ' + meta + b"}"


def at_stack_depth(frames: int, function, *args):
    """``function(*args)`` called ``frames`` Python frames deeper than here, as in a worker's deep stack."""
    return function(*args) if frames == 0 else at_stack_depth(frames - 1, function, *args)


@pytest.mark.parametrize("frames", [0, 300, 800])
def test_each_deeply_nested_line_is_one_reject_whatever_the_stack(tmp_path, frames):
    deep = list(range(700, 1001))
    lines = [good_line("before")] + [nested_line(depth, f"deep {depth}") for depth in deep] + [good_line("after")]
    uri = write_shard(tmp_path / "deep.jsonl", lines)
    docs, rejects = split(at_stack_depth(frames, lambda: list(iter_shard(uri, None, CleanConfig()))))
    assert [doc["text"] for doc in docs] == ["before", "after"]
    assert reason_counts(rejects) == {reader.REJECT_TOO_DEEP: len(deep)}
    assert [row["source"] for row in rejects] == [f"{uri}#{line}" for line in range(2, 2 + len(deep))]
    assert f"MAX_JSON_DEPTH={reader.MAX_JSON_DEPTH}" in rejects[0]["detail"]


def test_nesting_up_to_the_limit_is_read(tmp_path):
    limit = reader.MAX_JSON_DEPTH
    brackets = "{[" * 200 + "]}" * 200  # inside a string: text, not nesting
    lines = [
        nested_line(limit, "at the limit"),
        nested_line(limit + 1, "one over"),
        good_line(brackets, note='quote \\" {['),
        json.dumps({"text": "array", "meta": [[[[1]]]]}).encode(),
    ]
    uri = write_shard(tmp_path / "s.jsonl", lines)
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == ["at the limit", brackets, "array"]
    assert json.loads(docs[0]["meta"]) == json.loads(lines[0])["meta"]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TOO_DEEP, f"{uri}#2")]
    assert f"more than MAX_JSON_DEPTH={limit} levels" in rejects[0]["detail"]


def test_parquet_deep_meta_string_rejects_only_its_row(tmp_path):
    deep_meta = json.loads(nested_line(reader.MAX_JSON_DEPTH + 1, "x"))["meta"]
    deep = json.dumps({"wrapper": deep_meta})
    metas = ['{"n": 0}', deep, "free text", '{"n": 3}']
    pq.write_table(pa.table({"text": ["zero", "one", "two", "three"], "meta": metas}), tmp_path / "s.parquet")
    uri = str(tmp_path / "s.parquet")
    docs, rejects = split(at_stack_depth(600, lambda: list(iter_shard(uri, None, CleanConfig()))))
    assert [doc["text"] for doc in docs] == ["zero", "two", "three"]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TOO_DEEP, f"{uri}#1")]
    assert "'meta'" in rejects[0]["detail"]


def nested_struct(depth: int) -> dict:
    value: object = 1
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[return-value]


def test_parquet_meta_column_nested_past_the_limit_is_unreadable(tmp_path, monkeypatch):
    # Past the limit, the file is one whole-file reject; pyarrow's reader itself refuses schemas this deep.
    deep = nested_struct(reader.MAX_JSON_DEPTH + 1)
    pq.write_table(pa.table({"text": ["one", "two"], "meta": pa.array([deep, deep])}), tmp_path / "deep.parquet")
    # Under a lower limit, the reader's own check of the column's type refuses a file pyarrow reads.
    monkeypatch.setattr(reader, "MAX_JSON_DEPTH", 3)
    shallow = nested_struct(4)
    pq.write_table(pa.table({"text": ["one", "two"], "meta": pa.array([shallow, shallow])}), tmp_path / "s.parquet")
    for name in ("deep.parquet", "s.parquet"):
        uri = str(tmp_path / name)
        [(kind, row)] = list(iter_shard(uri, None, CleanConfig()))
        assert (kind, row["reason"], row["source"]) == (reader.REJECT, reader.REJECT_UNREADABLE, uri)
    assert "the 'meta' column's type (4 levels) nests JSON more than MAX_JSON_DEPTH=3 levels" in row["detail"]


@pytest.mark.timeout(180)
def test_read_corpus_counts_deeply_nested_lines(ray_local, tmp_path):
    lines = [good_line("before")] + [nested_line(depth, "deep") for depth in range(700, 1001)] + [good_line("after")]
    uri = write_shard(tmp_path / "deep.jsonl.gz", lines)
    rejects_dir = str(tmp_path / "rejects")
    rows = read_corpus([uri], None, CleanConfig(), rejects_dir).take_all()
    assert sorted(row["text"] for row in rows) == ["after", "before"]
    assert count_rejects(rejects_dir) == {reader.REJECT_TOO_DEEP: 301}


# Parquet: rows over the cap, pages too large to decompress, decompression bombs ------------------------


def test_parquet_row_over_max_line_bytes_is_too_long_and_reading_goes_on(tmp_path):
    texts = ["short 0", "x" * 5000, "short 2", "y" * 900, "short 4"]
    pq.write_table(pa.table({"text": texts}), tmp_path / "s.parquet")
    uri = str(tmp_path / "s.parquet")
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_line_bytes=1000))))
    assert [doc["text"] for doc in docs] == ["short 0", "short 2", "y" * 900, "short 4"]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TOO_LONG, f"{uri}#1")]
    size = int(rejects[0]["detail"].split("row of ")[1].split(" bytes")[0])
    assert 5000 <= size < 5100 and "> max_line_bytes=1000" in rejects[0]["detail"]
    assert rejects[0]["raw"] == "x" * reader.RAW_MAX_CHARS


def test_parquet_row_group_with_a_page_over_max_page_bytes_is_rejected_row_by_row(tmp_path):
    texts = [f"row {index}" for index in range(12)]
    texts[5] = "z" * 100_000
    pq.write_table(pa.table({"text": texts}), tmp_path / "s.parquet", row_group_size=4, compression="zstd")
    uri = str(tmp_path / "s.parquet")
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig(max_page_bytes=50_000))))
    assert [doc["text"] for doc in docs] == [texts[index] for index in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert [(row["reason"], row["source"]) for row in rejects] == [
        (reader.REJECT_TOO_LONG, f"{uri}#{index}") for index in range(4, 8)
    ]
    assert "row group 1 holds a Parquet page of" in rejects[0]["detail"]
    assert "max_page_bytes=50000: its 4 rows are not decoded" in rejects[0]["detail"]


def test_parquet_corrupt_page_header_keeps_the_rows_before(tmp_path):
    texts = [f"row {index}" for index in range(8)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "s.parquet", row_group_size=4, use_dictionary=False)
    data = bytearray((tmp_path / "s.parquet").read_bytes())
    second = pq.ParquetFile(tmp_path / "s.parquet").metadata.row_group(1).column(0).data_page_offset
    data[second] = 0x0C  # the header's first field now claims to be a struct, of fields that do not parse
    data[second + 1 : second + 6] = b"\xff" * 5
    (tmp_path / "s.parquet").write_bytes(bytes(data))
    uri = str(tmp_path / "s.parquet")
    docs, rejects = split(list(iter_shard(uri, None, CleanConfig())))
    assert [doc["text"] for doc in docs] == texts[:4]
    assert [(row["reason"], row["source"]) for row in rejects] == [(reader.REJECT_TRUNCATED_STREAM, f"{uri}#4")]


def padded_varint(value: int, length: int) -> bytes:
    """``value`` as a Thrift varint of exactly ``length`` bytes (continuation bytes of zeros are valid)."""
    groups = [(value >> (7 * index)) & 0x7F for index in range(length)]
    return bytes(group | 0x80 for group in groups[:-1]) + bytes([groups[-1]])


def lie_about_sizes(path: Path, claimed: int = 1000) -> None:
    """Rewrite the footer so that every uncompressed size it gives (row group and column chunk) is ``claimed``."""
    metadata = pq.ParquetFile(path).metadata
    sizes = {metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)}
    sizes |= {metadata.row_group(g).column(0).total_uncompressed_size for g in range(metadata.num_row_groups)}
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for size in sizes:
        zigzag = size << 1
        encoded = padded_varint(zigzag, (zigzag.bit_length() + 6) // 7)
        at = data.find(encoded, footer_start)
        while at != -1:
            data[at : at + len(encoded)] = padded_varint(claimed << 1, len(encoded))
            at = data.find(encoded, at + 1)
    path.write_bytes(bytes(data))
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).total_uncompressed_size == claimed


def parquet_bomb(path: Path, kind: str) -> str:
    """A few KB on disk. ``dictionary``: 16 rows of one 32 MiB dictionary value (as a 1,465-byte file found in
    the wild); ``lying_footer``: 16 distinct 32 MiB values in one 512 MiB page behind a footer that claims
    1,000 bytes; ``many_rows``: 512 rows of one 2 MiB dictionary value, each under the cap (1 GiB decoded)."""
    size, rows = (2 << 20, 512) if kind == "many_rows" else (32 << 20, 16)
    if kind in ("dictionary", "many_rows"):
        text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["a" * size]))
        # Without the stored Arrow schema the column reads back as plain strings, as from any other writer.
        pq.write_table(pa.table({"text": text}), path, compression="zstd", store_schema=False)
    else:
        column = pa.array([f"{index:02d}" + "b" * (size - 2) for index in range(rows)])
        pq.write_table(pa.table({"text": column}), path, compression="zstd", use_dictionary=False)
        del column
        lie_about_sizes(path)
    assert path.stat().st_size < 100_000 and pq.ParquetFile(path).metadata.num_rows == rows
    return str(path)


@pytest.mark.parametrize("kind", ["dictionary", "lying_footer", "many_rows"])
def test_parquet_decompression_bomb_keeps_peak_memory_bounded(tmp_path, kind):
    import os
    import subprocess
    import sys

    uri = parquet_bomb(tmp_path / "bomb.parquet", kind)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, uri], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if kind == "many_rows":  # every row is a document, cut to max_chars
        assert [(kind, len(text)) for kind, text, _ in result["results"]] == [("doc", 20_000)] * 512
    else:
        assert [tuple(item[:2]) for item in result["results"]] == [("reject", reader.REJECT_TOO_LONG)] * 16
        expected = "row of 33554432 bytes" if kind == "dictionary" else "holds a Parquet page of 536870982 bytes"
        assert expected in result["results"][0][2]
    grown_mib = (result["after_kib"] - result["before_kib"]) / 1024
    # A few times the dictionary or max_page_bytes (pages, the decoded dictionary, a batch); unbounded, 1.6 GB
    # (dictionary) and 2 GB (many_rows, in batches of 1,024 rows).
    assert grown_mib < 320, f"peak memory grew by {grown_mib:.0f} MiB reading a {kind} Parquet bomb"


def test_ordinary_parquet_reads_in_full_batches(tmp_path):
    """The page-derived bounds leave an ordinary file's batches at full size (smaller ones cost throughput)."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    texts = [" ".join(rng.choices(words, k=rng.randint(50, 1200))) for _ in range(5000)]
    metas = [{"url": f"https://example.com/{index}", "lang": "en"} for index in range(5000)]
    pq.write_table(pa.table({"text": texts, "meta": metas}), tmp_path / "s.parquet")
    parquet = pq.ParquetFile(tmp_path / "s.parquet")
    with open(tmp_path / "s.parquet", "rb") as handle:
        shard = reader._ParquetShard(parquet, handle, str(tmp_path / "s.parquet"), ["text", "meta"])
        layout = shard.layout(0, CleanConfig().max_page_bytes)
    assert layout.chunks[0].dictionary_bytes > 64 << 10  # large enough that its longest value was looked up
    assert layout.batch_rows(CleanConfig().max_page_bytes) == 1024
