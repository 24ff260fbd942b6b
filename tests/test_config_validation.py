"""Every numeric setting of every config has a checked range, and a bad value fails at construction.

One table: per config, a factory that builds a valid instance, and per field the values it must refuse
(below the range, above it, NaN, infinities). Each case must raise a ConfigError that names that field,
from construction alone, so a job refuses it before Ray starts or a model loads.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import REPO

from core.errors import ConfigError

NAN = float("nan")
INF = float("inf")
FLOATS = (NAN, INF, -INF)  # refused by every float field, whatever its range


def _factories() -> dict:
    from core.reader import CleanConfig
    from curation.sae.model import SAEConfig
    from curation.sae.train import TrainSAEConfig
    from curation.schedule.catalog import Catalog, LeaseKeeper
    from curation.schedule.service import ScheduleJobConfig
    from curation.schedule.spec import ScheduleSpec
    from curation.selection.curate import CurateConfig
    from curation.selection.reselect import ReselectConfig
    from curation.selection.rules import SelectionSettings
    from curation.split import SplitConfig
    from experiments.replication import ReplicationSpec
    from jobs.make_demo_corpus import DemoCorpusConfig
    from pipeline.spec import PipelineSpec
    from training.distillation.distill import DistillConfig
    from training.distillation.teacher import TeacherConfig
    from training.evaluation.evaluate import EvaluateConfig
    from training.finetuning.finetune import FinetuneConfig
    from training.pruning.prune import PruneConfig

    curate = {"corpus": ["corpus/*.jsonl"], "seeds": "seeds.jsonl", "sae": "sae", "out": "out"}
    return {
        "CleanConfig": lambda **kw: CleanConfig(**kw),
        "SAEConfig": lambda **kw: SAEConfig(**{"d_in": 8, **kw}),
        "TrainSAEConfig": lambda **kw: TrainSAEConfig(**{"corpus": ["c"], "out": "o", **kw}),
        "CurateConfig": lambda **kw: CurateConfig(**{**curate, **kw}),
        "ReselectConfig": lambda **kw: ReselectConfig(
            **{"scored": "curated", "seeds": "seeds.jsonl", "out": "o", **kw}
        ),
        "SelectionSettings": lambda **kw: SelectionSettings(**{"rule": "per_seed_topn", "seed_domains": ["a"], **kw}),
        "SelectionSettings[threshold]": lambda **kw: SelectionSettings(
            **{"rule": "threshold", "seed_domains": ["a"], **kw}
        ),
        "ScheduleSpec": lambda **kw: ScheduleSpec(**{**curate, **kw}),
        "ScheduleJobConfig": lambda **kw: ScheduleJobConfig(**{"spec": ["spec.yaml"], **kw}),
        "Catalog": lambda **kw: Catalog("root", None, "owner", **kw),
        "LeaseKeeper": lambda **kw: LeaseKeeper(Catalog("root", None, "owner"), **kw),
        "SplitConfig": lambda **kw: SplitConfig(**{"curated": "c", "domain": "d", "out": "o", **kw}),
        "PruneConfig": lambda **kw: PruneConfig(**{"data": "d", "out": "o", **kw}),
        "TeacherConfig": lambda **kw: TeacherConfig(**{"model": "m", **kw}),
        "DistillConfig": lambda **kw: DistillConfig(**{"data": "d", "out": "o", **kw}),
        "FinetuneConfig": lambda **kw: FinetuneConfig(**{"model": "m", "data": "d", "out": "o", **kw}),
        "EvaluateConfig": lambda **kw: EvaluateConfig(**{"models": ["m"], "out": "o", "mmlu": ["all"], **kw}),
        "PipelineSpec": lambda **kw: PipelineSpec(
            **{"root": "/tmp/fs-root", "seeds": "s.jsonl", "corpus": ["c"], "domains": {"maths": {}}, **kw}
        ),
        "DemoCorpusConfig": lambda **kw: DemoCorpusConfig(**kw),
        "ReplicationSpec": lambda **kw: ReplicationSpec(
            **{"root": "/tmp/fs-root", "domains": {"mathematics": "Mathematics"}, **kw}
        ),
    }


GENERATION = {  # GenerationSettings: shared by TeacherConfig and DistillConfig
    "max_new_tokens": (0,),
    "temperature": (-1.0, *FLOATS),
    "top_p": (0.0, 1.5, *FLOATS),
    "seed": (-1,),
    "batch_size": (0,),
    "max_batch_tokens": (0,),
    "cpus": (0.0, -1.0, *FLOATS),
    "gpus": (-1.0, *FLOATS),
    "threads": (-1,),
}
CURATE = {
    "top_n": (0,),
    "threshold": (1.5, -1.5, *FLOATS),
    "max_tokens": (0,),
    "min_chars": (-1, INF),
    "max_chars": (0, INF),
    "actors": (0,),
    "cpus": (0.0, *FLOATS),
    "gpus": (-1.0, *FLOATS),
    "threads": (-1,),
    "batch_size": (0,),
    "max_batch_tokens": (0, 8),  # 8 < max_tokens
    "max_batch_rows": (0,),
}
BAD: dict[str, dict[str, tuple]] = {
    "CleanConfig": {"min_chars": (-1, NAN, INF), "max_chars": (0, 1, NAN, INF)},
    "SAEConfig": {
        "d_in": (0,),
        "num_latents": (-1,),
        "expansion_factor": (0,),
        "k": (0, 10**6),
        "aux_k": (-1, 10**6),
        "aux_coeff": (-0.5, *FLOATS),
        "dead_after_tokens": (0,),
        "layer": (-2,),
        "skip_positions": (-1,),
    },
    "TrainSAEConfig": {
        "layer": (-1,),
        "num_coords": (0,),
        "expansion_factor": (0,),
        "k": (0,),
        "max_train_tokens": (0,),
        "epochs": (0,),
        "batch_tokens": (0,),
        "lr": (0.0, -1.0, *FLOATS),
        "max_tokens": (0,),
        "calibration_docs": (0,),
        "actors": (0,),
        "cpus": (0.0, *FLOATS),
        "gpus": (-1.0, *FLOATS),
        "trainer_cpus": (0.0, -1.0, *FLOATS),
        "trainer_gpus": (-1.0, *FLOATS),
        "threads": (-1,),
    },
    "CurateConfig": CURATE,
    "ReselectConfig": {
        "top_n": (0,),
        "threshold": (1.5, -1.5, *FLOATS),
        "cpus": (0.0, *FLOATS),
        "gpus": (-1.0, *FLOATS),
        "threads": (-1,),
    },
    "SelectionSettings": {"top_n": (0,)},
    "SelectionSettings[threshold]": {"threshold": (1.5, *FLOATS)},
    "ScheduleSpec": {
        "shards_per_round": (0,),
        "max_shards_per_batch": (-1,),
        "lease_seconds": (0.0, -1.0, *FLOATS),
        "max_attempts": (0,),
        "max_bad_line_fraction": (-0.1, 1.5, *FLOATS),
        "interval_s": (-5.0, *FLOATS),
        "keep_snapshots": (0,),
        "settle_seconds": (-1.0, *FLOATS),
        "task_retries": (-1,),
        "round_timeout_s": (-1.0, *FLOATS),
        "cpus": (NAN,),  # inherited from CurateConfig
    },
    "ScheduleJobConfig": {"max_batches": (-1,)},
    "Catalog": {"lease_seconds": (0.0, -1.0, *FLOATS)},
    "LeaseKeeper": {"every_s": (-1.0, *FLOATS)},
    "SplitConfig": {"heldout_fraction": (0.0, 1.0, *FLOATS), "seed": (-1,)},
    "PruneConfig": {
        "ratio": (0.0, 1.0, *FLOATS),
        "channel_multiple": (0,),
        "keep_groups": (0,),
        "max_docs": (0,),
        "max_tokens": (0,),
        "batch_size": (0,),
        "seed": (-1,),
        "cpus": (0.0, -1.0, *FLOATS),
        "gpus": (-1.0, *FLOATS),
        "threads": (-1,),
    },
    "TeacherConfig": {**GENERATION, "actors": (0,)},
    "DistillConfig": {
        **GENERATION,
        "prefix_fraction": (0.0, 1.0, *FLOATS),
        "max_document_tokens": (8,),  # 8 < min_document_tokens
        "min_document_tokens": (1,),
        "context_length": (-1,),
        "part_rows": (0,),
        "limit": (0, -1),
        "actors": (0,),
    },
    "FinetuneConfig": {
        "zero_stage": (0, 4),
        "kd_weight": (-0.1, 1.5, *FLOATS),
        "kd_temperature": (0.0, *FLOATS),
        "lora_r": (-1,),
        "lora_alpha": (0.0, *FLOATS),
        "epochs": (0,),
        "max_steps": (-1,),
        "micro_batch": (0,),
        "grad_accum": (0,),
        "window_steps": (0,),
        "max_tokens": (4,),
        "lr": (0.0, -1.0, *FLOATS),
        "weight_decay": (-3.0, *FLOATS),
        "warmup_steps": (-1,),
        "min_lr_ratio": (-0.1, 1.5, *FLOATS),
        "grad_clip": (-1.0, *FLOATS),
        "seed": (-1,),
        "actors": (0,),
        "cpus": (-1.0, *FLOATS),
        "gpus": (0.5, 2, -1, *FLOATS),
        "threads": (-1,),
        "log_every": (0,),
        "checkpoint_every": (0,),
        "keep_checkpoints": (0,),
        "max_failures": (-1,),
        "fail_at_step": (-1,),
    },
    "EvaluateConfig": {
        "limit": (0,),
        "sample_seed": (-1,),
        "shots": ([-1], [0, 99]),
        "ppl_max_docs": (0,),
        "window": (1,),
        "stride": (0, 4096),  # 4096 > window
        "max_tokens": (1,),
        "max_batch_tokens": (1,),
        "cpus": (-1.0, *FLOATS),
        "gpus": (-1.0, *FLOATS),
        "threads": (-1,),
    },
    "PipelineSpec": {"ratios": ([0.3, NAN], [1.0], [INF]), "heldout_fraction": (0.0, *FLOATS), "seed": (-1,)},
    "DemoCorpusConfig": {"shards": (0,), "limit": (0,), "seed": (-1,)},
    "ReplicationSpec": {
        "pool": (1,),
        "pool_topic_docs": (0,),
        "heldout": (1,),
        "general_heldout": (1,),
        "budget": (0,),
        "epochs": (0,),
        "trials": ([], [-1], [0, 0]),
        "ratio": (0.0, 1.0, *FLOATS),
        "split_seed": (-1,),
        "ablation_ratios": ([1.5], [NAN], [0.3]),
        "ablation_coords": ([0],),
        "ablation_domain": ("physics",),
        "calibration": (1,),
        "dose": ([0.0], [1.0], [0.25, 0.25]),
        "pilot_ratios": ([1.0], [0.3, 0.3]),
        "alternatives": (["tfidf"],),
    },
}
CASES = [(config, name, value) for config, fields in BAD.items() for name, values in fields.items() for value in values]


def refusal(config: str, name: str, value: object) -> ConfigError | None:
    """The ConfigError that building `config` with `name=value` raises, or None when it is accepted."""
    try:
        _factories()[config](**{name: value})
    except ConfigError as error:
        return error
    return None


def _no_ray(*args, **kwargs):
    raise AssertionError("a config's construction started Ray")


@pytest.mark.parametrize("config, name, value", CASES, ids=[f"{c}-{n}={v!r}" for c, n, v in CASES])
def test_a_bad_value_is_refused_at_construction_naming_its_field(config, name, value, monkeypatch):
    import ray

    started = ray.is_initialized()  # another test file's session Ray may be up; this case must not start one
    monkeypatch.setattr(ray, "init", _no_ray)
    error = refusal(config, name, value)
    assert error is not None, f"{config}({name}={value!r}) was accepted"
    assert error.field == name, f"{config}({name}={value!r}) blamed {error.field!r}: {error}"
    assert str(error).startswith(f"{name}=")
    assert ray.is_initialized() is started


def test_every_config_accepts_its_defaults():
    """The factories themselves are valid, so each refusal above is the bad value's doing."""
    for config, build in _factories().items():
        assert build() is not None, config


