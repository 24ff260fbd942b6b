"""The whole pipeline as one job (`jobs.pipeline`), as jobs/configs/pipeline-s3.yaml runs it on a cluster:
every path on S3 (moto's server: the corpus, the seeds, the base model, MMLU and the root every step writes
under), submitted with `ray job submit` to a two-node cluster whose head has no GPU and whose worker node
advertises two, with that spec's GPU settings. `FINESCOPE_FORCE_CPU=1` lets the GPU workers run on this
machine's CPU (core.placement), and `FINESCOPE_LOAD_LOG` records where each model was loaded. The tests
check every stage's outputs, where every model was loaded, the skip on rerun, the rerun of exactly the
steps downstream of a changed setting, and the same domain run by hand. A tiny Llama and a tiny corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO
from helpers import gpu_settings, job_env, ray_cluster, submit_job, write_corpus, write_spec

from core import storage
from core.errors import ConfigError
from core.placement import FORCE_CPU, LOAD_LOG
from curation.split import heldout_mask
from pipeline import build_steps, load_spec

pytestmark = pytest.mark.timeout(900)

ALL_STEPS = {
    "sae", "curate", "split/maths", "distill/maths", "distill-random/maths", "prune/maths/0.30",
    "finetune/maths/0.30", "finetune-random/maths/0.30", "evaluate/maths",
}  # fmt: skip


def finished_at(run: str) -> dict[str, str]:
    """Each step's stage manifest timestamp: it changes exactly when the stage wrote its output again."""
    state = storage.read_json(storage.join(run, "pipeline.json"))
    return {name: storage.read_json(storage.join(r["out"], "manifest.json"))["finished_at"]
            for name, r in state["steps"].items()}  # fmt: skip


