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
from curation.sae.model import SAEConfig, TopKSAE
from curation.sae.train import TrainSAEConfig
from curation.sae.train import plan as plan_sae
from curation.scoring import STATS_FILE, LatentStats
from curation.selection.curate import CurateConfig, plan

REPO = Path(__file__).resolve().parents[1]
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


def test_missing_config_file_names_config(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        cli.parse(Toy, ["--config", str(tmp_path / "nope.yaml")])
    assert excinfo.value.field == "config"


def test_yaml_that_is_not_a_mapping_names_config(tmp_path):
    config_file = write_yaml(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError) as excinfo:
        cli.parse(Toy, ["--config", config_file])
    assert excinfo.value.field == "config"


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
    (root / "sae" / STATS_FILE).write_bytes(LatentStats(docs=4, fired_in=[1] * sae.cfg.num_latents).to_bytes())
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
def job_runs(job_inputs) -> dict[str, tuple[int, str]]:
    """Run every command at once (each pays ~3 s of imports; 2 cores share them): name -> (status, output)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for name, args in job_commands(job_inputs).items()
    }
    results: dict[str, tuple[int, str]] = {}
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output += f"\n[killed after {JOB_TIMEOUT_S} s]"
        results[name] = (proc.returncode, output)
    return results


def test_job_help_shows_field_docstrings(job_runs):
    status, output = job_runs["help"]
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
    status, output = job_runs[case]
    assert status != 0, output
    assert f"config error: {named}" in output, output
    assert "Traceback" not in output, output
    for marker in RAY_STARTED:
        assert marker not in output, output


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
    # run_curation builds its SelectionSpec only after init_ray: the range check must come first.
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
