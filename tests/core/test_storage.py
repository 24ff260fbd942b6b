"""core.storage on local disk and on a real S3-compatible server (moto)."""

from __future__ import annotations

import gzip
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import storage
from core.errors import ConfigError
from core.storage import StorageOptions


def _table() -> pa.Table:
    return pa.table({"id": ["a", "b", "c"], "score": [0.5, 0.25, 1.0]})


def test_join_keeps_scheme_and_single_slashes():
    assert storage.join("s3://bucket", "x", "y.json") == "s3://bucket/x/y.json"
    assert storage.join("s3://bucket/", "/x/", "y.json") == "s3://bucket/x/y.json"
    assert storage.join("/tmp/out", "rejects", "") == "/tmp/out/rejects"
    assert storage.join("file:///tmp", "a") == "file:///tmp/a"


def test_storage_options_fall_back_to_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-env")
    kwargs = StorageOptions().fsspec_kwargs()
    assert kwargs["client_kwargs"] == {"endpoint_url": "http://s3-specific:2", "region_name": "eu-west-3"}
    assert "key" not in kwargs and "secret" not in kwargs  # left to botocore's chain
    assert kwargs["anon"] is False

    explicit = StorageOptions(endpoint_url="http://minio:9000", key="k", secret="s", region="us-east-2")
    kwargs = explicit.fsspec_kwargs()
    assert kwargs["client_kwargs"] == {"endpoint_url": "http://minio:9000", "region_name": "us-east-2"}
    assert (kwargs["key"], kwargs["secret"]) == ("k", "s")

    resolved = StorageOptions().resolved()
    assert (resolved.endpoint_url, resolved.region) == ("http://s3-specific:2", "eu-west-3")
    # Credentials stay in the environment: what the driver ships to Ray workers never holds them.
    assert (resolved.key, resolved.secret, resolved.token) == (None, None, None)
    assert "secret-from-env" not in repr(resolved)


def test_pickled_options_carry_no_credentials():
    import pickle

    import ray.cloudpickle

    explicit = StorageOptions(endpoint_url="http://minio:9000", key="k-id", secret="s-value", token="t-value")
    for data in (pickle.dumps(explicit), ray.cloudpickle.dumps({"options": [explicit]})):
        assert not any(value in data for value in (b"k-id", b"s-value", b"t-value"))
    shipped = pickle.loads(pickle.dumps(explicit))
    assert (shipped.endpoint_url, shipped.key, shipped.secret, shipped.token) == ("http://minio:9000", None, None, None)
    import copy

    assert copy.deepcopy(explicit).secret == "s-value"  # within the process nothing is lost


def _roundtrip(base: str, options: StorageOptions | None) -> None:
    storage.makedirs(storage.join(base, "sub"), options)
    storage.write_bytes_atomic(storage.join(base, "sub", "blob.bin"), b"\x00\x01payload", options)
    with storage.open_read(storage.join(base, "sub", "blob.bin"), options) as handle:
        assert handle.read() == b"\x00\x01payload"

    manifest = {"z": 1, "a": [1, 2], "name": "ünïcode"}
    storage.write_json_atomic(storage.join(base, "manifest.json"), manifest, options)
    assert storage.read_json(storage.join(base, "manifest.json"), options) == manifest
    with storage.open_read(storage.join(base, "manifest.json"), options) as handle:
        text = handle.read().decode("utf-8")
    assert text == json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    storage.write_parquet_atomic(_table(), storage.join(base, "t.parquet"), options)
    assert storage.read_parquet(storage.join(base, "t.parquet"), options).equals(_table())
    assert storage.read_parquet(storage.join(base, "t.parquet"), options, columns=["id"]).column_names == ["id"]

    assert storage.exists(storage.join(base, "t.parquet"), options)
    assert not storage.exists(storage.join(base, "nope.parquet"), options)
    storage.remove(storage.join(base, "sub"), options)
    assert not storage.exists(storage.join(base, "sub", "blob.bin"), options)
    storage.remove(storage.join(base, "sub"), options)  # already gone: no error


