"""Scheduled curation: catalog, leases, incremental batches, crashes, concurrency, poisoned shards, status."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import REPO
from helpers import write_corpus

from core import cli, storage
from core.errors import ConfigError
from core.reader import shard_key
from curation.schedule.catalog import Catalog
from curation.schedule.service import (
    ScheduleJobConfig,
    ScheduleSpec,
    load_spec,
    read_current,
    run_batch,
    shard_failure,
    spec_status,
)

pytestmark = pytest.mark.timeout(600)

SHARDS = 4


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


def spec_values(world: dict, out: str, corpus: str | None = None, **overrides) -> dict:
    values = {
        "corpus": [corpus or world["glob"]], "seeds": world["seeds"], "sae": world["sae"], "out": out,
        "top_n": 2, "cpus_per_actor": 0.5, "batch_size": 16, "shards_per_round": 2, "torch_threads": 1,
    }  # fmt: skip
    values.update(overrides)
    return values


def make_spec(world: dict, out: str, corpus: str | None = None, **overrides) -> ScheduleSpec:
    return cli.from_mapping(ScheduleSpec, spec_values(world, out, corpus, **overrides))


def write_spec(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def start_job(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m jobs.schedule ARGS`, joining the tests' Ray the way a batch joins a long-lived cluster."""
    import ray

    args = [*args, "--ray-address", ray.get_runtime_context().gcs_address]
    handle = log.open("w")
    # A session of its own, so the test can kill the batch with its local Ray, and nothing else.
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.schedule", *args], cwd=REPO, env=job_env(), stdout=handle,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def kill_session(leader: int) -> None:
    """SIGKILL the process group a job was started in, and any process left in its session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader:  # field 6 of /proc/PID/stat: the session id
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


def run_job(args: list[str], log: Path, timeout: int = 300) -> None:
    proc = start_job(args, log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        kill_session(proc.pid)
    assert code == 0, log.read_text()[-4000:]


def kill_after_commits(proc: subprocess.Popen, out: str, at_least: int, log: Path, timeout: float = 300) -> int:
    """SIGKILL the batch's process group once `at_least` shards are recorded done; returns how many were."""
    catalog = Catalog(out, storage.StorageOptions().resolved(), owner="test")
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            done = [r for r in catalog.records().values() if r["status"] == "done"]
            if len(done) >= at_least:
                return len(done)
            assert proc.poll() is None, "the batch ended before it could be killed:\n" + log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError("no shard was committed in time:\n" + log.read_text()[-3000:])
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


def dataset(out: str) -> list[tuple[str, str]]:
    table = read_current(out, storage.StorageOptions().resolved())
    return sorted(zip(table.column("id").to_pylist(), table.column("domain").to_pylist(), strict=True))


def build_sae(model: str, corpus_glob: str, seeds: str, out: Path) -> None:
    """An SAE on layer 2 trained in this process from the corpus's activations: no Ray pipeline needed."""
    from core.batching import tokenize_texts
    from core.models import model_info
    from core.reader import DOC, CleanConfig, iter_shard
    from curation.encode import DocumentEncoder, EncoderSpec
    from curation.sae.coords import select_coords
    from curation.sae.model import SAEConfig, train_sae
    from curation.seeds import load_seeds

    encoder = DocumentEncoder(EncoderSpec(model=model, sae_dir=None, layer=2))
    seed_tokens = tokenize_texts(encoder.tokenizer, load_seeds(seeds).texts, 64)
    coords = select_coords(encoder, seed_tokens, "jacobian", 32)
    rows = [row for info in storage.expand(corpus_glob) for row in iter_shard(info.uri, None, CleanConfig())]
    texts = [row["text"] for kind, row in rows if kind == DOC]
    activations = encoder.activations(tokenize_texts(encoder.tokenizer, texts, 64))[:, coords]
    info = model_info(model)
    config = SAEConfig(
        d_in=len(coords), expansion_factor=4, k=8, layer=2, coords=coords, coord_selector="jacobian",
        base_model={"name": model, "num_layers": info.num_layers, "hidden_size": info.hidden_size},
    )  # fmt: skip
    batches = [activations[torch.randperm(len(activations))[:256]] for _ in range(30)]
    sae, _ = train_sae(batches, config)
    sae.save(out)


