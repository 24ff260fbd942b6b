"""Each job run as a user runs it: `python -m jobs.<name>`, and once through `ray job submit`."""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import test_config_validation as validation
from conftest import REPO
from helpers import job_env, ray_head, submit_job, write_corpus

from core import cli
from core.errors import ConfigError
from curation.sae.train import TrainSAEConfig
from curation.selection.curate import CurateConfig

pytestmark = pytest.mark.timeout(600)

SAE_FLAGS = [
    "--layer", "2", "--coords", "jacobian", "--num-coords", "32", "--expansion-factor", "4", "--k", "8",
    "--max-train-tokens", "1500", "--epochs", "3", "--batch-tokens", "256", "--cpus", "0.5",
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
    overrides.write_text("top_n: 2\ncpus: 0.5\nbatch_size: 16\n")
    args = ["jobs.curate", "--config", str(overrides), "--corpus", glob, "--seeds", corpus["seeds"],
            "--sae", str(trained["sae"]), "--out", str(tmp_path / "out")]  # fmt: skip
    run_job(args)
    check_curated(tmp_path / "out", corpus["planted"])
    rerun = run_job(args)
    assert "skipping" in rerun.stderr + rerun.stdout


def test_a_learned_scorer_curates_the_planted_documents_and_its_terms_add_up_to_each_score(tmp_path, trained):
    """`--scorer classifier` scores each domain against one query, learned from its seeds against the corpus
    sample `jobs.train_sae` kept beside the SAE (its statistics' documents, pooled codes); it finds the planted
    documents, names its query as each row's `nearest_seed`, and each row's listed terms plus
    `rest_contribution` are its score."""
    from curation.latent_weights import SAMPLE_FILE

    corpus, glob = trained["corpus"], trained["glob"]
    assert pq.read_metadata(trained["sae"] / SAMPLE_FILE).num_rows == corpus["good_rows"]
    out = tmp_path / "out"
    run_job(["jobs.curate", "--corpus", glob, "--seeds", corpus["seeds"], "--sae", str(trained["sae"]),
             "--out", str(out), "--scorer", "classifier", "--rule", "global_topn", "--top-n", "4",
             "--cpus", "0.5", "--batch-size", "16"])  # fmt: skip
    check_curated(out, corpus["planted"])
    rows = pq.read_table(out / "curated").to_pylist()
    assert {row["nearest_seed"] for row in rows} == {"maths:classifier", "body:classifier"}
    for row in rows:
        assert row["top_latents"] and len(row["top_latents"]) == len(row["latent_contributions"])
        assert sum(row["latent_contributions"]) + row["rest_contribution"] == pytest.approx(row["score"], abs=1e-5)
    assert json.loads((out / "manifest.json").read_text())["scorer"] == "classifier"
    # A re-selection from the stored codes scores as the output it reads: the same queries, the same rows.
    again = tmp_path / "again"
    run_job(["jobs.select", "--scored", str(out), "--seeds", corpus["seeds"], "--out", str(again),
             "--rule", "global_topn", "--top-n", "4"])  # fmt: skip
    chosen = {(row["id"], row["domain"]): row["score"] for row in rows}
    reselected = {(row["id"], row["domain"]): row["score"] for row in pq.read_table(again / "curated").to_pylist()}
    assert set(reselected) == set(chosen)
    assert all(reselected[key] == pytest.approx(score, abs=1e-5) for key, score in chosen.items())
    assert json.loads((again / "manifest.json").read_text())["scorer"] == "classifier"


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
    from curation.schedule.spec import ScheduleSpec, load_schedule_spec
    from training.finetuning.finetune import FinetuneConfig

    classes = {"sae": TrainSAEConfig, "curate": CurateConfig, "finetune": FinetuneConfig}
    shipped = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    assert len(shipped) >= 5
    for path in shipped:
        if path.stem.startswith("schedule-"):  # a schedule spec is a whole curation spec on its own
            assert isinstance(load_schedule_spec(str(path)), ScheduleSpec)
            continue
        if path.stem.endswith("pipeline") or path.stem.startswith("pipeline-"):  # every stage's config builds
            steps = pipeline.build_steps(pipeline.load_spec(str(path)))
            assert {step.stage for step in steps} >= {"curate", "split", "prune", "distill", "finetune", "evaluate"}
            continue
        if path.stem == "replication":  # a replication spec: its whole graph builds
            from experiments.replication import build_replication, load_replication_spec

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
            "--out", str(tmp_path / "out"), "--top-n", "2", "--cpus", "0.5", "--batch-size", "16",
        ], env)  # fmt: skip
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout
    assert "joining Ray" in submit.stdout and "starting a local Ray" not in submit.stdout
    check_curated(tmp_path / "out", corpus["planted"])


# --- every job refuses a bad config the same way: status 2, one line, before Ray --------------------------

JOBS = {  # job -> (its config in test_config_validation's tables, the flags its --help marks required)
    "train_sae": ("TrainSAEConfig", ["corpus", "out"]),
    "curate": ("CurateConfig", ["corpus", "seeds", "sae", "out"]),
    "select": ("ReselectConfig", ["scored", "seeds", "out"]),
    "prune": ("PruneConfig", ["out"]),
    "distill": ("DistillConfig", ["data", "out"]),
    "finetune": ("FinetuneConfig", ["model", "data", "out"]),
    "evaluate": ("EvaluateConfig", ["models", "out"]),
    "split": ("SplitConfig", ["curated", "domain", "out"]),
    "make_demo_corpus": ("DemoCorpusConfig", []),
    "schedule": ("ScheduleJobConfig", ["spec"]),
    "pipeline": ("PipelineSpec", ["spec"]),  # a spec job: the config's values live in the spec file
    "replicate": ("ReplicationSpec", ["spec"]),
}
SPEC_BASES = {  # the least a spec file needs besides the bad value
    "pipeline": {"root": "/tmp/fs-root", "seeds": "s.jsonl", "corpus": ["c"], "domains": {"maths": {}}},
    "replicate": {"root": "/tmp/fs-root", "domains": {"mathematics": "Mathematics"}},
    "schedule": {"corpus": ["corpus/*.jsonl"], "seeds": "seeds.jsonl", "sae": "sae", "out": "out"},
}
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")


