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

from core import cli, reader, storage
from core.errors import ConfigError
from core.reader import shard_key
from core.storage import StorageOptions
from curation.schedule import batch as schedule_batch
from curation.schedule import snapshots
from curation.schedule.batch import run_batch
from curation.schedule.catalog import Catalog, LeaseKeeper
from curation.schedule.service import ScheduleJobConfig
from curation.schedule.shards import shard_failure
from curation.schedule.signals import BatchInterrupted, BatchSignals
from curation.schedule.snapshots import current_snapshot, read_current
from curation.schedule.spec import ScheduleSpec, bind_output, identity_hash, load_schedule_spec, spec_identity
from curation.schedule.status import format_status, retry_failed, spec_status

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
        "top_n": 2, "cpus": 0.5, "batch_size": 16, "shards_per_round": 2, "threads": 1,
    }  # fmt: skip
    values.update(overrides)
    return values


def make_spec(world: dict, out: str, corpus: str | None = None, **overrides) -> ScheduleSpec:
    return cli.from_mapping(ScheduleSpec, spec_values(world, out, corpus, **overrides))


def write_spec(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


# `python -c PAUSE_BEFORE_PUBLISH ARGS` runs jobs.schedule, but the batch stops for good right after it
# claims its snapshot version: every commit is done, the publish is not. It touches $PAUSE_MARKER there.
PAUSE_BEFORE_PUBLISH = """
import os, runpy, sys, time
from pathlib import Path
from curation.schedule import snapshots
claim = snapshots._claim_version
def pause(out, options):
    version = claim(out, options)
    Path(os.environ["PAUSE_MARKER"]).write_text(str(version))
    time.sleep(3600)
snapshots._claim_version = pause
sys.argv = ["jobs.schedule", *sys.argv[1:]]
runpy.run_module("jobs.schedule", run_name="__main__")
"""


# `python -c PAUSE_IN_ROUND ARGS` runs jobs.schedule, but its first round's pipeline never ends: the batch
# holds its round's leases and waits. It touches $PAUSE_MARKER there.
PAUSE_IN_ROUND = """
import os, runpy, sys, time
from pathlib import Path
from curation.schedule import batch
def pause(*args, **kwargs):
    Path(os.environ["PAUSE_MARKER"]).write_text("encoding")
    time.sleep(3600)
batch.encode_shards = pause
sys.argv = ["jobs.schedule", *sys.argv[1:]]
runpy.run_module("jobs.schedule", run_name="__main__")
"""


def start_job(
    args: list[str], log: Path, pause_marker: Path | None = None, pause: str = PAUSE_BEFORE_PUBLISH
) -> subprocess.Popen:
    """`python -m jobs.schedule ARGS`, joining the tests' Ray the way a batch joins a long-lived cluster."""
    import ray

    args = [*args, "--ray-address", ray.get_runtime_context().gcs_address]
    handle = log.open("w")
    env = job_env()
    command = ["-m", "jobs.schedule"]
    if pause_marker is not None:
        command = ["-c", pause]
        env["PAUSE_MARKER"] = str(pause_marker)
    # A session of its own, so the test can kill the batch with its local Ray, and nothing else.
    return subprocess.Popen(
        [sys.executable, *command, *args], cwd=REPO, env=env, stdout=handle,
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


def wait_for_marker(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        assert time.time() < deadline, "the batch never reached its pause:\n" + log.read_text()[-3000:]
        assert proc.poll() is None, "the batch ended before its pause:\n" + log.read_text()[-3000:]
        time.sleep(0.2)


def kill_before_publish(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 300) -> None:
    """SIGKILL the batch once it has committed every shard and claimed, but not written, its snapshot."""
    try:
        wait_for_marker(proc, marker, log, timeout)
    finally:
        kill_session(proc.pid)
        proc.wait(timeout=30)


def files_under(uri: str) -> list[str]:
    fs, path = storage.filesystem(uri, storage.StorageOptions().resolved())
    try:
        return sorted(fs.find(path))
    except FileNotFoundError:
        return []


def dataset(out: str) -> list[tuple[str, str]]:
    table = read_current(out, storage.StorageOptions().resolved())
    return sorted(zip(table.column("id").to_pylist(), table.column("domain").to_pylist(), strict=True))


def build_sae(model: str, corpus_glob: str, seeds: str, out: Path) -> None:
    """An SAE on layer 2 trained in this process from the corpus's activations: no Ray pipeline needed."""
    from core.batching import tokenize_texts
    from core.models import model_info
    from core.reader import DOC, CleanConfig, iter_shard
    from curation.encode import DocumentEncoder, EncoderSettings
    from curation.latent_weights import save_corpus_sample
    from curation.sae.coords import select_coords
    from curation.sae.model import SAEConfig, train_sae
    from curation.seeds import load_seeds

    encoder = DocumentEncoder(EncoderSettings(model=model, sae_dir=None, layer=2))
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
    # The corpus sample and rarity statistics `jobs.train_sae` measures after training, here the whole corpus.
    encoder = DocumentEncoder(EncoderSettings(model=model, sae_dir=None, layer=2), sae=sae)
    save_corpus_sample(out, encoder.encode(tokenize_texts(encoder.tokenizer, texts, 64)), "rate")


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
    spec = load_schedule_spec(str(REPO / "jobs" / "configs" / "schedule-demo.yaml"))
    assert spec.rule == "per_seed_topn" and spec.corpus and spec.out.endswith("scheduled")
    assert spec.max_attempts >= 1 and spec.lease_seconds > 0 and spec.keep_snapshots >= 1
    with pytest.raises(ConfigError, match="shards_per_round"):
        ScheduleSpec(corpus=["x"], seeds="s", sae="a", out="o", shards_per_round=0)
    with pytest.raises(ConfigError, match="storage_backoff_s"):
        ScheduleSpec(corpus=["x"], seeds="s", sae="a", out="o", storage_backoff_s=float("nan"))
    with pytest.raises(ConfigError, match="retry_failed"):
        ScheduleJobConfig(spec=["s.yaml"], retry_failed=True, status=True)
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
    assert taker.live_lease(lease.key) is None  # released after the record

    # A stalled holder: A claims and stalls past its expiry; B takes over, fails the shard and gives it
    # back; C claims it. A generation is never reused, so A can neither pass for C nor overwrite C's lease.
    third = storage.FileInfo("s3://corpus/part-2.jsonl.gz", 10, 1.0)
    stalled = Catalog(root, options, owner="stalled", lease_seconds=0.5)
    a = stalled.try_claim(third, 5)
    time.sleep(0.6)
    b_catalog = Catalog(root, options, owner="b", lease_seconds=120)
    b = b_catalog.try_claim(third, 5)
    assert b is not None and b.generation > a.generation
    b_catalog.commit_failed(b, third, "boom")
    c_catalog = Catalog(root, options, owner="c", lease_seconds=120)
    c = c_catalog.try_claim(third, 5)
    assert c is not None and c.generation not in (a.generation, b.generation)
    assert not stalled.holds(a) and not stalled.renew(a)
    assert c_catalog.holds(c) and c_catalog.live_lease(c.key)["owner"] == "c"
    # A stalled holder that nobody took over from does not renew or commit well past its expiry either.
    fourth = storage.FileInfo("s3://corpus/part-3.jsonl.gz", 10, 1.0)
    alone = stalled.try_claim(fourth, 5)
    time.sleep(0.8)  # past its expiry and the half lease of grace
    assert not stalled.holds(alone) and not stalled.renew(alone) and stalled.live_lease(alone.key) is None


def test_shard_failure_reasons():
    import pyarrow as pa

    def rejects(*rows):
        return pa.table({"reason": [r for r, _ in rows], "detail": [d for _, d in rows]}, pa.schema(
            [("reason", pa.string()), ("detail", pa.string())]))  # fmt: skip

    assert shard_failure(rejects(), 10, 0.5) is None
    assert shard_failure(rejects(("bad_json", "x")), 10, 0.5) is None  # one bad line in a good shard
    assert "truncated_stream" in shard_failure(rejects(("truncated_stream", "gzip stream ends early")), 10, 0.5)
    assert "not JSONL: 3 of 3" in shard_failure(rejects(*[("bad_json", "Expecting value")] * 3), 0, 0.5)


def test_a_commit_never_fails_on_a_concurrent_claim(tmp_path, monkeypatch):
    """Another batch's claim lands in the shard's lease directory while the committing batch releases it."""
    root, options = str(tmp_path / "out"), storage.StorageOptions().resolved()
    info = storage.FileInfo(str(tmp_path / "part-0.jsonl.gz"), 10, 1.0)
    committer = Catalog(root, options, owner="committer", lease_seconds=120)
    lease = committer.try_claim(info, 3)
    lease_dir = Path(root) / "leases" / lease.key
    real_rmdir = os.rmdir

    def rmdir_as_a_claim_lands(path, *args, **kwargs):
        # The racing batch read the shard as due and its lease directory as empty a moment ago.
        (lease_dir / f"{lease.generation + 1:06d}.json").write_text(json.dumps({"owner": "racer", "expires_at": 0}))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir_as_a_claim_lands)
    stop, errors = threading.Event(), []

    def claim_in_a_loop(name: str) -> None:
        racer = Catalog(root, options, owner=name, lease_seconds=120)
        while not stop.is_set():
            try:
                claimed = racer.try_claim(info, 3)
                if claimed is not None:
                    racer.release(claimed)
            except Exception as error:  # a racer's failure is what this test looks for
                errors.append(error)

    racers = [threading.Thread(target=claim_in_a_loop, args=(f"racer-{i}",)) for i in range(3)]
    for thread in racers:
        thread.start()
    try:
        committer.commit_done(lease, info, {"documents": 3, "candidates": 0})
    finally:
        stop.set()
        for thread in racers:
            thread.join()
    assert errors == []
    assert committer.record(lease.key)["status"] == "done" and committer.live_lease(lease.key) is None
    assert Catalog(root, options, owner="late", lease_seconds=120).try_claim(info, 3) is None


def s3_conflict() -> OSError:
    """The error s3fs raises for S3's 409 ConditionalRequestConflict (two conditional PUTs racing)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    body = {
        "Error": {"Code": "ConditionalRequestConflict", "Message": "A conflicting conditional operation is "
                  "currently in progress against this resource. Please try again."},
        "ResponseMetadata": {"HTTPStatusCode": 409},
    }  # fmt: skip
    return translate_boto_error(ClientError(body, "PutObject"))


def test_s3_conflicting_conditional_writes_are_a_lost_race(s3_bucket, monkeypatch):
    root, options = f"s3://{s3_bucket}/out", storage.StorageOptions().resolved()
    conflicts = {"left": 0, "winner_lands": True}
    real_filesystem = storage.filesystem

    class Racing:
        """The store's filesystem, but each exclusive create meets a racing one while `left` > 0."""

        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def pipe_file(self, path, data, mode="overwrite", **kwargs):
            if mode == "create" and conflicts["left"] > 0:
                conflicts["left"] -= 1
                if conflicts["winner_lands"]:  # the racing PUT completes: ours is asked again and gets 412
                    self.fs.pipe_file(path, b'{"owner": "racer", "expires_at": 1e12, "generation": 0}')
                raise s3_conflict()
            return self.fs.pipe_file(path, data, mode=mode, **kwargs)

    def racing_filesystem(uri, opts=None):
        fs, path = real_filesystem(uri, opts)
        return (Racing(fs), path) if uri.startswith("s3://") else (fs, path)

    monkeypatch.setattr(storage, "filesystem", racing_filesystem)
    info = storage.FileInfo("s3://corpus/part-0.jsonl.gz", 10, 1.0)
    conflicts["left"] = 1
    assert Catalog(root, options, owner="loser", lease_seconds=120).try_claim(info, 3) is None
    # The racing write failed too, and the key stays contested: a lost race all the same, never a crash.
    conflicts.update(left=100, winner_lands=False)
    other = storage.FileInfo("s3://corpus/part-1.jsonl.gz", 10, 1.0)
    assert Catalog(root, options, owner="loser", lease_seconds=120).try_claim(other, 3) is None
    # Once the race settles, the shard is claimed as usual; a contested snapshot version is skipped.
    conflicts["left"] = 0
    assert Catalog(root, options, owner="later", lease_seconds=120).try_claim(other, 3) is not None
    conflicts.update(left=1, winner_lands=True)
    assert snapshots._claim_version(root, options) == 2


def test_lost_attempts_count_when_the_holder_dies(tmp_path):
    """A batch that dies holding a shard (a worker-killing shard can take its driver down) costs an attempt."""
    root, options = str(tmp_path / "out"), storage.StorageOptions().resolved()
    info = storage.FileInfo(str(tmp_path / "part-0.jsonl.gz"), 10, 1.0)
    for attempt in (1, 2):
        dying = Catalog(root, options, owner=f"dies-{attempt}", lease_seconds=0.3)
        assert dying.try_claim(info, 2) is not None
        time.sleep(0.4)
        if attempt == 1:
            taker = Catalog(root, options, owner="taker", lease_seconds=120)
            lease = taker.try_claim(info, 2)
            assert lease is not None
            record = taker.record(lease.key) or {}
            assert record.get("status") == "failed" and record["attempts"] == 1 and "dies-1" in record["error"]
            taker.release(lease)  # the taker gives it back unprocessed; the next holder dies again
    last = Catalog(root, options, owner="last", lease_seconds=120)
    assert last.try_claim(info, 2) is None  # its second lost attempt was its last
    record = last.record(shard_key(info.uri))
    assert record["status"] == "failed" and record["attempts"] == 2 and "stopped renewing" in record["error"]
    assert last.live_lease(shard_key(info.uri)) is None


def test_sweep_removes_a_round_directory_killed_while_it_started(tmp_path):
    """A batch killed while writing its round's `_ROUND.json` leaves only that file's temp file behind."""
    from types import SimpleNamespace

    work, long_ago = tmp_path / "out" / "work", time.time() - 100
    for name, file in {"dead-1": "._ROUND.json.a.tmp", "live-1": "._ROUND.json.b.tmp", "other": "x.parquet"}.items():
        (work / name).mkdir(parents=True)
        (work / name / file).write_text("{")
        if name != "live-1":
            os.utime(work / name / file, (long_ago, long_ago))
    spec = SimpleNamespace(out=str(tmp_path / "out"), lease_seconds=4.0)
    snapshots._sweep_work(spec, Catalog(spec.out, None, owner="sweeper"))
    assert sorted(path.name for path in work.iterdir()) == ["live-1", "other"]


def test_lease_keeper_stops_renewing_a_round_past_its_budget(tmp_path):
    root, options = str(tmp_path / "out"), storage.StorageOptions().resolved()
    catalog = Catalog(root, options, owner="batch", lease_seconds=1.0)
    within = catalog.try_claim(storage.FileInfo(str(tmp_path / "a.jsonl"), 1, 1.0), 3)
    over = catalog.try_claim(storage.FileInfo(str(tmp_path / "b.jsonl"), 1, 1.0), 3)
    with LeaseKeeper(catalog, every_s=0.2) as keeper:
        keeper.add([within])
        keeper.add([over], deadline=time.time() + 0.3)
        time.sleep(2.0)
        assert catalog.live_lease(within.key) is not None  # renewed all along
        assert catalog.live_lease(over.key) is None and over.key in keeper.lost


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


def test_a_shard_still_being_written_is_not_committed_as_a_prefix(world, tmp_path, monkeypatch):
    """A shard listed while its copy goes on: changed during its round, it is not recorded and a later batch
    processes it whole; with `settle_seconds`, a shard modified that recently is not even claimed (a later
    batch takes it like any due shard once it has settled)."""
    corpus, out = tmp_path / "corpus", str(tmp_path / "out")
    corpus.mkdir()
    sources = sorted((world["root"] / "corpus").glob("*.jsonl.gz"))
    lines = [gzip.decompress(path.read_bytes()).splitlines(keepends=True) for path in sources[:2]]
    growing, fresh = corpus / "growing.jsonl", corpus / "fresh.jsonl"
    half = len(lines[0]) // 2
    growing.write_bytes(b"".join(lines[0][:half]))
    real_encode = schedule_batch.encode_shards

    def encode_while_the_copy_goes_on(*args, **kwargs):
        real_encode(*args, **kwargs)
        with growing.open("ab") as handle:
            handle.write(b"".join(lines[0][half:]))

    monkeypatch.setattr(schedule_batch, "encode_shards", encode_while_the_copy_goes_on)
    first = run_batch(make_spec(world, out, str(corpus / "*.jsonl")))
    assert first["done"] == [] and first["changed"] == [str(growing)]
    assert Catalog(out, None, owner="test").records() == {}  # not recorded: still due

    monkeypatch.setattr(schedule_batch, "encode_shards", real_encode)
    fresh.write_bytes(b"".join(lines[1]))  # arrives just now
    an_hour_ago = time.time() - 3600
    os.utime(growing, (an_hour_ago, an_hour_ago))
    settled = make_spec(world, out, str(corpus / "*.jsonl"), settle_seconds=600)
    second = run_batch(settled)
    assert second["done"] == [str(growing)] and second["settling"] == [str(fresh)]
    assert Catalog(out, None, owner="test").record(shard_key(str(growing)))["documents"] == len(lines[0])
    catalog = Catalog(out, None, owner="test")
    assert catalog.record(shard_key(str(fresh))) is None and catalog.newest(shard_key(str(fresh))) is None
    assert {source.rsplit("#", 1)[0] for source in read_current(out).column("source").to_pylist()} == {str(growing)}


def test_worker_killing_and_hanging_shards_fail_within_bounds(world, tmp_path, monkeypatch):
    """A shard whose processing kills its worker shares a round with a good shard; one that hangs its
    worker runs past the round's time budget. Both are recorded failed with their reason, and the batches end
    (Ray Data alone would retry the killed task without end, and wait on the hung one)."""
    from curation import encode_pipeline

    corpus, out = tmp_path / "corpus", str(tmp_path / "out")
    corpus.mkdir()
    shutil.copy(sorted((world["root"] / "corpus").glob("*.jsonl.gz"))[0], corpus / "good.jsonl.gz")
    for name in ("crash", "hang"):
        text = f"{name.upper()}-THE-WORKER, then some ordinary words"
        (corpus / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    real_tokenize = encode_pipeline.tokenize_batch

    def tokenize_or_kill(batch, **kwargs):
        texts = [str(text) for text in batch["text"]]
        if any("CRASH-THE-WORKER" in text for text in texts):
            os._exit(1)  # what an OOM kill or a segfault looks like to Ray
        if any("HANG-THE-WORKER" in text for text in texts):
            time.sleep(120)
        return real_tokenize(batch, **kwargs)

    monkeypatch.setattr(encode_pipeline, "tokenize_batch", tokenize_or_kill)
    crashing = make_spec(world, out, str(corpus / "[cg]*"), task_retries=0)
    record = run_batch(crashing)
    names = {Path(uri).name: shard for uri, shard in record["shards"].items()}
    assert names["good.jsonl.gz"]["status"] == "done" and names["good.jsonl.gz"]["documents"] > 0
    crash = names["crash.jsonl"]
    assert crash["status"] == "failed" and crash["attempts"] == 1 and "died" in crash["error"].lower(), crash
    hanging = make_spec(world, out, str(corpus / "hang.jsonl"), round_timeout_s=10)
    record = run_batch(hanging)
    hang = record["shards"][str(corpus / "hang.jsonl")]
    assert hang["status"] == "failed" and hang["attempts"] == 1 and "round_timeout" in hang["error"], hang
    assert files_under(storage.join(out, "work")) == []


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


def upload_corpus(world: dict, backend: str, tmp_path: Path, request, first: int = SHARDS) -> tuple[str, str, object]:
    """The world's first `first` shards where a batch lists them; returns (glob, out, add_the_rest)."""
    shards = sorted((world["root"] / "corpus").glob("*.jsonl.gz"))
    if backend == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        corpus, out = f"s3://{bucket}/corpus/*.jsonl.gz", f"s3://{bucket}/out"

        def put(paths):
            for path in paths:
                storage.write_bytes_atomic(f"s3://{bucket}/corpus/{path.name}", path.read_bytes())
    else:
        (tmp_path / "corpus").mkdir()
        corpus, out = str(tmp_path / "corpus" / "*.jsonl.gz"), str(tmp_path / "out")

        def put(paths):
            for path in paths:
                shutil.copy(path, tmp_path / "corpus" / path.name)

    put(shards[:first])
    return corpus, out, lambda: put(shards[first:])


@pytest.mark.parametrize("stage", ["mid_round", "before_publish"])
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_killed_batch_then_rerun_equals_a_clean_run(world, backend, stage, tmp_path, request):
    """SIGKILL a batch after its first commit (no snapshot yet), or, once batch 1 published v1 from two
    shards and two more arrived, after its last commit and before its publish. A rerun serves them all."""
    corpus, out, add_the_rest = upload_corpus(
        world, backend, tmp_path, request, 2 if stage == "before_publish" else SHARDS
    )
    spec = write_spec(tmp_path / "spec.yaml", spec_values(world, out, corpus, shards_per_round=1, lease_seconds=4))
    if stage == "before_publish":
        first = run_batch(make_spec(world, out, corpus, shards_per_round=1, lease_seconds=4))
        assert first["snapshot"] == 1 and len(first["done"]) == 2
        add_the_rest()
        marker = tmp_path / "paused"
        proc = start_job(["--spec", spec, "--once"], tmp_path / "killed.log", pause_marker=marker)
        kill_before_publish(proc, marker, tmp_path / "killed.log")
        records = Catalog(out, storage.StorageOptions().resolved(), owner="test").records()
        assert len(records) == SHARDS and {r["status"] for r in records.values()} == {"done"}
        assert current_snapshot(out)["version"] == 1  # v1, from two shards, is what readers get now
    else:
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
    assert len(current_snapshot(out)["shards"]) == SHARDS
    # What the killed batch left is cleaned up: its round directory, and the version it claimed but never wrote.
    assert files_under(storage.join(out, "work")) == []
    options = storage.StorageOptions().resolved()
    versions = snapshots._versions(out, options)
    assert versions and all(
        storage.exists(storage.join(out, "snapshots", f"v{version:06d}", "manifest.json"), options)
        for version in versions
    )


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


def two_shard_corpus(world: dict, tmp_path: Path) -> tuple[str, list[str]]:
    """The world's first two shards in a corpus of their own; returns its glob and the shards' URIs."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted((world["root"] / "corpus").glob("*.jsonl.gz"))[:2]:
        shutil.copy(path, corpus / path.name)
    return str(corpus / "*.jsonl.gz"), sorted(str(path) for path in corpus.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_batch_gives_its_shards_back_without_charging_them(world, signum, tmp_path):
    """Ctrl-C (SIGINT to the job's process group) or SIGTERM while a round runs: the batch releases its
    leases on its way out, so the next batch takes the shards at once, and no attempt is counted."""
    glob, shards = two_shard_corpus(world, tmp_path)
    out = str(tmp_path / "out")
    values = spec_values(world, out, glob, max_attempts=1, lease_seconds=600)
    log, marker = tmp_path / "interrupted.log", tmp_path / "encoding"
    proc = start_job(["--spec", write_spec(tmp_path / "spec.yaml", values), "--once"], log, marker, PAUSE_IN_ROUND)
    try:
        wait_for_marker(proc, marker, log)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        kill_session(proc.pid)
    catalog = Catalog(out, storage.StorageOptions().resolved(), owner="test")
    newest = [catalog.newest(key) for key in catalog.leased_keys()]
    assert len(newest) == 2 and all(lease["released"] for lease in newest), (newest, log.read_text()[-3000:])
    assert catalog.records() == {}  # nothing recorded: no attempt counted
    assert code != 0 and "giving this batch's shards back" in log.read_text()  # then it stopped as asked
    # With leases of 600 s and a single attempt allowed, only a release lets the next batch in now.
    record = run_batch(make_spec(world, out, glob, max_attempts=1, lease_seconds=600))
    assert record["done"] == shards
    assert [r["attempts"] for r in catalog.records().values()] == [1, 1]
    assert files_under(storage.join(out, "work")) == []  # the interrupted round's directory was swept


def test_a_signal_reaches_the_previous_handler_after_the_batch_gave_its_shards_back(world, tmp_path, monkeypatch):
    """In the batch's own process: SIGTERM mid-round releases the leases, then the handler that was installed
    before the batch is put back and gets the signal; SIGINT then raises KeyboardInterrupt as usual."""
    glob, _ = two_shard_corpus(world, tmp_path)
    out = str(tmp_path / "out")
    received: list[int] = []

    def encode_then_get_signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)  # the handler raises here

    def handler(signum, frame):
        received.append(signum)

    monkeypatch.setattr(schedule_batch, "encode_shards", encode_then_get_signalled)
    sigint = signal.getsignal(signal.SIGINT)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(BatchInterrupted):
            run_batch(make_spec(world, out, glob, lease_seconds=600))
        assert received == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, previous)
    catalog = Catalog(out, None, owner="test")
    assert all(catalog.newest(key)["released"] for key in catalog.leased_keys()) and catalog.records() == {}
    assert len(catalog.leased_keys()) == 2


def test_a_first_signal_waits_for_the_shielded_step_and_a_second_cuts_in():
    steps: list[str] = []
    sigint = signal.getsignal(signal.SIGINT)
    assert sigint is signal.default_int_handler  # Python's, which raises KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):  # SIGINT's own handler, called once the batch let go
        with BatchSignals() as signals:
            with signals.shielded():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now, and held the signal
                steps.append("claim recorded")
            steps.append("never reached")
    assert steps == ["claim recorded"]
    assert signal.getsignal(signal.SIGINT) is sigint
    with pytest.raises(KeyboardInterrupt):
        with BatchSignals() as signals, signals.shielded():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            with pytest.raises(BatchInterrupted):
                os.kill(os.getpid(), signal.SIGINT)  # the operator insists
                time.sleep(0.05)
            steps.append("cut in")
    assert steps[-1] == "cut in"


def test_storage_errors_are_not_attempts_back_off_and_are_retried_after_the_outage(world, tmp_path, monkeypatch):
    """Two batches during an outage (every read raises ShardReadError) with max_attempts=2, then the store
    recovers: both shards are curated. The error is recorded as the store's, shown by --status, costs no
    attempt, and stops the batch from claiming more; a long backoff keeps the shard out until
    --retry-failed puts it back."""
    glob, (first, second) = two_shard_corpus(world, tmp_path)
    out = str(tmp_path / "out")
    real_read = reader._read_shards_udf

    def read_during_an_outage(batch, **kwargs):
        from core.reader import ShardReadError

        raise ShardReadError(f"{batch['uri'][0]}: open failed 5 attempts; last: ConnectionError: reset by peer")

    monkeypatch.setattr(reader, "_read_shards_udf", read_during_an_outage)
    spec = make_spec(world, out, glob, max_attempts=2, storage_backoff_s=0)
    for _ in range(2):
        record = run_batch(spec)
        # The round failed; run alone, the first shard met the outage and the second was given back untried.
        assert record["storage_errors"] == [first] and record["given_back"] == [second] and record["failed"] == []
    catalog = Catalog(out, None, owner="test")
    stored = catalog.record(shard_key(first))
    assert stored["status"] == "storage_error" and stored["attempts"] == 0 and stored["storage_errors"] == 2
    assert stored["error"].startswith("ShardReadError: ") and "reset by peer" in stored["error"]
    assert catalog.record(shard_key(second)) is None
    status = spec_status(spec)
    assert status["failed"] == [] and [row["shard"] for row in status["storage_errors"]] == [first]
    assert "storage error (2 in a row, not counted; retried after " in format_status(status)

    # A third error with a long backoff: the shard is left out of the batches that follow until put back.
    waiting = make_spec(world, out, glob, max_attempts=2, storage_backoff_s=3600)
    assert run_batch(waiting)["storage_errors"] == [first]
    assert catalog.record(shard_key(first))["retry_after"] > time.time() + 4 * 3600 - 60  # doubled twice
    monkeypatch.setattr(reader, "_read_shards_udf", real_read)  # the store is back
    record = run_batch(waiting)
    assert record["done"] == [second] and record["waiting_after_storage_error"] == [first]
    assert retry_failed(waiting)["reset"] == [first]
    record = run_batch(waiting)
    assert record["done"] == [first] and catalog.record(shard_key(first))["attempts"] == 1
    assert {r["status"] for r in catalog.records().values()} == {"done"}


def test_retry_failed_puts_shards_out_of_attempts_back(world, poisoned, tmp_path):
    """`jobs.schedule --retry-failed` resets the attempts of the shards that ran out of them; the next
    batch tries them again and counts afresh."""
    out = tmp_path / "out"
    shutil.copytree(poisoned["out"], out)
    corpus = str(poisoned["root"] / "corpus" / "*")
    values = {**json.loads(json.dumps(poisoned["spec"].__dict__)), "out": str(out)}
    spec_file = write_spec(tmp_path / "spec.yaml", values)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.schedule", "--spec", spec_file, "--retry-failed"], cwd=REPO, env=job_env(),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "put back 2 failed shards" in result.stdout
    records = Catalog(str(out), None, owner="test").records()
    put_back = [r for r in records.values() if r["status"] == "pending"]
    assert len(put_back) == 2 and all(r["attempts"] == 0 and r["previous_status"] == "failed" for r in put_back)
    spec = make_spec(world, str(out), corpus, max_attempts=2)
    assert spec_status(spec)["pending"] == 2
    record = run_batch(spec)
    assert sorted(Path(uri).name for uri in record["failed"]) == ["broken.jsonl.gz", "notjson.jsonl"]
    assert {shard["attempts"] for shard in record["shards"].values()} == {1}
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.schedule", "--spec", spec_file, "--retry-failed", "--once"], cwd=REPO,
        env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "retry_failed" in refused.stderr


def test_retry_failed_leaves_a_shard_a_batch_holds(tmp_path):
    root, options = str(tmp_path / "out"), storage.StorageOptions().resolved()
    held, free = (storage.FileInfo(str(tmp_path / f"{name}.jsonl"), 10, 1.0) for name in ("held", "free"))
    batch = Catalog(root, options, owner="batch", lease_seconds=120)
    for info in (held, free):
        batch.commit_failed(batch.try_claim(info, 3), info, "boom")
    holder = batch.try_claim(held, 3)  # a batch is retrying it right now
    reset, busy = Catalog(root, options, owner="operator").reset_failed()
    assert reset == [free.uri] and busy == [held.uri]
    assert batch.record(shard_key(held.uri))["status"] == "failed" and batch.holds(holder)
    assert batch.record(shard_key(free.uri))["attempts"] == 0


# Every field of a spec that the identity leaves out: the scheduling and execution settings, the paths
# (seeds and the SAE count by content), and the encode's batch sizes and device. Adding a field to a spec
# either puts it in the identity (and SCORED_EXAMPLES below must show it changes the identity) or here.
UNSCORED = {
    "corpus", "out", "seeds", "sae", "name", "gpus", "batch_size", "max_batch_tokens", "max_batch_rows",
    "shards_per_round", "max_shards_per_batch", "lease_seconds", "max_attempts", "max_bad_line_fraction",
    "interval_s", "keep_snapshots", "settle_seconds", "task_retries", "round_timeout_s", "storage_backoff_s",
    # CurateConfig's and RunConfig's execution_fields
    "actors", "cpus", "threads", "read_attempts", "read_backoff_s", "s3_endpoint",
    "s3_region", "ray_address", "force",
}  # fmt: skip
SCORED_EXAMPLES = {
    "rule": "global_topn", "top_n": 3, "threshold": 0.5, "max_tokens": 128, "pooling": "mean",
    "weighting": "none", "dtype": "float32", "min_chars": 5, "max_chars": 100, "too_long": "reject",
}  # fmt: skip


def test_spec_identity_holds_every_setting_that_changes_a_score(tmp_path):
    import dataclasses

    sae = tmp_path / "sae"
    sae.mkdir()
    for name, body in {"cfg.json": "{}", "sae.safetensors": "weights", "latent_stats.json": '{"docs": 3}'}.items():
        (sae / name).write_text(body)
    (tmp_path / "seeds.jsonl").write_text('{"text": "a seed"}\n')
    base = ScheduleSpec(corpus=["c/*"], seeds=str(tmp_path / "seeds.jsonl"), sae=str(sae), out=str(tmp_path / "o"),
                        scorer="nearest")  # fmt: skip
    identity = spec_identity(base, "tiny")
    fields = {field.name for field in dataclasses.fields(ScheduleSpec)}
    # `scorer` at `nearest` (and no feedback) is left out: roots bound before there was a choice keep their identity.
    assert set(identity["settings"]) == {*SCORED_EXAMPLES, "model"}
    assert fields - set(identity["settings"]) == UNSCORED | {"scorer", "feedback"}
    (sae / "latent_sample.parquet").write_text("codes")
    default = dataclasses.replace(base, scorer=ScheduleSpec.scorer, feedback=None)  # classifier, feedback unset
    learned = spec_identity(default, "tiny")
    assert learned["settings"]["scorer"] == "classifier" and learned["settings"]["feedback"] is None
    assert "latent_sample.parquet" in learned["sae_sha256"]  # unset feedback resolves from the sample
    # A root bound by a spec that named no scorer before the classifier became the default stays nearest's.
    bind_output(base, identity, StorageOptions())
    with pytest.raises(ConfigError) as caught:
        bind_output(default, learned, StorageOptions())
    assert "changed: scorer, sae latent_sample.parquet" in str(caught.value)
    fed = spec_identity(dataclasses.replace(default, feedback=40), "tiny")
    assert fed["settings"]["feedback"] == 40 and identity_hash(fed) != identity_hash(learned)
    assert "latent_sample.parquet" not in identity["sae_sha256"]
    assert identity["settings"]["dtype"] == "auto"  # resolved by each encode worker, after the identity is bound
    hashed = identity_hash
    for name, value in SCORED_EXAMPLES.items():
        assert hashed(spec_identity(dataclasses.replace(base, **{name: value}), "tiny")) != hashed(identity), name
    assert hashed(spec_identity(base, "another-model")) != hashed(identity)
    for name in UNSCORED - {"corpus", "out", "seeds", "sae", "name", "s3_endpoint", "s3_region", "ray_address"}:
        value = getattr(base, name)
        changed = (not value) if isinstance(value, bool) else value * 2 if value else 1
        assert spec_identity(dataclasses.replace(base, **{name: changed}), "tiny") == identity, name
    # The seeds and the SAE count by content: a copy elsewhere is the same spec, an edited file is not.
    shutil.copytree(sae, tmp_path / "copy")
    assert spec_identity(dataclasses.replace(base, sae=str(tmp_path / "copy")), "tiny") == identity
    for edited in ("latent_stats.json", "cfg.json", "sae.safetensors"):
        (tmp_path / "copy" / edited).write_text("changed")
        assert spec_identity(dataclasses.replace(base, sae=str(tmp_path / "copy")), "tiny") != identity, edited
    (tmp_path / "seeds.jsonl").write_text('{"text": "another seed"}\n')
    assert spec_identity(base, "tiny") != identity


def test_a_changed_scoring_setting_needs_a_new_output_root(world, tmp_path):
    """Batch 1 scored with `weighting: idf` and the default classifier; a spec with `weighting: none`, or
    `pooling: mean` and the nearest seed, or an SAE whose latent_stats.json changed, is refused on its output
    root instead of mixing score scales."""
    out = str(tmp_path / "out")
    shutil.copytree(world["root"] / "clean", out)
    with pytest.raises(ConfigError) as caught:
        run_batch(make_spec(world, out, weighting="none"))
    assert caught.value.field == "out" and "changed: weighting, sae latent_stats.json" in str(caught.value)
    with pytest.raises(ConfigError) as caught:  # the classifier's corpus sample was pooled by rate
        run_batch(make_spec(world, out, pooling="mean"))
    assert caught.value.field == "pooling" and "--pooling rate" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        run_batch(make_spec(world, out, pooling="mean", scorer="nearest"))
    message = str(caught.value)
    assert caught.value.field == "out" and "changed: pooling, scorer, sae latent_sample.parquet" in message
    sae = tmp_path / "sae"
    shutil.copytree(world["sae"], sae)
    stats = json.loads((sae / "latent_stats.json").read_text())
    stats["docs"] += 1
    (sae / "latent_stats.json").write_text(json.dumps(stats))
    with pytest.raises(ConfigError, match="changed: sae latent_stats.json"):
        run_batch(make_spec({**world, "sae": str(sae)}, out))
    # The same SAE elsewhere, and other scheduling, are the same spec: nothing new is due.
    shutil.copy(Path(world["sae"]) / "latent_stats.json", sae / "latent_stats.json")
    record = run_batch(make_spec({**world, "sae": str(sae)}, out, shards_per_round=1, batch_size=8))
    assert record["shards"] == {} and record["snapshot"] == 1
    # An output root bound by an earlier identity, which left these settings out, is refused too.
    bound = json.loads((Path(out) / "spec.json").read_text())
    bound["identity"] = {"seeds_sha256": "x", "model": "tiny", "selection": {}}
    bound["id"] = identity_hash(bound["identity"])
    (Path(out) / "spec.json").write_text(json.dumps(bound))
    with pytest.raises(ConfigError, match="written by an earlier FineScope"):
        run_batch(make_spec(world, out))


def test_stray_snapshot_names_are_ignored_logged_once_and_never_removed(world, tmp_path, caplog):
    """A directory made by hand under snapshots/ (`vX`, `v12`, `old`) neither crashes a batch nor counts as
    a version, and no pruning or sweep removes it."""
    out = tmp_path / "out"
    shutil.copytree(world["root"] / "clean", out)
    for name in ("vX", "v12", "old"):
        (out / "snapshots" / name).mkdir()
    spec = make_spec(world, str(out), keep_snapshots=1)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            assert run_batch(spec)["snapshot"] == 1
    stray = [r.getMessage() for r in caplog.records if "is not a snapshot version" in r.getMessage()]
    assert len(stray) == 3 and any("/snapshots/vX" in message for message in stray)
    assert snapshots._versions(str(out), None) == [1]
    assert snapshots._claim_version(str(out), None) == 2
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["old", "v000001", "v000002", "v12", "vX"]


def test_a_root_keeps_the_encode_dtype_its_first_batch_decided(tmp_path):
    """`dtype: auto` is bfloat16 on a CPU with fast bf16 and float32 elsewhere: a root scored in one must
    not take a batch scored in the other, whose scores sit on another scale."""
    from curation.schedule.spec import DTYPE_FILE, bind_dtype

    options = StorageOptions()
    fp32 = {"asked": "auto", "device": "cpu", "dtype": "float32", "cpu_bf16_flags": []}
    bind_dtype(str(tmp_path), fp32, options)
    bind_dtype(str(tmp_path), {"asked": "float32", "device": "cpu", "dtype": "float32"}, options)  # same scale
    bf16 = {"asked": "auto", "device": "cpu", "dtype": "bfloat16", "bf16_matmul_speedup": 5.9}
    with pytest.raises(ConfigError) as error:
        bind_dtype(str(tmp_path), bf16, options)
    assert error.value.field == "dtype" and "set dtype: float32" in str(error.value)
    assert json.loads((tmp_path / DTYPE_FILE).read_text())["decided"] == fp32