@pytest.fixture(scope="module")
def world(ray_local, tiny_model_dir, tmp_path_factory):
    """Four gzipped shards with planted documents, seeds, an SAE, and the dataset of a clean batch."""
    root = tmp_path_factory.mktemp("schedule")
    corpus = write_corpus(root / "corpus", shards=SHARDS, background_docs=40, bad_rows=False)
    glob = str(root / "corpus" / "*.jsonl.gz")
    build_sae(tiny_model_dir, glob, corpus["seeds"], root / "sae")
    world = {"root": root, "corpus": corpus, "glob": glob, "seeds": corpus["seeds"], "sae": str(root / "sae")}
    clean = run_batch(make_spec(world, str(root / "clean")))
    world["clean"] = dataset(str(root / "clean"))
    world["clean_record"] = clean
    return world


def test_example_spec_loads_and_bad_values_name_the_field():
    spec = load_spec(str(REPO / "jobs" / "configs" / "schedule-demo.yaml"))
    assert spec.rule == "per_seed_topn" and spec.corpus and spec.out.endswith("scheduled")
    assert spec.max_attempts >= 1 and spec.lease_seconds > 0 and spec.keep_snapshots >= 1
    with pytest.raises(ConfigError, match="shards_per_round"):
        ScheduleSpec(corpus=["x"], seeds="s", sae="a", out="o", shards_per_round=0)
    with pytest.raises(ConfigError, match="spec"):
        ScheduleJobConfig()


