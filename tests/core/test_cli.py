"""Typed configs on the command line, and jobs that fail on a bad config before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from core import cli
from core.errors import ConfigError
from curation.latent_weights import save_corpus_sample
from curation.sae.model import SAEConfig, TopKSAE
from curation.sae.train import TrainSAEConfig
from curation.sae.train import plan as plan_sae
from curation.selection.curate import CurateConfig, plan

REPO = Path(__file__).resolve().parents[1]
PROJECT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 60
RAY_STARTED = ("Started a local Ray", "starting a local Ray")


@dataclass
class Toy:
    name: str = "toy"
    """What the toy is called."""
    count: int = 3
    """How many toys; 100% of them are counted."""
    ratio: float | None = None
    """An optional ratio."""
    mode: Literal["fast", "exact"] = "exact"
    """How to run."""
    tags: list[str] = field(default_factory=list)
    """Labels, comma-separated on the command line."""
    loud: bool = False
    """Whether to shout."""
    options: dict = field(default_factory=dict)
    """Free-form options as JSON."""


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def parse_error(cls: type, argv: list[str], capsys) -> str:
    """Parse argv expecting a config error: the exit status must be 2; returns stderr."""
    with pytest.raises(SystemExit) as excinfo:
        cli.parse(cls, argv)
    assert excinfo.value.code == 2
    return capsys.readouterr().err


# --- docs and help ----------------------------------------------------------------------------------


def test_field_docs_come_from_the_docstring_under_each_field_including_bases():
    docs = cli.field_docs(CurateConfig)
    assert docs["threshold"] == "Cosine-similarity cut for the `threshold` rule."
    assert docs["ray_address"].startswith("Ray cluster to join.")  # from RunConfig, the base class
    assert cli.field_docs(Toy)["count"] == "How many toys; 100% of them are counted."


def test_help_lists_every_field_with_its_doc_and_default():
    help_text = " ".join(cli.build_parser(Toy).format_help().split())
    assert "--count COUNT How many toys; 100% of them are counted. (default: 3)" in help_text
    assert "--mode {fast,exact}" in help_text
    assert "--loud, --no-loud" in help_text
    assert "--config CONFIG" in help_text


# --- YAML and flags ---------------------------------------------------------------------------------


def test_defaults_then_yaml_then_flags(tmp_path):
    config_file = write_yaml(
        tmp_path / "train.yaml",
        "corpus: [a.jsonl, b.jsonl]\nout: runs/sae\nlayer: 3\nk: 16\nnum-coords: 10\nforce: true\nlr: 0.01\n",
    )
    config = cli.parse(TrainSAEConfig, ["--config", config_file, "--k", "8", "--no-force", "--lr", "none"])
    assert config.corpus == ["a.jsonl", "b.jsonl"]
    assert (config.layer, config.num_coords) == (3, 10)  # from YAML (a dashed key works too)
    assert (config.k, config.force, config.lr) == (8, False, None)  # flags win over YAML
    assert config.epochs == TrainSAEConfig.__dataclass_fields__["epochs"].default == 4  # untouched default


def test_flags_are_coerced_to_field_types():
    config = cli.parse(
        Toy, ["--count", "7", "--ratio", "0.25", "--tags", "x,y", "--loud", "--mode", "fast", "--options", '{"a": 1}']
    )
    assert config == Toy(name="toy", count=7, ratio=0.25, mode="fast", tags=["x", "y"], loud=True, options={"a": 1})


def test_curate_rule_follows_threshold():
    base = ["--corpus", "c.jsonl", "--seeds", "s.jsonl", "--sae", "sae", "--out", "out"]
    assert cli.parse(CurateConfig, base).rule == "per_seed_topn"
    with_threshold = cli.parse(CurateConfig, [*base, "--threshold", "0.6"])
    assert (with_threshold.rule, with_threshold.threshold) == ("threshold", 0.6)


def test_unknown_yaml_key_exits_2_naming_it(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "bad.yaml", "corpus: c.jsonl\nout: o\nnum_cords: 12\n")
    err = parse_error(TrainSAEConfig, ["--config", config_file], capsys)
    assert "num_cords=12" in err
    assert "unknown key" in err and "num_coords" in err  # the known keys are listed, the fix is visible


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("k: many\n", "k='many'"),
        ("k: 1.5\n", "k=1.5"),
        ("force: maybe\n", "force='maybe'"),
        ("coords: random\n", "coords='random'"),
        ("layer: null\n", "layer=None"),
    ],
)
def test_wrong_type_in_yaml_names_the_field(tmp_path, capsys, yaml_text, named):
    config_file = write_yaml(tmp_path / "bad.yaml", "corpus: c.jsonl\nout: o\n" + yaml_text)
    err = parse_error(TrainSAEConfig, ["--config", config_file], capsys)
    assert f"config error: {named}" in err


def test_wrong_type_on_the_command_line_names_the_field(capsys):
    err = parse_error(TrainSAEConfig, ["--corpus", "c", "--out", "o", "--layer", "fifteen"], capsys)
    assert "layer='fifteen'" in err and "int" in err


def test_value_checks_of_the_dataclass_name_the_field(capsys):
    err = parse_error(
        CurateConfig, ["--corpus", "c", "--seeds", "s", "--sae", "x", "--out", "o", "--top-n", "0"], capsys
    )
    assert "top_n=0" in err
    err = parse_error(TrainSAEConfig, ["--out", "o"], capsys)
    assert "corpus=[]" in err and "--corpus" in err


def one_line_error(cls: type, argv: list[str], capsys) -> str:
    """Parse argv expecting a refusal: status 2 and exactly one line on stderr, which is returned."""
    err = parse_error(cls, argv, capsys)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


CURATE_FLAGS = ["--corpus", "c.jsonl", "--seeds", "s.jsonl", "--sae", "sae", "--out", "out"]


def test_a_missing_config_file_exits_2_naming_config(tmp_path, capsys):
    err = one_line_error(Toy, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert f"config error: --config='{tmp_path / 'nope.yaml'}': no such file" in err


def test_a_config_that_is_a_directory_or_not_text_exits_2_naming_config(tmp_path, capsys):
    err = one_line_error(Toy, ["--config", str(tmp_path)], capsys)
    assert f"--config='{tmp_path}'" in err and "cannot be read" in err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    err = one_line_error(Toy, ["--config", str(binary)], capsys)
    assert f"--config='{binary}'" in err and "cannot be read" in err


def test_a_yaml_syntax_error_exits_2_naming_config_line_and_column(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "broken.yaml", "count: 5\nname: [a, b\nloud: true\n")
    err = one_line_error(Toy, ["--config", config_file], capsys)
    assert f"config error: --config='{config_file}': is not valid YAML at line 3, column 5" in err


def test_yaml_that_is_not_a_mapping_exits_2_naming_config(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    err = one_line_error(Toy, ["--config", config_file], capsys)
    assert f"--config='{config_file}'" in err and "mapping" in err


def test_a_spec_file_mistake_names_spec(tmp_path):
    """The spec jobs read their YAML through the same loader; their flag is --spec."""
    from curation.schedule.spec import load_schedule_spec
    from experiments.replication import load_replication_spec
    from pipeline.spec import load_spec

    broken = write_yaml(tmp_path / "spec.yaml", "root: [r\n")
    for load in (load_spec, load_replication_spec, load_schedule_spec):
        for path in (str(tmp_path / "missing.yaml"), broken):
            with pytest.raises(ConfigError) as excinfo:
                load(path)
            assert (excinfo.value.field, excinfo.value.value) == ("--spec", path)


@pytest.mark.parametrize(
    ("yaml_text", "named", "expected"),
    [
        ("seeds: ['/a', '/b']\n", "seeds=['/a', '/b']", "must be of type str, not list"),
        ("seeds: {a: 1}\n", "seeds={'a': 1}", "must be of type str, not dict"),
        ("seeds: 12\n", "seeds=12", "must be of type str, not int"),
        ("top_n: true\n", "top_n=True", "must be of type int, not bool"),
        ("top_n: '5'\n", "top_n='5'", "must be of type int, not str"),
        ("max_chars: 1e6\n", "max_chars='1e6'", "must be of type int, not str"),
        ("top_n: {a: 1}\n", "top_n={'a': 1}", "must be of type int, not dict"),
        ("top_n: [5]\n", "top_n=[5]", "must be of type int, not list"),
        ("cpus: true\n", "cpus=True", "must be of type float, not bool"),
        ("cpus: '0.5'\n", "cpus='0.5'", "must be of type float, not str"),
        ("threshold: yes\n", "threshold=True", "must be of type float, not bool"),
        ("corpus: {a: 1}\n", "corpus={'a': 1}", "must be of type list[str], not dict"),
        ("corpus: [a, [b]]\n", "corpus[1]=['b']", "must be of type str, not list"),
        ("force: 1\n", "force=1", "must be of type bool"),
        ("dtype: 16\n", "dtype=16", "must be one of auto, float32, bfloat16"),
    ],
)
def test_a_yaml_value_of_the_wrong_type_exits_2_naming_field_value_and_type(
    tmp_path, capsys, yaml_text, named, expected
):
    config_file = write_yaml(tmp_path / "bad.yaml", yaml_text)
    in_yaml = yaml_text.split(":")[0]
    pairs = zip(CURATE_FLAGS[::2], CURATE_FLAGS[1::2], strict=True)
    flags = [arg for flag, value in pairs if flag != f"--{in_yaml}" for arg in (flag, value)]
    err = one_line_error(CurateConfig, ["--config", config_file, *flags], capsys)
    assert f"config error: {named}: {expected}" in err


def test_yaml_values_of_the_right_type_are_kept(tmp_path):
    config_file = write_yaml(
        tmp_path / "good.yaml", "corpus: [a.jsonl, b.jsonl]\ncpus: 1\ntop_n: 5.0\nthreshold: null\n"
    )
    config = cli.parse(CurateConfig, ["--config", config_file, "--seeds", "s", "--sae", "x", "--out", "o"])
    assert config.corpus == ["a.jsonl", "b.jsonl"]
    assert config.cpus == 1.0 and isinstance(config.cpus, float)
    assert config.top_n == 5 and isinstance(config.top_n, int)
    assert config.threshold is None
    single = cli.from_mapping(TrainSAEConfig, {"corpus": "one.jsonl", "out": "o"})
    assert single.corpus == ["one.jsonl"]  # one string for a list field is a one-item list


def test_a_duplicate_yaml_key_exits_2_naming_the_key_and_its_lines(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "twice.yaml", "top_n: 5\nbatch_size: 8\ntop_n: 7\n")
    err = one_line_error(CurateConfig, ["--config", config_file, *CURATE_FLAGS], capsys)
    assert "config error: top_n=7: is set twice" in err and "lines 1 and 3" in err


def test_a_duplicate_key_in_a_nested_mapping_is_refused(tmp_path):
    config_file = write_yaml(tmp_path / "spec.yaml", "root: r\ncurate:\n  top_n: 1\n  rule: threshold\n  top_n: 2\n")
    with pytest.raises(ConfigError) as excinfo:
        cli.load_yaml(config_file)
    assert excinfo.value.field == "top_n" and excinfo.value.value == 2
    assert "lines 3 and 5" in excinfo.value.fix


def test_a_key_given_with_dashes_and_underscores_is_a_duplicate(tmp_path):
    config_file = write_yaml(tmp_path / "twice.yaml", "top-n: 5\ntop_n: 7\n")
    with pytest.raises(ConfigError) as excinfo:
        cli.load_yaml(config_file)
    assert excinfo.value.field == "top_n" and "top-n" in excinfo.value.fix


def test_yaml_merge_keys_still_work(tmp_path):
    config_file = write_yaml(tmp_path / "merge.yaml", "base: &base {top_n: 5}\ncurate:\n  <<: *base\n  top_n: 7\n")
    assert cli.load_yaml(config_file)["curate"] == {"top_n": 7}


def test_an_unknown_yaml_key_suggests_the_nearest_field(tmp_path, capsys):
    config_file = write_yaml(tmp_path / "typo.yaml", "top_nn: 3\n")
    err = one_line_error(CurateConfig, ["--config", config_file, *CURATE_FLAGS], capsys)
    assert "config error: top_nn=3: unknown key" in err and "did you mean top_n?" in err


def test_an_abbreviated_flag_is_refused_naming_the_full_one(capsys):
    # `--seed` would otherwise be taken as `--seeds`, and `--top` as `--top-n`.
    flags = ["--corpus", "c.jsonl", "--sae", "sae", "--out", "out"]
    err = one_line_error(CurateConfig, [*flags, "--seed", "0"], capsys)
    assert "unrecognized arguments: --seed 0" in err and "did you mean --seeds?" in err
    err = one_line_error(CurateConfig, [*CURATE_FLAGS, "--top", "5"], capsys)
    assert "--top 5" in err and "did you mean --top-n?" in err


def test_an_argparse_error_is_one_line(capsys):
    err = one_line_error(CurateConfig, [*CURATE_FLAGS, "--top-n"], capsys)
    assert "argument --top-n: expected one argument" in err
    err = one_line_error(CurateConfig, [*CURATE_FLAGS, "--dtype", "float16"], capsys)
    assert "argument --dtype: invalid choice: 'float16'" in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_read_backoff_is_refused(capsys, value):
    err = one_line_error(CurateConfig, [*CURATE_FLAGS, f"--read-backoff-s={value}"], capsys)
    assert f"config error: read_backoff_s={float(value)!r}: must be a finite number >= 0" in err


def test_a_flag_that_is_not_json_for_a_mapping_field_is_refused(capsys):
    err = one_line_error(Toy, ["--options", "{bad"], capsys)
    assert "config error: options='{bad': must be a JSON object" in err


def test_a_config_error_in_the_run_exits_2_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "setup_logging", lambda: None)

    def run(config: Toy) -> None:
        raise ConfigError("count", config.count, "is more than the shelf holds: lower it")

    with pytest.raises(SystemExit) as excinfo:
        cli.run_job(Toy, run, ["--count", "7"], None)
    assert excinfo.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("config error: count=7: is more than the shelf holds: lower it")


@pytest.mark.timeout(300)
def test_a_config_error_from_a_ray_task_exits_2_with_one_line(capsys, monkeypatch, ray_local):
    """Ray hands a task's exception back as its own subclass of it, whose text is a traceback."""
    monkeypatch.setattr(cli, "setup_logging", lambda: None)

    @ray_local.remote(num_cpus=0.25)
    def check_layer() -> None:
        raise ConfigError("layer", 40, "the model has 30 layers:\nuse 0..29")

    with pytest.raises(SystemExit) as excinfo:
        cli.run_job(Toy, lambda config: ray_local.get(check_layer.remote()), [], None, prog="python -m jobs.toy")
    assert excinfo.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m jobs.toy: config error: layer=40: the model has 30 layers: use 0..29"
    ]