def test_the_job_table_covers_every_job():
    assert set(JOBS) == {path.stem for path in (REPO / "jobs").glob("*.py")} - {"__init__"}


def flag_args(name: str, value: object) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [f"--{name.replace('_', '-')}", *(str(item) for item in values)]


def required_args(job: str) -> list[str]:
    """The job's required flags, with the values of the validation table's valid config."""
    config, required = JOBS[job]
    if job in ("pipeline", "replicate"):
        return ["--spec", "spec.yaml"]
    valid = validation._factories()[config]()
    extra = ["--mmlu", "all"] if job == "evaluate" else []  # it needs something to evaluate, too
    return [arg for name in required for arg in flag_args(name, getattr(valid, name))] + extra


def bad_flag_cases() -> dict[str, tuple[list[str], str]]:
    """Per job, a command line with its config table's first bad value: (args, field it must name)."""
    cases = {}
    for job, (config, _) in JOBS.items():
        if job in ("pipeline", "replicate"):
            cases[job] = (["--spec", ""], "spec")  # their flags only point at the spec
            continue
        name, values = next(iter(validation.BAD[config].items()))
        cases[job] = ([*required_args(job), *flag_args(name, values[0])], name)
    return cases


def bad_spec_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """Per spec job, a spec file holding its table's first bad value."""
    import yaml

    cases = {}
    for job, base in SPEC_BASES.items():
        config = "ScheduleSpec" if job == "schedule" else JOBS[job][0]
        name, values = next(iter(validation.BAD[config].items()))
        spec = root / f"{job}.yaml"
        spec.write_text(yaml.safe_dump({**base, name: values[0]}))
        cases[f"{job}-spec"] = (["--spec", str(spec), "--once"] if job == "schedule" else ["--spec", str(spec)], name)
    return cases


def run_all(cases: dict[str, tuple[list[str], str]], job_of) -> dict[str, subprocess.CompletedProcess]:
    """Every case as `python -m jobs.<job>` at once (imports dominate; the 2 cores share them)."""
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-m", f"jobs.{job_of(case)}", *args],
            cwd=REPO,
            env=job_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for case, (args, _) in cases.items()
    }
    done = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        done[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


@pytest.mark.timeout(900)
def test_every_job_refuses_a_bad_value_with_status_2_and_one_line(tmp_path):
    flags = bad_flag_cases()
    specs = bad_spec_cases(tmp_path)
    results = run_all({**flags, **specs}, lambda case: case.split("-")[0])
    for case, (_, field) in {**flags, **specs}.items():
        result = results[case]
        where = f"{case}: status {result.returncode}\n{result.stderr[-3000:]}"
        assert result.returncode == 2, where
        assert "Traceback" not in result.stderr + result.stdout, where
        lines = result.stderr.splitlines()
        assert f"config error: {field}=" in lines[-1], where
        if case in flags:  # refused while the config is built: nothing else is written
            assert len(lines) == 1, where
        else:  # refused when the spec is read: after the job logs its config, before Ray starts
            assert all(LOG_RECORD.match(line) for line in lines[:-1]), where
            assert "Ray" not in result.stderr, where


def test_every_job_refuses_an_unknown_or_abbreviated_flag_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    for job in JOBS:
        main = importlib.import_module(f"jobs.{job}").main
        for argv, expected in ((["--no-such-flag"], "unrecognized arguments: --no-such-flag"), (["--ou", "x"], "--ou")):
            with pytest.raises(SystemExit) as excinfo:
                main([*required_args(job), *argv])
            err = capsys.readouterr().err
            assert excinfo.value.code == 2, (job, err)
            assert err.startswith(f"python -m jobs.{job}: error: ") and expected in err, (job, err)
            assert len(err.splitlines()) == 1, (job, err)


def test_every_job_help_shows_its_command_and_its_required_flags(capsys):
    for job, (_, required) in JOBS.items():
        with pytest.raises(SystemExit) as excinfo:
            importlib.import_module(f"jobs.{job}").main(["--help"])
        assert excinfo.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: python -m jobs.{job} "), text[:200]
        section = text.split("\nrequired")[1].split("\noptions:")[0] if required else ""
        marked = re.findall(r"^  --([a-z0-9-]+)", section, flags=re.MULTILINE)
        assert [flag.replace("-", "_") for flag in marked] == required, (job, marked)


@pytest.mark.parametrize("job", [job for job, (_, required) in JOBS.items() if required])
def test_a_flag_marked_required_is_refused_when_missing(job):
    """`--help` marks a flag required only when the config cannot be built without it."""
    from experiments.replication import ReplicationJobConfig
    from pipeline import PipelineJobConfig

    config, required = JOBS[job]
    spec_jobs = {"pipeline": PipelineJobConfig, "replicate": ReplicationJobConfig}
    build = spec_jobs.get(job) or validation._factories()[config]
    fields = {spec.name: spec for spec in dataclasses.fields(spec_jobs.get(job) or type(build()))}
    for name in required:
        field = fields[name]
        empty = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        with pytest.raises(ConfigError) as excinfo:
            build(**{name: empty})
        assert excinfo.value.field == name
