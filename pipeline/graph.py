"""A graph of stage steps: each step is one stage's config, wired from a spec, and the steps it reads.

The pipeline (`pipeline/steps.py`) and every study built on it (`experiments/`) build their graphs with
:class:`Graph` and run them with `pipeline.runner.run_steps`, which skips a step whose key is unchanged and
whose stage finds its inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core import cli, storage
from core.errors import ConfigError
from core.stage import Stage


@dataclass
class Step:
    name: str
    """`stage` or `stage/domain[/ratio]`; also its place in `pipeline.json`."""
    stage: str
    config: Any
    contract: Stage
    """The stage that runs it (core.stage): its plan says whether the step's inputs changed."""
    after: list[str]
    """The steps whose outputs this one reads."""

    @property
    def out(self) -> str:
        return self.config.out


WIRED = {
    "sae": {"corpus", "out", "model", "seeds"},
    "curate": {"corpus", "seeds", "sae", "out", "model"},
    "prune": {"model", "data", "out", "ratio"},
    "distill": {"data", "teacher", "backend", "out"},
    "finetune": {"model", "data", "out", "teacher"},
    "evaluate": {"models", "out", "mmlu", "ppl", "ppl_name", "ppl_topic"},
}
"""Keys a graph sets in each stage's config from its spec's top-level fields; a spec that sets them under
the stage is refused."""
SHARED = ("s3_endpoint", "s3_region", "ray_address")
"""A spec's storage and Ray fields, which every step's config takes."""


def stage_config(spec: Any, stage: str, cls: type, wired: dict[str, Any], owned: frozenset[str] = frozenset()) -> Any:
    """A stage's config: the spec's settings for it (`spec.<stage>`), the wiring, and the spec's storage and
    Ray fields. A setting the graph sets itself (the wiring, plus `owned`) is refused."""
    settings = dict(getattr(spec, stage))
    clash = sorted(set(settings) & (WIRED[stage] | owned))
    if clash:
        raise ConfigError(
            f"{stage}.{clash[0]}", settings[clash[0]], "is set by the job from the spec's top-level fields; "
            "remove it from this stage's settings"
        )  # fmt: skip
    shared = {name: getattr(spec, name) for name in SHARED}
    try:
        return cli.from_mapping(cls, {**settings, **wired, **shared}, origin=f"the spec's `{stage}:` settings")
    except ConfigError as error:
        raise ConfigError(f"{stage}.{error.field}", error.value, error.fix) from None


class Graph:
    """Steps added in an order that runs each after the ones it reads, under one storage root."""

    def __init__(self, spec: Any, owned: dict[str, frozenset[str]] | None = None):
        self.spec, self.root = spec, spec.root.rstrip("/")
        self.owned = owned or {}
        self.steps: list[Step] = []

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def shared(self) -> dict[str, Any]:
        """The spec's storage and Ray fields, for configs built here rather than from the spec's settings."""
        return {name: getattr(self.spec, name) for name in SHARED}

    def config(self, stage: str, cls: type, wired: dict[str, Any]) -> Any:
        return stage_config(self.spec, stage, cls, wired, self.owned.get(stage, frozenset()))

    def add(self, name: str, stage: str, config: Any, contract: Stage, after: list[str]) -> str:
        """Add a step; returns its output directory."""
        self.steps.append(Step(name, stage, config, contract, after))
        return config.out

    def names(self) -> set[str]:
        return {step.name for step in self.steps}

    def step(self, name: str) -> Step:
        return next(step for step in self.steps if step.name == name)

    def model_of(self, source: str) -> str:
        """The model a step wrote (a fine-tune's `model/`, a pruning's output), or `source` itself when it
        names no step (a model reference)."""
        if source not in self.names():
            return source
        step = self.step(source)
        return storage.join(step.out, "model") if step.stage == "finetune" else step.out


def step_key(step: Step, upstream_hashes: list[str]) -> str:
    """What a step's output depends on: its stage, its config (less how it executes) and its inputs' hashes."""
    payload = {"stage": step.stage, "config": step.config.content(), "upstream": upstream_hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ratio_tag(ratio: float) -> str:
    return f"{ratio:.2f}"
