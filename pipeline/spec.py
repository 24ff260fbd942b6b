"""The pipeline spec: one YAML file that names the model, corpus, seeds, domains, ratios and stage settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from core import cli, models, storage
from core.errors import ConfigError, check_range, check_seed
from core.runtime import RunConfig


@dataclass
class DomainSpec:
    """What the pipeline needs to know about one domain of the seeds file."""

    mmlu: list[str] = field(default_factory=list)
    """MMLU subjects or groups that test this domain (`high_school_mathematics`, `stem`); empty: none."""
    heldout: list[str] = field(default_factory=list)
    """Labelled held-out documents of this domain (paths or globs; JSONL or Parquet with `text`), outside the
    corpus, so no stage curated, pruned on or trained on them: the domain perplexity is measured on them.
    Empty: on a held-out split of the curated rows, which are FineScope's own choices and favour its arm."""
    topic: str | None = None
    """With `heldout`: keep only its documents whose `meta.topic` is this (e.g. Mathematics)."""


@dataclass
class StageSettings:
    """Each stage's own settings in a spec, under its name, with the names of that stage's job flags. A graph
    builds every stage's config from them before any step runs (pipeline.graph.stage_config), so a wrong
    key or value fails at once and names `stage.field`."""

    sae: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.train_sae` (its flag names, e.g. `layer`, `max_train_tokens`)."""
    curate: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.curate` (e.g. `rule`, `top_n`, `threshold`)."""
    prune: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.prune` (e.g. `method`, `ranking`, `max_docs`); the ratio comes from the spec."""
    distill: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.distill` (e.g. `max_new_tokens`, `batch_size`, `engine_kwargs`)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.finetune` (e.g. `max_steps`, `lr`, `zero_stage`, `kd_weight`, `lora_r`)."""
    evaluate: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.evaluate` (e.g. `limit`, `shots`)."""


@dataclass
class PipelineSpec(StageSettings, RunConfig):
    root: str = ""
    """Storage root, local or s3://: every stage writes under it, with `pipeline.json` and `report.md`."""
    model: str = models.DEFAULT_MODEL
    """The base model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    corpus: list[str] = field(default_factory=list)
    """Corpus shards: paths, directories or globs, local or s3:// (RedPajama JSONL, plain/.gz/.zst)."""
    seeds: str = ""
    """Seeds file (JSONL with `text` and `domain`); every domain in `domains` must have seeds there."""
    domains: dict[str, Any] = field(default_factory=dict)
    """Domains to specialise to, each with its evaluation settings: `{mathematics: {mmlu: [stem]}}`."""
    ratios: list[float] = field(default_factory=lambda: [0.30])
    """Pruning ratios (share of total parameters removed); one pruned and fine-tuned model per ratio."""
    teacher: str | None = None
    """The distillation teacher (and KD teacher when finetune.kd_weight > 0), in any form `model` takes;
    unset: the base model."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """The teacher's backend: `transformers` (CPU or one GPU) or `vllm` (GPU, through ray.data.llm)."""
    sae_path: str | None = None
    """An SAE trained before (a `jobs.train_sae` output) to reuse; unset: the pipeline trains one."""
    heldout_fraction: float = 0.2
    """Share of each domain's curated rows held out of pruning and fine-tuning, for its perplexity."""
    control: Literal["random", "none"] = "random"
    """`random`: also fine-tune each pruned model on random corpus documents of the same size (the
    report's control row); `none`: skip it."""
    seed: int = 0
    """Seed of the random control's draw."""

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        for name in ("root", "seeds"):
            if not getattr(self, name):
                raise ConfigError(name, getattr(self, name), f"is required: set `{name}:` in the spec")
        if not self.corpus:
            raise ConfigError("corpus", self.corpus, "is required: set `corpus:` to the shards' paths or globs")
        if not self.domains:
            raise ConfigError("domains", self.domains, "name at least one domain of the seeds file")
        self.domains = {str(name): _domain_spec(name, value) for name, value in self.domains.items()}
        if not self.ratios or any(not (isinstance(r, int | float) and 0.0 < r < 1.0) for r in self.ratios):
            raise ConfigError("ratios", self.ratios, "give one or more pruning ratios, each in (0, 1), e.g. [0.3]")
        if len(set(self.ratios)) != len(self.ratios):
            raise ConfigError("ratios", self.ratios, "each ratio once")
        check_range("heldout_fraction", self.heldout_fraction, gt=0.0, lt=1.0, hint="e.g. 0.2")
        check_seed("seed", self.seed)
        # Local paths become absolute: stage workers (Ray Train's above all) run in directories of their own.
        self.root = storage.absolute(self.root)
        self.corpus = [storage.absolute(pattern) for pattern in self.corpus]
        self.seeds = storage.absolute(self.seeds)
        if self.sae_path:
            self.sae_path = storage.absolute(self.sae_path)
        for name in ("model", "teacher"):
            value = getattr(self, name)
            if value:
                models.model_ref(value, name)  # a reference of no known form fails before any step runs
            if value and os.path.exists(value):  # a local path, not a registry name
                setattr(self, name, storage.absolute(value))


def _domain_spec(name: str, value: Any) -> DomainSpec:
    if value is None:
        return DomainSpec()
    if isinstance(value, DomainSpec):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"domains.{name}", value, "give a mapping such as {mmlu: [high_school_mathematics]}")
    try:
        domain = cli.from_mapping(DomainSpec, value, origin=f"domains.{name}")
    except ConfigError as error:
        raise ConfigError(f"domains.{name}.{error.field}", error.value, error.fix) from None
    if isinstance(domain.heldout, str):
        domain.heldout = [domain.heldout]
    if domain.topic and not domain.heldout:
        raise ConfigError(f"domains.{name}.topic", domain.topic, "filters `heldout`: give the held-out documents too")
    domain.heldout = [storage.absolute(pattern) for pattern in domain.heldout]
    return domain


def load_spec(path: str, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """A spec from its YAML file (plus command-line overrides); unknown keys and bad values name the field."""
    values = {**cli.load_yaml(path, flag="--spec"), **(overrides or {})}
    return cli.from_mapping(PipelineSpec, values, origin=path)
