"""Each job run as a user runs it: `python -m jobs.<name>`, and once through `ray job submit`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers import job_env, ray_head, submit_job, write_corpus

from core import cli
from curation.sae.train import TrainSAEConfig
from curation.selection.curate import CurateConfig

pytestmark = pytest.mark.timeout(600)

SAE_FLAGS = [
    "--layer", "2", "--coords", "jacobian", "--num-coords", "32", "--expansion-factor", "4", "--k", "8",
    "--max-train-tokens", "1500", "--epochs", "3", "--batch-tokens", "256", "--cpus-per-actor", "0.5",
]  # fmt: skip


def run_job(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def check_curated(out: Path, planted: dict[str, str]) -> None:
    rows = pq.read_table(out / "curated").to_pylist()
    assert {(row["text"], row["domain"]) for row in rows} == set(planted.items())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "curate" and manifest["counts"]["curated_rows"] == len(planted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A corpus with planted documents, and an SAE trained on it by `python -m jobs.train_sae`."""
    root = tmp_path_factory.mktemp("jobs")
    corpus = write_corpus(root / "corpus")
    glob = str(root / "corpus" / "*.jsonl.gz")
    run_job(["jobs.train_sae", "--corpus", glob, "--model", tiny_model_dir, "--seeds", corpus["seeds"],
             "--out", str(root / "sae"), *SAE_FLAGS])  # fmt: skip
    return {"corpus": corpus, "glob": glob, "sae": root / "sae"}


def test_train_sae_and_curate_as_subprocesses(tmp_path, trained):
    corpus, glob = trained["corpus"], trained["glob"]
    assert (trained["sae"] / "cfg.json").is_file() and (trained["sae"] / "manifest.json").is_file()
    overrides = tmp_path / "curate.yaml"
    overrides.write_text("top_n: 2\ncpus_per_actor: 0.5\nbatch_size: 16\n")
    args = ["jobs.curate", "--config", str(overrides), "--corpus", glob, "--seeds", corpus["seeds"],
            "--sae", str(trained["sae"]), "--out", str(tmp_path / "out")]  # fmt: skip
    run_job(args)
    check_curated(tmp_path / "out", corpus["planted"])
    rerun = run_job(args)
    assert "skipping" in rerun.stderr + rerun.stdout


def test_make_demo_corpus_writes_topics_and_a_disjoint_labelled_heldout_set(tmp_path):
    run_job(["jobs.make_demo_corpus", "--out", str(tmp_path / "c"), "--shards", "2", "--limit", "50",
             "--heldout-out", str(tmp_path / "h")])  # fmt: skip
    import gzip

    def read(directory: Path) -> list[dict]:
        return [json.loads(line) for p in sorted(directory.glob("*.jsonl.gz")) for line in gzip.open(p)]

    rows, heldout = read(tmp_path / "c"), read(tmp_path / "h")
    assert len(rows) == 50 and all(row["text"] and row["meta"]["topic"] for row in rows)
    assert len(heldout) == 10_033 - 50 and all(row["meta"]["topic"] for row in heldout)
    assert not {row["text"] for row in rows} & {row["text"] for row in heldout}
    assert len({row["meta"]["topic"] for row in heldout}) == 12


def test_a_labelled_heldout_set_replaces_the_curated_split_in_evaluation(tmp_path):
    """With `domains.<name>.heldout`, the domain's perplexity is on those labelled documents (filtered by
    `topic`), and the evaluation's name says so; without it, on the curated split, named as such."""
    import yaml

    import pipeline
    from core.errors import ConfigError

    spec = yaml.safe_load((REPO / "jobs" / "configs" / "demo-pipeline.yaml").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    (evaluate,) = [s for s in pipeline.build_steps(pipeline.load_spec(str(path))) if s.stage == "evaluate"]
    assert evaluate.config.ppl == [str(REPO / "runs" / "demo" / "heldout" / "*.jsonl.gz")]
    assert evaluate.config.ppl_topic == "Mathematics" and "labelled Mathematics" in evaluate.config.ppl_name
    del spec["domains"]["mathematics"]["heldout"], spec["domains"]["mathematics"]["topic"]
    path.write_text(yaml.safe_dump(spec))
    (evaluate,) = [s for s in pipeline.build_steps(pipeline.load_spec(str(path))) if s.stage == "evaluate"]
    assert evaluate.config.ppl[0].endswith("mathematics/split/heldout") and evaluate.config.ppl_topic is None
    assert "FineScope's own choices" in evaluate.config.ppl_name
    spec["domains"]["mathematics"]["topic"] = "Mathematics"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as error:
        pipeline.load_spec(str(path))
    assert error.value.field == "domains.mathematics.topic"


def test_shipped_yaml_configs_load():
    import pipeline
    from curation.schedule.spec import ScheduleSpec, load_spec
    from training.finetuning.finetune import FinetuneConfig

    classes = {"sae": TrainSAEConfig, "curate": CurateConfig, "finetune": FinetuneConfig}
    shipped = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(shipped) >= 5
    for path in shipped:
        if path.stem.startswith("schedule-"):  # a schedule spec is a whole curation spec on its own
            assert isinstance(load_spec(str(path)), ScheduleSpec)
            continue
        if path.stem.endswith("pipeline") or path.stem.startswith("pipeline-"):  # every stage's config builds
            steps = pipeline.build_steps(pipeline.load_spec(str(path)))
            assert {step.stage for step in steps} >= {"curate", "split", "prune", "distill", "finetune", "evaluate"}
            continue
        if path.stem == "replication":  # a replication spec: its whole graph builds
            from pipeline.replication import build_replication, load_replication_spec

            steps, _ = build_replication(load_replication_spec(str(path)))
            assert {step.stage for step in steps} >= {"holdout", "arm", "curate", "prune", "finetune", "evaluate"}
            continue
        cls = classes[path.stem.split("-")[-1]]
        required = {"corpus": ["x"], "out": "o", "sae": "s", "seeds": "jobs/seeds/demo.jsonl"}
        required |= {"model": "m", "data": "d"}
        values = {k: v for k, v in required.items() if k in {f.name for f in cls.__dataclass_fields__.values()}}
        config = cli.from_mapping(cls, {**values, **cli.load_yaml(str(path))}, origin=str(path))
        assert isinstance(config, cls)


def test_curate_through_ray_job_submit(tmp_path, trained):
    """Against a real `ray start --head` cluster, the job joins it instead of starting its own Ray."""
    corpus, glob = trained["corpus"], trained["glob"]
    env = job_env()
    with ray_head(env) as address:
        submit = submit_job(address, [
            "jobs.curate", "--corpus", glob, "--seeds", corpus["seeds"], "--sae", str(trained["sae"]),
            "--out", str(tmp_path / "out"), "--top-n", "2", "--cpus-per-actor", "0.5", "--batch-size", "16",
        ], env)  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout
    assert "joining Ray" in submit.stdout and "starting a local Ray" not in submit.stdout
    check_curated(tmp_path / "out", corpus["planted"])
