"""core.reader: every line of a shard ends up as a document or as a counted reject."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
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