def test_clean_batch_curates_the_planted_documents_once(world):
    planted = world["corpus"]["planted"]
    table = read_current(str(world["root"] / "clean")).to_pylist()
    assert {(row["text"], row["domain"]) for row in table} == set(planted.items())
    record = world["clean_record"]
    assert len(record["done"]) == SHARDS and record["documents_encoded"] == world["corpus"]["good_rows"]
    assert record["snapshot"] == 1 and record["rows_curated"] == len(planted)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_leases_are_exclusive_and_expire(backend, tmp_path, request):
    root = str(tmp_path / "out") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    options = storage.StorageOptions().resolved()
    info = storage.FileInfo("s3://corpus/part-0.jsonl.gz", 10, 1.0)
    winners: list[str] = []

    def claim(name: str) -> None:
        if Catalog(root, options, owner=name, lease_seconds=120).try_claim(info, 3) is not None:
            winners.append(name)

    threads = [threading.Thread(target=claim, args=(f"batch-{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert Catalog(root, options, owner="late", lease_seconds=120).try_claim(info, 3) is None  # still live

    # A batch that crashed holding a lease: once it expires, exactly one taker gets the next generation.
    other = storage.FileInfo("s3://corpus/part-1.jsonl.gz", 10, 1.0)
    crashed = Catalog(root, options, owner="crashed", lease_seconds=0.5).try_claim(other, 3)
    assert crashed is not None and crashed.generation == 0
    time.sleep(0.6)
    taker = Catalog(root, options, owner="taker", lease_seconds=120)
    lease = taker.try_claim(other, 3)
    assert lease is not None and lease.generation == 1
    assert Catalog(root, options, owner="x", lease_seconds=120).try_claim(other, 3) is None
    assert not taker.holds(crashed) and taker.holds(lease)
    taker.commit_done(lease, other, {"documents": 3, "candidates": 0})
    assert Catalog(root, options, owner="again", lease_seconds=120).try_claim(other, 3) is None  # done
    assert taker.record(shard_key(other.uri))["status"] == "done"
    assert not storage.exists(storage.join(root, "leases", lease.key), options)  # released after the record


def test_shard_failure_reasons():
    import pyarrow as pa

    def rejects(*rows):
        return pa.table({"reason": [r for r, _ in rows], "detail": [d for _, d in rows]}, pa.schema(
            [("reason", pa.string()), ("detail", pa.string())]))  # fmt: skip

    assert shard_failure(rejects(), 10, 0.5) is None
    assert shard_failure(rejects(("bad_json", "x")), 10, 0.5) is None  # one bad line in a good shard
    assert "truncated_stream" in shard_failure(rejects(("truncated_stream", "gzip stream ends early")), 10, 0.5)
    assert "not JSONL: 3 of 3" in shard_failure(rejects(*[("bad_json", "Expecting value")] * 3), 0, 0.5)


def test_new_shards_only_later_documents_displace_earlier_and_duplicates_enter_once(world, tmp_path):
    """Batch 1 sees two shards; two more arrive (one duplicating a planted text); batch 2 encodes only those."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shards = sorted((world["root"] / "corpus").glob("*.jsonl.gz"))
    for path in shards[:2]:
        shutil.copy(path, corpus / path.name)
    out = str(tmp_path / "out")
    spec = make_spec(world, out, str(corpus / "*.jsonl.gz"), shards_per_round=4)
    first = run_batch(spec)
    assert len(first["done"]) == 2 and first["snapshot"] == 1
    first_rows = set(dataset(out))

    for path in shards[2:]:
        shutil.copy(path, corpus / path.name)
    planted_text, planted_domain = next(iter(world["corpus"]["planted"].items()))
    (corpus / "zz-dup.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": planted_text}).encode() + b"\n"))
    new_rows = sum(len(gzip.decompress(p.read_bytes()).splitlines()) for p in shards[2:]) + 1
    second = run_batch(spec)
    assert sorted(Path(uri).name for uri in second["done"]) == [p.name for p in shards[2:]] + ["zz-dup.jsonl.gz"]
    assert second["documents_encoded"] == new_rows  # the encode stage saw only the new shards' rows
    assert second["snapshot"] == 2
    final = read_current(out).to_pylist()
    assert {(row["text"], row["domain"]) for row in final} == set(world["corpus"]["planted"].items())
    assert set(dataset(out)) == set(world["clean"])
    assert first_rows - set(dataset(out))  # later, better documents displaced some of batch 1's picks
    duplicate = [row for row in final if row["text"] == planted_text and row["domain"] == planted_domain]
    assert len(duplicate) == 1 and "zz-dup" not in duplicate[0]["source"]  # kept once, lexically first source

    third = run_batch(spec)
    assert third["documents_encoded"] == 0 and third["shards"] == {} and third["snapshot"] == 2
    # Old snapshots are kept up to the retention limit.
    assert sorted(p.name for p in (tmp_path / "out" / "snapshots").iterdir()) == ["v000001", "v000002"]


@pytest.fixture(scope="module")
def poisoned(world, tmp_path_factory):
    """Two good shards, a truncated .gz and a file that is not JSONL; three batches with max_attempts=2."""
    root = tmp_path_factory.mktemp("poisoned")
    corpus = root / "corpus"
    corpus.mkdir()
    shards = sorted((world["root"] / "corpus").glob("*.jsonl.gz"))
    for path in shards[:2]:
        shutil.copy(path, corpus / path.name)
    whole = shards[2].read_bytes()
    (corpus / "broken.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (corpus / "notjson.jsonl").write_bytes(b"PAR1\x00\x01binary garbage\nmore,csv,like,stuff\nthird line\n")
    out = str(root / "out")
    spec = make_spec(world, out, str(corpus / "*"), max_attempts=2)
    records = [run_batch(spec) for _ in range(3)]
    return {"root": root, "out": out, "spec": spec, "records": records, "shards": shards}


def test_poisoned_shards_fail_with_their_error_and_are_retried_up_to_the_limit(poisoned):
    first, second, third = poisoned["records"]
    names = {Path(uri).name: shard for uri, shard in first["shards"].items()}
    assert names["broken.jsonl.gz"]["status"] == "failed" and "gzip" in names["broken.jsonl.gz"]["error"]
    assert names["notjson.jsonl"]["status"] == "failed" and "not JSONL" in names["notjson.jsonl"]["error"]
    assert [Path(uri).name for uri in first["done"]] == [p.name for p in poisoned["shards"][:2]]
    assert sorted(Path(uri).name for uri in second["failed"]) == ["broken.jsonl.gz", "notjson.jsonl"]
    assert {shard["attempts"] for shard in second["shards"].values()} == {2}
    assert second["done"] == [] and third["shards"] == {}  # out of attempts: left alone
    rows = read_current(poisoned["out"]).to_pylist()
    good_sources = {str(poisoned["root"] / "corpus" / p.name) for p in poisoned["shards"][:2]}
    assert rows and all(row["source"].rsplit("#", 1)[0] in good_sources for row in rows)


def test_status_reports_every_shard_state(poisoned, tmp_path):
    spec_file = write_spec(tmp_path / "spec.yaml", json.loads(json.dumps(poisoned["spec"].__dict__)))
    result = subprocess.run(
        [sys.executable, "-m", "jobs.schedule", "--spec", spec_file, "--status"], cwd=REPO, env=job_env(),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status = spec_status(poisoned["spec"])
    assert status["seen"] == 4 and status["done"] == 2 and len(status["failed"]) == 2 and status["pending"] == 0
    assert status["rows_curated"] == len(read_current(poisoned["out"])) and status["last_batch"]
    assert "shards seen 4, done 2, in progress 0, failed 2" in result.stdout
    assert "notjson.jsonl: not JSONL" in result.stdout and "broken.jsonl.gz: truncated_stream" in result.stdout
    assert f"rows curated {status['rows_curated']} (snapshot v1)" in result.stdout


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_killed_batch_then_rerun_equals_a_clean_run(world, backend, tmp_path, request):
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        for path in sorted((world["root"] / "corpus").glob("*.jsonl.gz")):
            storage.write_bytes_atomic(f"s3://{bucket}/corpus/{path.name}", path.read_bytes())
        corpus, out = f"s3://{bucket}/corpus/*.jsonl.gz", f"s3://{bucket}/out"
    else:
        corpus, out = world["glob"], str(tmp_path / "out")
    spec = write_spec(tmp_path / "spec.yaml", spec_values(world, out, corpus, shards_per_round=1, lease_seconds=4))
    proc = start_job(["--spec", spec, "--once"], tmp_path / "killed.log")
    committed = kill_after_commits(proc, out, 1, tmp_path / "killed.log")
    assert committed < SHARDS
    time.sleep(4.5)  # the killed batch's leases expire
    # The rerun may run its rounds wider: scheduling fields are not part of the spec's identity.
    wide = write_spec(tmp_path / "wide.yaml", spec_values(world, out, corpus, shards_per_round=4, lease_seconds=4))
    run_job(["--spec", wide, "--once"], tmp_path / "rerun.log")
    rows = dataset(out)
    assert rows == world["clean"] and len(rows) == len(set(rows))
    records = Catalog(out, storage.StorageOptions().resolved(), owner="test").records()
    assert len(records) == SHARDS and {r["status"] for r in records.values()} == {"done"}


def test_two_batches_started_together_split_the_shards(world, tmp_path):
    out = str(tmp_path / "out")
    spec = write_spec(tmp_path / "spec.yaml", spec_values(world, out, shards_per_round=1))
    procs = [start_job(["--spec", spec, "--once"], tmp_path / f"batch-{i}.log") for i in range(2)]
    try:
        for index, proc in enumerate(procs):
            assert proc.wait(timeout=300) == 0, (tmp_path / f"batch-{index}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            kill_session(proc.pid)
    batches = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "batches").glob("*.json"))]
    assert len(batches) == 2
    done = [set(batch["done"]) for batch in batches]
    assert not done[0] & done[1] and len(done[0] | done[1]) == SHARDS
    rows = dataset(out)
    assert rows == world["clean"]
    pointer = json.loads((tmp_path / "out" / "CURRENT").read_text())
    assert len(pointer["shards"]) == SHARDS
    assert pq.read_table(tmp_path / "out" / pointer["path"] / "curated.parquet").num_rows == len(rows)
