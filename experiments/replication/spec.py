"""The replication's spec: domains of a labelled corpus, the pool, held-out sets, budget, trials, ablations."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from core import models, storage
from core.errors import ConfigError, check_range, check_seed
from core.runtime import RunConfig
from curation.seeds import load_seeds
from pipeline.spec import StageSettings

# Settings each stage takes from the replication's own fields; a spec that sets them per stage is refused.
OWNED = {
    "sae": frozenset({"seed", "coords", "num_coords"}),
    "curate": frozenset({"rule", "top_n"}),
    "finetune": frozenset({"seed", "max_steps", "epochs"}),
    "evaluate": frozenset({"ppl_max_docs"}),
}


@dataclass
class ReplicationSpec(StageSettings, RunConfig):
    root: str = ""
    """Storage root, local or s3://: every step writes under it, with pipeline.json and replication.md."""
    model: str = models.DEFAULT_MODEL
    """The base model: an embedded name (smollm2-135m), a Hugging Face directory, a .gguf file, a Hub id
    (org/name or org/name@revision) or an s3:// prefix."""
    seeds: str = "jobs/seeds/wikipedia-topics.jsonl"
    """Seeds file (JSONL with `text` and `domain`); every domain below needs seeds there."""
    domains: dict[str, str] = field(default_factory=dict)
    """Domain of the seeds file -> the `meta.topic` of its documents in the packaged corpus."""
    pool: int = 4000
    """Documents in the pool the arms draw from (after the held-out sets are set aside)."""
    pool_topic_docs: int = 200
    """At most this many documents of each domain's topic in the pool (the oracle draws `budget` of them);
    documents of the other topics fill the pool."""
    heldout: int = 60
    """Held-out documents per domain, labelled with its topic."""
    general_heldout: int = 120
    """Held-out documents of any topic: what specialisation costs elsewhere."""
    budget: int = 150
    """Training documents per arm."""
    epochs: int = 1
    """Passes over `budget` documents; every arm runs the same number of optimizer steps."""
    trials: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the FineScope and random arms (SAE training, random draw, fine-tuning)."""
    ratio: float = 0.30
    """Pruning ratio of every arm."""
    teacher: str | None = None
    """The distillation teacher, in any form `model` takes; unset: the base model."""
    backend: Literal["transformers", "vllm"] = "transformers"
    split_seed: int = 0
    """Seed of the held-out draw, the pool and the oracle's draw."""
    ablation_domain: str | None = None
    """The domain of the two ablations; unset: the first domain."""
    ablation_ratios: list[float] = field(default_factory=lambda: [0.10, 0.20, 0.40])
    """Pruning ratios besides `ratio` (empty: no ratio ablation)."""
    ablation_coords: list[int] = field(default_factory=lambda: [48, 96, 192])
    """SAE input coordinates K, chosen by the Jacobian, against all of them (empty: no coordinates ablation)."""

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("root", self.root, "is required: set `root:` in the spec")
        if not self.domains or not all(isinstance(t, str) and t for t in self.domains.values()):
            raise ConfigError("domains", self.domains, "map each domain to its topic, e.g. {mathematics: Mathematics}")
        for name in ("pool", "pool_topic_docs", "heldout", "general_heldout", "budget", "epochs"):
            check_range(name, getattr(self, name), ge=2 if name != "epochs" else 1)
        if not self.trials or len(set(self.trials)) != len(self.trials):
            raise ConfigError("trials", self.trials, "give one or more distinct seeds, e.g. [0, 1, 2]")
        for trial in self.trials:
            check_seed("trials", trial)
        check_seed("split_seed", self.split_seed)
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError("ratio", self.ratio, "must be in (0, 1), e.g. 0.3")
        if any(not 0.0 < r < 1.0 or r == self.ratio for r in self.ablation_ratios):
            raise ConfigError("ablation_ratios", self.ablation_ratios, f"each in (0, 1) and not `ratio` ({self.ratio})")
        if any(not isinstance(k, int) or k < 1 for k in self.ablation_coords):
            raise ConfigError("ablation_coords", self.ablation_coords, "give input-coordinate counts, e.g. [48, 96]")
        self.ablation_domain = self.ablation_domain or next(iter(self.domains))
        if self.ablation_domain not in self.domains:
            raise ConfigError("ablation_domain", self.ablation_domain, f"must be one of {sorted(self.domains)}")
        self.root = storage.absolute(self.root)
        self.seeds = storage.absolute(self.seeds)
        for name in ("model", "teacher"):
            if getattr(self, name):
                models.model_ref(getattr(self, name), name)  # a reference of no known form fails before any step
        if os.path.exists(self.model):
            self.model = storage.absolute(self.model)

    def check_seeds(self) -> None:
        """Every domain has seeds: checked before any step runs."""
        found = set(load_seeds(self.seeds, self.storage_options()).domains)
        missing = sorted(set(self.domains) - found)
        if missing:
            raise ConfigError("domains", missing, f"have no seeds in {self.seeds} (it has {sorted(found)})")


def load_replication_spec(path: str, overrides: dict[str, Any] | None = None) -> ReplicationSpec:
    from core import cli

    values = {**cli.load_yaml(path, flag="--spec"), **(overrides or {})}
    return cli.from_mapping(ReplicationSpec, values, origin=path)


def arm_labels(trials: list[int]) -> list[str]:
    """The domain evaluations' model labels, in the report's order."""
    return ["base", "pruned", *(f"finescope-t{t}" for t in trials), *(f"random-t{t}" for t in trials),
            "oracle", "unpruned", "undistilled"]  # fmt: skip