def test_a_config_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(ConfigError("top_n", 0, "must be >= 1")))
    assert (error.field, error.value, error.fix, str(error)) == ("top_n", 0, "must be >= 1", "top_n=0: must be >= 1")


def test_help_shows_the_command_and_marks_required_flags():
    parser = cli.build_parser(CurateConfig, prog="python -m jobs.curate", required=("corpus", "seeds"))
    help_text = parser.format_help()
    assert help_text.startswith("usage: python -m jobs.curate --corpus CORPUS [CORPUS ...] --seeds SEEDS")
    required_section = help_text.split("\nrequired (")[1]
    assert "--corpus" in required_section and "--seeds" in required_section and "--top-n" not in required_section


def argument_parser_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes allow_abbrev=False) for each call in `path` of a name ending in ArgumentParser."""
    import ast

    calls = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", "")
        if name.endswith("ArgumentParser"):
            value = {k.arg: k.value for k in node.keywords}.get("allow_abbrev")
            calls.append((node.lineno, isinstance(value, ast.Constant) and value.value is False))
    return calls


def test_every_argument_parser_of_the_project_refuses_abbreviations():
    """Any ArgumentParser built in library, job or bench code passes allow_abbrev=False."""
    calls = []
    for path in sorted(PROJECT.rglob("*.py")):
        parts = path.relative_to(PROJECT).parts
        if not any(part in {".venv", "tests", "runs"} or part.startswith(".") for part in parts):
            calls += [(f"{path.relative_to(PROJECT)}:{line}", refused) for line, refused in argument_parser_calls(path)]
    # The jobs' parser (core/cli.py) and the benches' (bench/measure.py): the walker must find both.
    assert {where.split(":")[0] for where, _ in calls} >= {"core/cli.py", "bench/measure.py"}
    assert [where for where, refused in calls if not refused] == []


# --- jobs fail fast, before Ray ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def job_inputs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """A one-shard corpus, a seeds file and an SAE on the tiny model's layer 2."""
    root = tmp_path_factory.mktemp("job-inputs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the cat sat on the mat w{i}"}) + "\n" for i in range(4)))
    seeds = root / "seeds.jsonl"
    seeds.write_text(json.dumps({"text": "the dog ran in the park", "domain": "animals"}) + "\n")
    sae = TopKSAE(SAEConfig(d_in=64, k=8, layer=2, base_model={"name": tiny_model_dir}))
    sae.fit_normalizer(torch.randn(32, 64))
    sae.save(root / "sae")
    # A corpus sample of 4 documents in which each latent fires once, as `jobs.train_sae` would store it.
    latents = torch.arange(sae.cfg.num_latents)
    pooled = (latents[None, :] % 4 == torch.arange(4)[:, None]).float() * 0.5
    save_corpus_sample(root / "sae", pooled, "rate")
    (root / "empty").mkdir()
    return {
        "model": tiny_model_dir,
        "corpus": str(corpus),
        "seeds": str(seeds),
        "sae": str(root / "sae"),
        "empty_glob": str(root / "empty" / "*.jsonl"),
        "out": str(root / "out"),
    }