def test_local_roundtrip_plain_path(tmp_path):
    _roundtrip(str(tmp_path / "out"), None)


def test_local_roundtrip_file_scheme(tmp_path):
    _roundtrip(f"file://{tmp_path}/out", None)


def test_s3_roundtrip(s3_bucket):
    _roundtrip(f"s3://{s3_bucket}/run1", StorageOptions())


def test_s3_explicit_options_reach_the_server(s3_server, s3_bucket):
    options = StorageOptions(endpoint_url=s3_server, key="testing", secret="testing", region="us-east-1")
    storage.write_bytes_atomic(f"s3://{s3_bucket}/x.txt", b"hi", options)
    with storage.open_read(f"s3://{s3_bucket}/x.txt", options) as handle:
        assert handle.read() == b"hi"


def test_pyarrow_filesystem_reads_what_storage_wrote(tmp_path, s3_bucket):
    for base in (str(tmp_path), f"s3://{s3_bucket}"):
        uri = storage.join(base, "t.parquet")
        storage.write_parquet_atomic(_table(), uri)
        fs, path = storage.pyarrow_filesystem(uri)
        assert pq.read_table(path, filesystem=fs).equals(_table())
    fs, path = storage.pyarrow_filesystem(str(tmp_path / "t.parquet"))
    assert fs.type_name == "local" and path == str(tmp_path / "t.parquet")


def _make_tree(base: str, options: StorageOptions | None = None) -> dict[str, bytes]:
    files = {
        "a.jsonl.gz": gzip.compress(b'{"text": "a"}\n'),
        "sub/b.jsonl.gz": gzip.compress(b'{"text": "bb"}\n' * 3),
        "sub/deeper/c.jsonl": b'{"text": "ccc"}\n',
        "_SUCCESS": b"",
        ".hidden/x.jsonl.gz": gzip.compress(b"{}"),
        "sub/.part.jsonl.gz.tmp": b"partial",
    }
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(base, name), data, options)
    return files


def _check_expand(base: str, files: dict[str, bytes], options: StorageOptions | None) -> None:
    def names(infos: list[storage.FileInfo]) -> list[str]:
        return [info.uri[len(base) + 1 :] for info in infos]

    everything = storage.expand(base, options)
    assert names(everything) == ["a.jsonl.gz", "sub/b.jsonl.gz", "sub/deeper/c.jsonl"]
    for info in everything:
        assert info.uri.startswith(base + "/")
        assert info.size == len(files[info.uri[len(base) + 1 :]])
        assert info.mtime is not None and abs(info.mtime - time.time()) < 600

    assert names(storage.expand(f"{base}/**/*.jsonl.gz", options)) == ["a.jsonl.gz", "sub/b.jsonl.gz"]
    assert names(storage.expand(f"{base}/*.jsonl.gz", options)) == ["a.jsonl.gz"]
    assert names(storage.expand(f"{base}/sub/*/*.jsonl", options)) == ["sub/deeper/c.jsonl"]
    assert names(storage.expand(f"{base}/sub/b.jsonl.gz", options)) == ["sub/b.jsonl.gz"]
    # Several patterns: union, sorted, each file once.
    union = storage.expand([f"{base}/sub/b.jsonl.gz", f"{base}/*.jsonl.gz", f"{base}/**/*.gz"], options)
    assert names(union) == ["a.jsonl.gz", "sub/b.jsonl.gz"]
    # A glob that names bookkeeping files itself gets them.
    assert names(storage.expand(f"{base}/_*", options)) == ["_SUCCESS"]


def test_expand_local(tmp_path):
    base = str(tmp_path / "corpus")
    files = _make_tree(base)
    _check_expand(base, files, None)
    for info in storage.expand(base):
        assert info.mtime == pytest.approx(os.path.getmtime(info.uri))
    file_base = f"file://{base}"
    assert [info.uri for info in storage.expand(f"{file_base}/*.gz")] == [f"{file_base}/a.jsonl.gz"]


def test_expand_s3(s3_bucket):
    base = f"s3://{s3_bucket}/corpus"
    files = _make_tree(base)
    _check_expand(base, files, None)