def _upload(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(storage.join(uri, *path.relative_to(local).parts), path.read_bytes())


def run_driver(spec: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The pipeline from a driver of its own that joins the cluster in `env`'s RAY_ADDRESS."""
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--spec", str(spec)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=800,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dir, s3_server):
    """The pipeline run once through `ray job submit` on the two-node cluster, every path on S3; the cluster
    stays up for the module's reruns (their drivers join it directly). `run` is a local copy of the S3 root
    as the first run left it, for reading; `s3_run` the root itself."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = write_corpus(root / "corpus")
    bucket = f"s3://fs-pipeline-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=storage.strip_scheme(bucket))
    _upload(root / "corpus", f"{bucket}/corpus")
    _upload(Path(tiny_model_dir), f"{bucket}/models/tiny")
    storage.write_bytes_atomic(f"{bucket}/seeds.jsonl", Path(corpus["seeds"]).read_bytes())
    write_spec(root, tiny_model_dir, corpus, "unused")  # writes the MMLU file beside it
    storage.write_bytes_atomic(f"{bucket}/mmlu.jsonl", (root / "mmlu.jsonl").read_bytes())
    top = {"root": f"{bucket}/run", "model": f"{bucket}/models/tiny", "seeds": f"{bucket}/seeds.jsonl"}
    spec = write_spec(root, f"{bucket}/models/tiny", corpus, f"{bucket}/corpus/*.jsonl.gz", top=top,
                      evaluate__mmlu_file=f"{bucket}/mmlu.jsonl", **GPU_CHANGES)  # fmt: skip
    log = root / "loads.jsonl"
    env = {**job_env(), FORCE_CPU: "1", LOAD_LOG: str(log)}
    with ray_cluster(env, worker_gpus=2) as cluster:
        submit = submit_job(cluster["dashboard"], ["jobs.pipeline", "--spec", str(spec)], env, timeout=800)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        run = Path(storage.local_copy(f"{bucket}/run"))
        yield {"root": root, "run": run, "s3_run": f"{bucket}/run", "corpus": corpus, "spec": spec,
               "glob": f"{bucket}/corpus/*.jsonl.gz", "stdout": submit.stdout, "loads": log, "bucket": bucket,
               "gpu_node": cluster["gpu_node"], "driver_env": {**env, "RAY_ADDRESS": cluster["gcs"]}}  # fmt: skip


# Every GPU setting of the shipped GPU pipeline; one fine-tuning worker shows where they go (several are
# tested in tests/training/test_finetune.py).
GPU_CHANGES = {
    **{f"{stage}__{key}": value for stage, keys in gpu_settings().items() for key, value in keys.items()},
    "finetune__actors": 1,
}


def test_pipeline_through_ray_job_submit_writes_every_stage(pipeline_run, tiny_model_dir):
    run, stdout = pipeline_run["run"], pipeline_run["stdout"]
    assert "succeeded" in stdout and "joining Ray" in stdout
    state = json.loads((run / "pipeline.json").read_text())
    assert set(state["steps"]) == ALL_STEPS
    assert {r["status"] for r in state["steps"].values()} == {"ran"}
    for name, record in state["steps"].items():  # every step wrote its output, manifest last, on S3
        assert record["out"].startswith(pipeline_run["s3_run"] + "/"), name
        assert storage.read_json(storage.join(record["out"], "manifest.json"))["hash"] == record["stage_hash"]

    assert (run / "sae" / "sae.safetensors").is_file()
    curated = pq.read_table(run / "curate" / "curated").to_pylist()
    maths = {row["id"] for row in curated if row["domain"] == "maths"}
    assert len(maths) == 4  # two seeds, top 2 each, all planted maths documents
    train = pq.read_table(run / "maths" / "split" / "train").column("id").to_pylist()
    heldout = pq.read_table(run / "maths" / "split" / "heldout").column("id").to_pylist()
    control = pq.read_table(run / "maths" / "split" / "random").to_pylist()
    assert set(train) | set(heldout) == maths and not set(train) & set(heldout) and heldout
    assert len(control) == len(train) and not {row["id"] for row in control} & maths

    pruned = json.loads((run / "maths" / "pruned-0.30" / "config.json").read_text())
    base = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert pruned["intermediate_size"] < base["intermediate_size"]
    report = json.loads((run / "maths" / "pruned-0.30" / "prune_report.json").read_text())
    assert report["ratio_achieved"] == pytest.approx(0.3, abs=0.1)

    for name, domain, source in (("distilled", "maths", train), ("distilled-random", "random", control)):
        rows = pq.read_table(run / "maths" / name / "distilled").to_pylist()
        assert 1 <= len(rows) <= len(source) and all(row["response"] for row in rows)
        assert {row["domain"] for row in rows} == {domain}
    for name in ("finetuned-0.30", "finetuned-random-0.30"):
        out = run / "maths" / name
        assert (
            json.loads((out / "model" / "config.json").read_text())["intermediate_size"] == pruned["intermediate_size"]
        )
        assert [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    results = json.loads((run / "maths" / "eval" / "results.json").read_text())
    labels = [model["label"] for model in results["models"]]
    assert labels == ["base", "pruned-0.30", "finescope-0.30", "random-0.30"]
    assert results["mmlu"]["sample"]["questions"] == 8
    name = "maths: curated rows held out (FineScope's own choices)"
    assert list(results["perplexity"]) == [name]
    assert results["perplexity"][name]["documents"] == len(heldout)

    top = (run / "report.md").read_text()
    for label in labels:
        assert f"| {label} |" in top
    decided = json.loads((run / "curate" / "manifest.json").read_text())["dtype"]
    assert f"Curation encoded in {decided['dtype']} on cpu (auto: " in top  # what auto became, in the report
    for link in ("curate/report.md", "maths/pruned-0.30/prune_report.json", "maths/eval/report.md",
                 "maths/finetuned-0.30/metrics.jsonl"):  # fmt: skip
        assert f"]({link})" in top and (run / link).is_file()
    assert "| finescope-0.30 |" in stdout  # the job ends by printing the comparison table


def _flags(settings: dict) -> list[str]:
    """A spec section's settings as the flags of its stage's job."""
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def _by_hand(job: str, env: dict[str, str], *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"jobs.{job}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, f"jobs.{job}: {done.stderr[-3000:]}"


def _rows(path: Path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda row: row["id"])


def test_one_domain_by_hand_gives_the_pipelines_outputs(pipeline_run, tiny_model_dir, tmp_path):
    """docs/pipeline.md, "One domain by hand": the jobs run one by one with the spec's settings write what the
    pipeline's steps for that domain wrote (it runs before the test below changes the spec)."""
    run, env, hand = pipeline_run["run"], pipeline_run["driver_env"], tmp_path / "hand"
    spec = yaml.safe_load(pipeline_run["spec"].read_text())
    _by_hand("split", env, "--curated", str(run / "curate"), "--domain", "maths", "--out", str(hand / "split"))
    for part in ("train", "heldout", "random"):
        assert _rows(hand / "split" / part) == _rows(run / "maths" / "split" / part), part
    _by_hand("prune", env, "--model", tiny_model_dir, "--data", str(hand / "split"), "--ratio", "0.3",
             *_flags(spec["prune"]), "--out", str(hand / "pruned"))  # fmt: skip
    pruned = run / "maths" / "pruned-0.30"
    assert (hand / "pruned" / "model.safetensors").read_bytes() == (pruned / "model.safetensors").read_bytes()
    _by_hand("distill", env, "--data", str(hand / "split" / "train"), "--teacher", tiny_model_dir,
             *_flags(spec["distill"]), "--out", str(hand / "distilled"))  # fmt: skip
    columns = ("id", "prompt", "original", "teacher", "accepted", "reason", "response")
    mine, theirs = _rows(hand / "distilled" / "distilled"), _rows(run / "maths" / "distilled" / "distilled")
    assert [[row[c] for c in columns] for row in mine] == [[row[c] for c in columns] for row in theirs]
    _by_hand("finetune", env, "--model", str(hand / "pruned"), "--data", str(hand / "distilled"),
             *_flags(spec["finetune"]), "--out", str(hand / "finetuned"))  # fmt: skip
    losses = [[row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
              for out in (hand / "finetuned", run / "maths" / "finetuned-0.30")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) > 1


def test_gpu_pipeline_loads_every_model_on_the_gpu_node_and_none_in_the_driver(pipeline_run):
    loads = [json.loads(line) for line in pipeline_run["loads"].read_text().splitlines()]
    assert not [row for row in loads if row["driver"]]
    assert {row["node"] for row in loads} == {pipeline_run["gpu_node"]}
    assert {row["device"] for row in loads} == {"cpu"}
    run = pipeline_run["s3_run"]
    by_what: dict[str, int] = {}
    for row in loads:
        by_what[row["what"]] = by_what.get(row["what"], 0) + 1
    # SAE coordinates, SAE activations, the seeds, curation's encoder, pruning, the teachers (both arms) and
    # the base model's evaluation each load the base model (on S3) once (the teacher once per actor).
    assert by_what[f"{pipeline_run['bucket']}/models/tiny"] >= 8
    assert by_what["sae-trainer"] == 1
    pruned = f"{run}/maths/pruned-0.30"
    assert by_what[pruned] >= 3  # both arms' fine-tuning (and export), and the pruned model's evaluation
    finetuned = {what for what in by_what if what.startswith(f"{run}/maths/") and what != pruned}
    assert {what.removeprefix(f"{run}/maths/").split("/")[0] for what in finetuned} == {
        "finetuned-0.30", "finetuned-random-0.30"
    }  # fmt: skip
    tasks = {row["task"] or "" for row in loads}
    for part in ("EncodeDocuments", "_prune_and_save", "_train_and_save", "_choose_coords", "_encode_seeds"):
        assert any(part in task for task in tasks), (part, tasks)


def test_rerun_skips_and_a_changed_setting_reruns_exactly_its_dependents(pipeline_run):
    run = pipeline_run["s3_run"]
    before = finished_at(run)

    env = pipeline_run["driver_env"]
    run_driver(pipeline_run["spec"], env)  # nothing changed: every step is skipped without being called
    state = storage.read_json(storage.join(run, "pipeline.json"))
    assert {r["status"] for r in state["steps"].values()} == {"skipped"}
    assert finished_at(run) == before

    spec = yaml.safe_load(pipeline_run["spec"].read_text())
    spec["prune"]["method"] = "magnitude"
    changed_spec = pipeline_run["root"] / "magnitude.yaml"
    changed_spec.write_text(yaml.safe_dump(spec))
    run_driver(changed_spec, env)
    after = finished_at(run)
    changed = {name for name in ALL_STEPS if after[name] != before[name]}
    assert changed == {"prune/maths/0.30", "finetune/maths/0.30", "finetune-random/maths/0.30", "evaluate/maths"}
    state = storage.read_json(storage.join(run, "pipeline.json"))
    assert {n for n, r in state["steps"].items() if r["status"] == "ran"} == changed
    report = storage.read_json(storage.join(run, "maths", "pruned-0.30", "prune_report.json"))
    assert report["method"] == "magnitude"


def test_spec_errors_name_the_field(tmp_path, tiny_model_dir):
    corpus = {"seeds": str(tmp_path / "seeds.jsonl")}
    good = write_spec(tmp_path, tiny_model_dir, corpus, "c/*.jsonl.gz")
    assert len(build_steps(load_spec(str(good)))) == len(ALL_STEPS)
    cases = [
        ({"prune__ratio": 0.5}, "prune.ratio"),  # the ratio comes from `ratios`
        ({"finetune__zero_stage": 4}, "finetune.zero_stage"),
        ({"distill__no_such_key": 1}, "distill.no_such_key"),
    ]
    for changes, field in cases:
        spec = write_spec(tmp_path, tiny_model_dir, corpus, "c/*.jsonl.gz", **changes)
        with pytest.raises(ConfigError) as error:
            build_steps(load_spec(str(spec)))
        assert error.value.field == field
    spec = yaml.safe_load(good.read_text())
    for key, value, field in (("ratios", [1.5], "ratios"), ("domains", {}, "domains"),
                              ("domains", {"maths": {"mmlu": "all", "x": 1}}, "domains.maths.x")):  # fmt: skip
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**spec, key: value}))
        with pytest.raises(ConfigError) as error:
            load_spec(str(bad))
        assert error.value.field == field
    result = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--spec", str(bad)],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "domains.maths.x" in result.stderr


def test_spec_paths_become_absolute(tmp_path, tiny_model_dir, monkeypatch):
    """Stage workers run in directories of their own (Ray Train's do), so local paths are made absolute."""
    spec = write_spec(tmp_path, tiny_model_dir, {"seeds": "seeds.jsonl"}, "corpus/*.jsonl.gz")
    values = yaml.safe_load(spec.read_text())
    values["root"] = "run"
    spec.write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    loaded = load_spec(str(spec))
    assert loaded.root == str(tmp_path / "run") and loaded.seeds == str(tmp_path / "seeds.jsonl")
    assert loaded.corpus == [str(tmp_path / "corpus" / "*.jsonl.gz")]
    assert load_spec(str(spec), {"model": "smollm2-135m"}).model == "smollm2-135m"  # a registry name stays


def test_heldout_split_depends_on_the_id_alone():
    ids = [f"doc{i}" for i in range(2000)]
    mask = heldout_mask(ids, 0.2)
    assert 0.17 < mask.mean() < 0.23
    assert (heldout_mask(ids[::-1], 0.2)[::-1] == mask).all()  # order does not matter
    assert (heldout_mask(ids[:100], 0.2) == mask[:100]).all()  # nor which other rows exist