def test_bad_values_fail_before_ray_starts_in_a_fresh_process():
    """In a process of its own (no test session's Ray), every case is refused and Ray never starts."""
    code = (
        "import ray, test_config_validation as t\n"
        "wrong = [c for c in t.CASES if (e := t.refusal(*c)) is None or e.field != c[1]]\n"
        "assert not wrong, wrong\n"
        "assert ray.is_initialized() is False\n"
        "print(len(t.CASES))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) == len(CASES)


PACKAGES = ("core", "curation", "training", "pipeline", "experiments", "jobs")
BUILT_FROM_CHECKED = {
    # Config dataclasses no user writes: code builds them from configs the table above already checks.
    "EncoderSettings": "built from a checked CurateConfig or TrainSAEConfig and the SAE's cfg.json",
    "PrepareSettings": "built from a checked DistillConfig",
    "GenerationSettings": "a base of TeacherConfig and DistillConfig, whose tables check every field of it",
    "LoopConfig": "what each fine-tuning worker runs from, built from a checked FinetuneConfig and its plan",
    "HoldoutConfig": "a replication step's config, built from a checked ReplicationSpec",
    "ArmConfig": "a replication step's config, built from a checked ReplicationSpec",
    "RankConfig": "a replication step's config, built from a checked ReplicationSpec and its sae and curate settings",
}


def _config_classes() -> dict[str, type]:
    """Every dataclass of the project named *Config, *Spec or *Settings, by class name."""
    import importlib
    import pkgutil

    found: dict[str, type] = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                is_config = name.endswith(("Config", "Spec", "Settings")) and dataclasses.is_dataclass(obj)
                if is_config and isinstance(obj, type) and obj.__module__ == module.__name__:
                    found[name] = obj
    return found


def _numeric_fields(cls: type) -> dict[str, bool]:
    """Field name -> whether it holds a list, for every field typed int or float (optional, or a list of them)."""
    import types
    import typing

    def kinds(annotation: object) -> set[str]:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            return set().union(*(kinds(arg) for arg in typing.get_args(annotation)))
        if origin is list:
            return {"list"} if kinds(typing.get_args(annotation)[0]) & {"number"} else set()
        return {"number"} if annotation in (int, float) else set()

    hints = typing.get_type_hints(cls)
    found = {spec.name: kinds(hints[spec.name]) for spec in dataclasses.fields(cls)}
    return {name: "list" in kind for name, kind in found.items() if kind}


def test_every_config_with_numeric_fields_is_in_the_table():
    """A new config class must join the table (or say which checked config builds it), so it can't escape."""
    covered = {type(build()).__name__ for build in _factories().values()}
    loose = sorted(
        name
        for name, cls in _config_classes().items()
        if _numeric_fields(cls) and name not in covered and name not in BUILT_FROM_CHECKED
    )
    assert loose == [], f"add these to _factories() and BAD: {loose}"
    assert set(BUILT_FROM_CHECKED) <= set(_config_classes())  # no stale entries


def test_every_numeric_field_of_every_config_refuses_nan_and_infinities():
    """Walks the fields themselves, not the BAD table: a new numeric field is checked the day it is added."""
    escaped = []
    for config, build in _factories().items():
        cls = type(build())
        if not dataclasses.is_dataclass(cls):  # Catalog and LeaseKeeper: their arguments are in BAD
            continue
        for name, is_list in _numeric_fields(cls).items():
            for bad in FLOATS:
                value = [bad] if is_list else bad
                error = refusal(config, name, value)
                if error is None or error.field != name:
                    escaped.append(f"{config}.{name}={value!r}: {error or 'accepted'}")
    assert escaped == []


@pytest.mark.parametrize(
    "bounds, value, message",
    [
        ({"ge": 1}, 0, "must be >= 1"),
        ({"gt": 0}, NAN, "must be a finite number > 0"),
        ({"ge": 0, "le": 1}, 2.0, "must be in [0, 1]"),
        ({"gt": 0, "le": 1}, INF, "must be a finite number in (0, 1]"),
        ({"ge": 0}, "3", "must be a finite number >= 0"),
        ({"ge": 0}, True, "must be a finite number >= 0"),
    ],
)
def test_check_range_names_the_field_and_the_range(bounds, value, message):
    from core.errors import check_range

    with pytest.raises(ConfigError) as caught:
        check_range("some_field", value, **bounds)
    assert caught.value.field == "some_field"
    assert message in str(caught.value)


def test_check_range_accepts_values_in_range_and_an_unset_optional():
    from core.errors import check_range

    check_range("x", 0, ge=0)
    check_range("x", 1.0, gt=0, le=1)
    check_range("x", None, ge=1, optional=True)
    with pytest.raises(ConfigError):
        check_range("x", None, ge=1)