def test_relative_local_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shard.jsonl").write_bytes(b"{}\n")
    [info] = storage.expand("shard.jsonl")
    assert info.uri == str(tmp_path / "shard.jsonl") and info.size == 3


@pytest.mark.parametrize("suffix", ["nothing-here/*.jsonl", "missing_dir", "**/*.parquet"])
def test_expand_without_match_names_the_pattern(tmp_path, suffix):
    (tmp_path / "a.txt").write_text("x")
    pattern = f"{tmp_path}/{suffix}"
    with pytest.raises(ConfigError) as caught:
        storage.expand(pattern)
    assert caught.value.field == "corpus"
    assert pattern in str(caught.value)


def test_expand_without_match_on_s3(s3_bucket):
    with pytest.raises(ConfigError, match=f"s3://{s3_bucket}/none/\\*\\*"):
        storage.expand(f"s3://{s3_bucket}/none/**")


def test_atomic_writes_leave_no_temp_files(tmp_path):
    storage.write_bytes_atomic(str(tmp_path / "a.bin"), b"1")
    storage.write_bytes_atomic(str(tmp_path / "a.bin"), b"22")
    storage.write_json_atomic(str(tmp_path / "m.json"), {"k": 1})
    storage.write_parquet_atomic(_table(), str(tmp_path / "t.parquet"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "m.json", "t.parquet"]
    assert (tmp_path / "a.bin").read_bytes() == b"22"


def test_failed_serialisation_keeps_old_file(tmp_path, monkeypatch):
    uri = str(tmp_path / "manifest.json")
    storage.write_json_atomic(uri, {"version": 1})
    with pytest.raises(TypeError):
        storage.write_json_atomic(uri, {"version": 2, "bad": object()})
    assert storage.read_json(uri) == {"version": 1}

    table_uri = str(tmp_path / "t.parquet")
    storage.write_parquet_atomic(_table(), table_uri)
    real_write_table = pq.write_table

    def write_half_then_fail(table: pa.Table, where: object, **kwargs: object) -> None:
        real_write_table(table.slice(0, 1), where)
        raise pa.ArrowInvalid("encoder failed halfway")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(pa.ArrowInvalid, match="halfway"):
        storage.write_parquet_atomic(pa.table({"id": ["new"]}), table_uri)
    monkeypatch.undo()
    assert storage.read_parquet(table_uri).equals(_table())
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "t.parquet"]


def test_failed_write_midway_keeps_old_file_and_cleans_up(tmp_path, monkeypatch):
    uri = str(tmp_path / "data.bin")
    storage.write_bytes_atomic(uri, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(uri, b"new content")
    monkeypatch.undo()
    assert (tmp_path / "data.bin").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_read_parquet_directory_skips_bookkeeping(tmp_path, s3_bucket):
    for base in (str(tmp_path / "ds"), f"s3://{s3_bucket}/ds"):
        storage.write_parquet_atomic(_table().slice(0, 2), storage.join(base, "part-0.parquet"))
        storage.write_parquet_atomic(_table().slice(2), storage.join(base, "part-1.parquet"))
        storage.write_bytes_atomic(storage.join(base, "_SUCCESS"), b"")
        storage.write_json_atomic(storage.join(base, "manifest.json"), {})
        assert storage.read_parquet(base).equals(_table())


# Remote keys never become paths outside the local directory they are copied into ---------------------


def _put(bucket: str, key: str, body: bytes) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=body)  # boto3 keeps `..` in a key as it is


def _files_under(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize(
    "escape", ["../../../../../../../..{victim}/PLANTED.txt", "a/../../PLANTED.txt", "..", "/abs.txt"]
)
def test_local_copy_refuses_keys_outside_the_target(s3_bucket, tmp_path, monkeypatch, escape):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(downloads))  # where local_copy makes its directory
    victim = tmp_path / "victim"
    victim.mkdir()
    _put(s3_bucket, "team/sae/cfg.json", b"{}")
    bad_key = "team/sae/" + escape.format(victim=victim)
    _put(s3_bucket, bad_key, b"planted")
    with pytest.raises(storage.UnsafeKeyError) as caught:
        storage.local_copy(f"s3://{s3_bucket}/team/sae")
    assert bad_key in str(caught.value)
    # Nothing is written: not the planted file, not the good one, not an empty download directory.
    assert _files_under(str(tmp_path)) == []
    assert os.listdir(downloads) == []


