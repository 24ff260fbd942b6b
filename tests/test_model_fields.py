"""Every stage's model fields take every form of model reference at validation (its `plan`, before Ray
starts), read no weights to do so, and fold the model's identity into the stage's digest."""

from __future__ import annotations

import gzip
import json
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import storage
from core.errors import ConfigError
from curation.sae import train
from pipeline.spec import PipelineSpec
from training.distillation import distill
from training.evaluation import evaluate
from training.finetuning import finetune
from training.pruning import prune

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def data(tmp_path) -> dict[str, str]:
    corpus = tmp_path / "corpus.jsonl.gz"
    corpus.write_bytes(gzip.compress(b"".join(json.dumps({"text": f"w{i} w{i + 1} the cat"}).encode() + b"\n"
                                              for i in range(20))))  # fmt: skip
    pq.write_table(pa.table({"text": [f"w{i} the cat sat on the mat" for i in range(20)]}), tmp_path / "domain.parquet")
    rows = [{"id": f"r{i}", "prompt": f"w{i}", "response": f"w{i + 100}"} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "distilled.parquet")
    return {name: str(tmp_path / name) for name in ("corpus.jsonl.gz", "domain.parquet", "distilled.parquet")}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "finescope-cache"
    monkeypatch.setenv("FINESCOPE_CACHE", str(root))
    return root


def plan_digests(model: str, data: dict[str, str], out) -> dict[str, str]:
    """Each stage's plan with `model` in its model fields: the digests."""
    return {
        "sae": train.plan(train.TrainSAEConfig(corpus=[data["corpus.jsonl.gz"]], out=str(out / "sae"), model=model,
                                               layer=1)).digest,
        "prune": prune.plan(prune.PruneConfig(model=model, data=data["domain.parquet"], out=str(out / "pruned"),
                                              method="magnitude", ratio=0.25, channel_multiple=8)).digest,
        "distill": distill.plan(distill.DistillConfig(data=data["domain.parquet"], teacher=model,
                                                      out=str(out / "distilled"), max_new_tokens=8)).digest,
        "finetune": finetune.plan(finetune.FinetuneConfig(model=model, teacher=model, kd_weight=0.5,
                                                          data=data["distilled.parquet"], out=str(out / "ft"),
                                                          actors=1)).digest,
        "evaluate": evaluate.plan(evaluate.EvaluateConfig(models=[f"m={model}"], ppl=[data["domain.parquet"]],
                                                          out=str(out / "eval"))).digest,
    }  # fmt: skip


def test_every_stage_validates_a_model_on_s3_and_its_digest_follows_the_object_set(
    s3_bucket, tiny_model_dir, data, cache, tmp_path
):
    uri = f"s3://{s3_bucket}/models/base"
    storage.upload_dir(tiny_model_dir, uri)
    first = plan_digests(uri, data, tmp_path)
    assert not cache.exists()  # validation copied nothing: it listed the prefix and read config.json

    assert plan_digests(uri, data, tmp_path) == first  # the same objects, the same runs
    config = json.loads(storage.open_read(f"{uri}/config.json").read())
    time.sleep(1.1)  # S3 keeps whole-second modification times
    storage.write_json_atomic(f"{uri}/config.json", {**config, "initializer_range": 0.03})
    second = plan_digests(uri, data, tmp_path)
    assert [stage for stage in first if first[stage] == second[stage]] == []


def test_every_stage_validates_a_hub_id_from_the_hub_cache(tiny_model_dir, data, tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = plan_digests("org/tiny", data, tmp_path)
    assert plan_digests("org/tiny", data, tmp_path) == first
    moved = "f" * 40  # main moves to a new commit: every stage runs again
    shutil.copytree(repo / "snapshots" / COMMIT, repo / "snapshots" / moved)
    (repo / "refs" / "main").write_text(moved)
    second = plan_digests("org/tiny", data, tmp_path)
    assert [stage for stage in first if first[stage] == second[stage]] == []
    assert plan_digests(f"org/tiny@{COMMIT}", data, tmp_path)  # a pinned commit still resolves
    with pytest.raises(ConfigError) as error:
        prune.plan(prune.PruneConfig(model="org/absent", data=data["domain.parquet"], out=str(tmp_path / "p")))
    assert error.value.field == "model" and "HF_HUB_OFFLINE" in error.value.fix
    assert "hf download org/absent" in error.value.fix


def test_a_finetune_teacher_missing_from_the_hub_cache_names_the_teacher(tiny_model_dir, data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = finetune.FinetuneConfig(model=tiny_model_dir, teacher="org/teacher@v2", kd_weight=0.5,
                                     data=data["distilled.parquet"], out=str(tmp_path / "ft"))  # fmt: skip
    with pytest.raises(ConfigError) as error:
        finetune.plan(config)
    assert error.value.field == "teacher" and "hf download org/teacher --revision v2" in error.value.fix


def test_the_pipeline_spec_takes_every_form_and_refuses_none(tmp_path):
    for model in ("smollm2-135m", "org/name@main", "s3://bucket/models/base"):
        spec = PipelineSpec(root=str(tmp_path / "run"), model=model, corpus=["c.jsonl"], seeds="s.jsonl",
                            domains={"maths": {}})  # fmt: skip
        assert spec.model == model
    with pytest.raises(ConfigError) as error:
        PipelineSpec(root=str(tmp_path / "run"), teacher="gs://bucket/t", corpus=["c.jsonl"], seeds="s.jsonl",
                     domains={"maths": {}})  # fmt: skip
    assert error.value.field == "teacher" and "s3://" in error.value.fix