def job_commands(inputs: dict[str, str]) -> dict[str, list[str]]:
    """One process per failure (each exits at its first error); the rest are checked in-process below."""
    train = ["-m", "jobs.train_sae", "--corpus", inputs["corpus"], "--out", inputs["out"] + "-sae"]
    curate = ["-m", "jobs.curate", "--sae", inputs["sae"], "--out", inputs["out"]]
    return {
        "help": ["-m", "jobs.curate", "--help"],
        "train_layer": [*train, "--model", inputs["model"], "--layer", "9"],
        "train_num_coords": [
            *train,
            "--model",
            inputs["model"],
            "--layer",
            "2",
            "--coords",
            "jacobian",
            "--num-coords",
            "100",
        ],  # fmt: skip
        "train_model": [*train, "--model", "no-such-model"],
        "curate_seeds": [*curate, "--corpus", inputs["corpus"], "--seeds", inputs["out"] + "-missing.jsonl"],
        "curate_corpus": [*curate, "--corpus", inputs["empty_glob"], "--seeds", inputs["seeds"]],
    }


@pytest.fixture(scope="module")
def job_runs(job_inputs) -> dict[str, tuple[int, str, str]]:
    """Run every command at once (each pays ~3 s of imports; 2 cores share them): name -> (status, stdout, stderr)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in job_commands(job_inputs).items()
    }
    results: dict[str, tuple[int, str, str]] = {}
    for name, proc in procs.items():
        try:
            output, errors = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, errors = proc.communicate()
            errors += f"\n[killed after {JOB_TIMEOUT_S} s]"
        results[name] = (proc.returncode, output, errors)
    return results


def test_job_help_shows_field_docstrings(job_runs):
    status, output, _ = job_runs["help"]
    assert status == 0, output
    text = " ".join(output.split())
    assert "Cosine-similarity cut for the `threshold` rule." in text
    assert "--top-n TOP_N Documents per seed (per_seed_topn) or per domain (global_topn). (default: 100)" in text
    assert "python -m jobs.curate --corpus" in text  # the module docstring's commands


@pytest.mark.parametrize(
    ("case", "named"),
    [
        ("train_layer", "layer=9"),
        ("train_num_coords", "num_coords=100"),
        ("train_model", "model='no-such-model'"),
        ("curate_seeds", "seeds='"),
        ("curate_corpus", "corpus=["),
    ],
)
def test_job_config_errors_fail_before_ray(job_runs, case, named):
    """Errors the stage's own checks find (after the config is logged) exit 2 with one last line."""
    status, output, errors = job_runs[case]
    assert status == 2, output + errors
    assert f"config error: {named}" in errors.splitlines()[-1], errors
    assert "Traceback" not in output + errors, errors
    for marker in RAY_STARTED:
        assert marker not in output + errors, errors