def test_local_copy_keeps_the_tree_of_safe_keys(s3_bucket):
    keys = {"m/cfg.json": b"{}", "m/sub/w.bin": b"\x00\x01", "m/a..b/odd..name": b"dots are fine"}
    for key, body in keys.items():
        _put(s3_bucket, key, body)
    target = storage.local_copy(f"s3://{s3_bucket}/m")
    assert _files_under(target) == ["a..b/odd..name", "cfg.json", "sub/w.bin"]
    assert open(os.path.join(target, "a..b", "odd..name"), "rb").read() == b"dots are fine"
    single = storage.local_copy(f"s3://{s3_bucket}/m/sub/w.bin")
    assert os.path.basename(single) == "w.bin" and open(single, "rb").read() == b"\x00\x01"


def test_local_copy_refuses_two_keys_for_one_file(s3_bucket):
    _put(s3_bucket, "d/x.bin", b"first")
    _put(s3_bucket, "d/sub/../x.bin", b"second")
    with pytest.raises(storage.UnsafeKeyError, match="both land on 'x.bin'"):
        storage.local_copy(f"s3://{s3_bucket}/d")


def test_upload_dir_refuses_names_outside_the_destination(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "ok.txt").write_bytes(b"ok")
    (tmp_path / "escaped.txt").write_bytes(b"outside")
    # A walk that yields a name climbing out of the directory: the names are checked, not trusted.
    monkeypatch.setattr(os, "walk", lambda root: iter([(str(staging), [], ["ok.txt", "../escaped.txt"])]))
    out = tmp_path / "deep" / "out"
    with pytest.raises(storage.UnsafeKeyError, match="escaped.txt"):
        storage.upload_dir(str(staging), str(out))
    assert not out.exists()


# Written files follow the umask, like any other tool's ------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _write_every_way(directory: str) -> list[str]:
    storage.write_bytes_atomic(os.path.join(directory, "CURRENT"), b"snapshot-1")
    storage.write_json_atomic(os.path.join(directory, "manifest.json"), {"k": 1})
    storage.write_parquet_atomic(_table(), os.path.join(directory, "rejects.parquet"))
    assert storage.write_bytes_exclusive(os.path.join(directory, "catalog-entry.json"), b"{}")
    staging = os.path.join(directory, "staging")
    os.makedirs(staging)
    with open(os.path.join(staging, "model.bin"), "wb") as handle:
        handle.write(b"w")
    os.chmod(os.path.join(staging, "model.bin"), 0o600)  # the source's own mode does not carry over
    storage.upload_dir(staging, os.path.join(directory, "uploaded"))
    return ["CURRENT", "manifest.json", "rejects.parquet", "catalog-entry.json", "uploaded/model.bin"]


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    names = _write_every_way(str(tmp_path))
    umask(0o022)
    assert {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in names} == dict.fromkeys(names, oct(mode))
    # An overwrite takes the umask of its own time, not the old file's mode.
    storage.write_bytes_atomic(str(tmp_path / "CURRENT"), b"snapshot-2")
    assert (tmp_path / "CURRENT").stat().st_mode & 0o777 == 0o644


def test_umask_is_read_without_changing_it(umask, monkeypatch):
    umask(0o027)
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    assert storage.current_umask() == 0o027  # from /proc/self/status: os.umask is not called
    assert calls == []


def test_umask_without_proc_is_the_one_at_import(umask, monkeypatch, tmp_path):
    monkeypatch.setattr(storage, "_PROC_STATUS", str(tmp_path / "no-such-status"))
    umask(0o077)
    assert storage.current_umask() == storage._UMASK_AT_IMPORT
