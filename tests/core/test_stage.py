"""The stage contract (core.stage): what a stage may clear, what it never touches, skip and resume.

A toy stage (no Ray) covers the rules on local disk and on S3; real stages show that each job takes the
same road: a directory a job did not write, or that holds its inputs, is refused and left as it was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers import job_env, write_corpus

from core import manifest, storage
from core.errors import ConfigError
from core.runtime import RunConfig
from core.stage import MARKER, FilesPlan, Outcome, Stage, claim_output, run_stage

pytestmark = pytest.mark.timeout(300)


@dataclass
class ToyConfig(RunConfig):
    data: str = ""
    out: str = ""
    value: int = 1
    crash: bool = False


def _plan(config: ToyConfig) -> FilesPlan:
    inputs = storage.expand(config.data) if config.data else []
    return FilesPlan(inputs, config.digest(inputs))


def _work(config: ToyConfig, plan: FilesPlan, timer: manifest.Timer) -> Outcome:
    options = config.storage_options()
    fs, path = storage.filesystem(config.out, options)
    seen = sorted(name.rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))
    storage.write_json_atomic(storage.join(config.out, "result.json"), {"value": config.value}, options)
    storage.write_bytes_atomic(storage.join(config.out, "parts", f"part-{config.value}"), b"x", options)
    if config.crash:
        raise RuntimeError("crash")
    return Outcome({"value": config.value}, {"seen_at_start": seen})


TOY = Stage("toy", _plan, _work, reads=lambda config: [config.data], keep=("parts",), uses_ray=False)


def _toy(out, **settings) -> dict:
    return run_stage(TOY, ToyConfig(out=str(out), **settings))


def test_a_directory_the_stage_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(ConfigError) as error:
        _toy(out)
    assert error.value.field == "out" and "NOTES.txt" in str(error.value) and "nothing was touched" in str(error.value)
    assert sorted(os.listdir(out)) == ["NOTES.txt"] and (out / "NOTES.txt").read_text() == "mine"


def test_another_stages_output_is_refused_naming_that_stage(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"stage": "curate", "hash": "x"}))
    (out / "curated").mkdir()
    with pytest.raises(ConfigError) as error:
        _toy(out)
    assert "`curate`" in str(error.value) and (out / "curated").is_dir()


def test_its_own_finished_output_is_skipped_then_cleared_for_a_new_config(tmp_path):
    out = tmp_path / "out"
    first = _toy(out, value=1)
    assert first["stage"] == "toy" and first["counts"] == {"value": 1} and not (out / MARKER).exists()
    assert _toy(out, value=1)["finished_at"] == first["finished_at"]  # skipped: same config, same inputs
    second = _toy(out, value=2)
    assert second["hash"] != first["hash"] and second["seen_at_start"] == [MARKER]  # nothing of run 1 left
    assert sorted(os.listdir(out / "parts")) == ["part-2"]


def test_an_interrupted_run_resumes_from_what_it_keeps_and_a_changed_one_starts_clean(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        _toy(out, value=1, crash=True)
    assert json.loads((out / MARKER).read_text())["stage"] == "toy" and not (out / "manifest.json").exists()
    resumed = _toy(out, value=1, crash=False)  # `crash` changes the digest: a different run
    assert resumed["seen_at_start"] == [MARKER]
    with pytest.raises(RuntimeError):
        _toy(out, value=3, crash=True)
    (out / "parts" / "part-extra").write_bytes(b"y")
    (out / "stale.txt").write_text("left by the interrupted run")
    with pytest.raises(RuntimeError):
        _toy(out, value=3, crash=True)  # the same run again: parts/ kept, everything else cleared first
    assert sorted(os.listdir(out / "parts")) == ["part-3", "part-extra"] and not (out / "stale.txt").exists()


def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text("{}\n")
    for out, relation in ((data, "is"), (tmp_path, "holds"), (data / "sub", "lies inside")):
        with pytest.raises(ConfigError) as error:
            _toy(out, data=str(data))
        assert error.value.field == "out" and f"{relation} {data}" in str(error.value)
    link = tmp_path / "link"
    link.symlink_to(data)
    with pytest.raises(ConfigError):
        _toy(link, data=str(data / "*.jsonl"))  # a symlink to the input, and the input given as a glob
    assert sorted(os.listdir(data)) == ["rows.jsonl"]


def test_other_finescope_outputs_nested_inside_are_never_cleared(tmp_path):
    out = tmp_path / "out"
    _toy(out, value=1)
    nested = out / "pruned"
    nested.mkdir()
    (nested / "manifest.json").write_text(json.dumps({"stage": "prune"}))
    with pytest.raises(ConfigError) as error:
        _toy(out, value=2)
    assert "pruned/manifest.json" in str(error.value) and (nested / "manifest.json").is_file()


def test_on_s3_a_foreign_prefix_is_refused_and_an_own_one_is_cleared(s3_bucket):
    out = f"s3://{s3_bucket}/team/run"
    storage.write_bytes_atomic(f"{out}/NOTES.txt", b"mine")
    with pytest.raises(ConfigError):
        _toy(out)
    assert storage.exists(f"{out}/NOTES.txt")
    own = f"s3://{s3_bucket}/team/own"
    _toy(own, value=1)
    assert _toy(own, value=2)["seen_at_start"] == [MARKER]
    assert storage.exists(f"s3://{s3_bucket}/team/run/NOTES.txt")


# Real jobs -----------------------------------------------------------------------------------------------


def _job(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=240)  # fmt: skip


def test_jobs_refuse_an_out_they_did_not_write_with_exit_2(tmp_path, tiny_model_dir):
    """evaluate into a directory of notes; train_sae into the directory of its own corpus."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "NOTES.txt").write_text("mine")
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    done = _job(["jobs.evaluate", "--models", f"base={tiny_model_dir}", "--mmlu", "", "--ppl", str(ppl),
                 "--out", str(notes)])  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "out=" in done.stderr and "NOTES.txt" in done.stderr and (notes / "NOTES.txt").read_text() == "mine"
    corpus = write_corpus(tmp_path / "corpus", shards=2, background_docs=4, bad_rows=False)
    before = sorted(os.listdir(tmp_path / "corpus"))
    done = _job(["jobs.train_sae", "--corpus", str(tmp_path / "corpus" / "*.jsonl.gz"), "--model", tiny_model_dir,
                 "--layer", "1", "--seeds", corpus["seeds"], "--out", str(tmp_path / "corpus")])  # fmt: skip
    assert done.returncode == 2 and "which this stage reads" in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "corpus")) == before