def curate_config(inputs: dict[str, str], **overrides) -> CurateConfig:
    values = {"corpus": [inputs["corpus"]], "seeds": inputs["seeds"], "sae": inputs["sae"], "out": inputs["out"]}
    return CurateConfig(**{**values, **overrides})


def train_config(inputs: dict[str, str], **overrides) -> TrainSAEConfig:
    values = {
        "corpus": [inputs["corpus"]],
        "out": inputs["out"] + "-sae",
        "model": inputs["model"],
        "layer": 2,
        "coords": "jacobian",
        "num_coords": 16,
    }
    return TrainSAEConfig(**{**values, **overrides})


def test_curate_plan_names_an_unknown_model(job_inputs):
    with pytest.raises(ConfigError) as excinfo:
        plan(curate_config(job_inputs, model="no-such-model"))
    assert excinfo.value.field == "model"


def test_curate_plan_names_an_sae_directory_without_cfg(job_inputs, tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        plan(curate_config(job_inputs, sae=str(tmp_path)))
    assert excinfo.value.field == "sae"


def test_train_sae_check_names_an_empty_corpus_glob(job_inputs):
    with pytest.raises(ConfigError) as excinfo:
        plan_sae(train_config(job_inputs, corpus=[job_inputs["empty_glob"]]))
    assert excinfo.value.field == "corpus"


def test_train_sae_check_names_a_missing_seeds_file(job_inputs):
    with pytest.raises(ConfigError) as excinfo:
        plan_sae(train_config(job_inputs, seeds=job_inputs["out"] + "-missing.jsonl"))
    assert excinfo.value.field == "seeds"


def test_curate_plan_rejects_a_threshold_outside_cosine_range(job_inputs):
    # run_curation builds its SelectionSettings only after init_ray: the range check must come first.
    with pytest.raises(ConfigError) as excinfo:
        plan(curate_config(job_inputs, threshold=1.5))
    assert excinfo.value.field == "threshold"


def test_train_sae_check_rejects_k_above_the_sae_width(job_inputs):
    # 4 coordinates x expansion 2 = 8 latents cannot hold k=9; SAEConfig says so, but only after Ray has
    # started and the coordinates were measured. plan_sae() must find it first.
    with pytest.raises(ConfigError) as excinfo:
        plan_sae(train_config(job_inputs, num_coords=4, expansion_factor=2, k=9))
    assert excinfo.value.field == "k"


def test_train_sae_check_accepts_a_valid_config(job_inputs):
    checked = plan_sae(train_config(job_inputs, layer=3, num_coords=64))
    assert (checked.info.num_layers, checked.info.hidden_size) == (4, 64)
    assert [Path(file.uri).name for file in checked.inputs] == ["corpus.jsonl"]
    assert len(checked.digest) > 0


def test_curate_plan_accepts_a_valid_config(job_inputs):
    checked = plan(curate_config(job_inputs))
    assert checked.model == job_inputs["model"]
    assert checked.seeds.domains == ["animals"]
    assert checked.sae.cfg.layer == 2


def test_test_only_flags_work_but_help_does_not_show_them(capsys):
    from training.finetuning.config import FinetuneConfig

    parser = cli.build_parser(FinetuneConfig, prog="python -m jobs.finetune")
    assert "fail-at-step" not in parser.format_help() and "--zero-stage" in parser.format_help()
    config = cli.parse(FinetuneConfig, ["--model", "m", "--data", "d", "--out", "o", "--fail-at-step", "3"])
    assert config.fail_at_step == 3