def test_finetune_refuses_an_out_that_holds_its_model(tmp_path, tiny_model_dir):
    from training.finetuning.finetune import FinetuneConfig, run_finetune

    run = tmp_path / "X"
    model = run / "model"
    model.mkdir(parents=True)
    for name in os.listdir(tiny_model_dir):
        (model / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    data = tmp_path / "distilled"
    data.mkdir()
    pq.write_table(pa.table({"prompt": ["a"] * 4, "response": ["b"] * 4}), data / "part.parquet")
    config = FinetuneConfig(model=str(model), data=str(data), out=str(run), micro_batch=1, actors=1)
    with pytest.raises(ConfigError) as error:
        run_finetune(config)
    assert error.value.field == "out" and "holds" in str(error.value)
    assert sorted(os.listdir(model)) == sorted(os.listdir(tiny_model_dir))


def test_a_pipeline_root_is_never_cleared_by_a_stage(tmp_path):
    """`jobs.curate --out runs/demo` would otherwise wipe a whole pipeline run."""
    root = tmp_path / "demo"
    (root / "curate").mkdir(parents=True)
    (root / "pipeline.json").write_text("{}")
    with pytest.raises(ConfigError) as error:
        claim_output(str(root), "curate", "abc", None)
    assert "root of a pipeline" in str(error.value)
    assert sorted(os.listdir(root)) == ["curate", "pipeline.json"]
