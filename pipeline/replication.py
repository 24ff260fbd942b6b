"""The replication: does a pruned model recover more on FineScope-curated data than on random data?

One spec (:class:`ReplicationSpec`, YAML) names the domains of the packaged labelled corpus (each with its
`meta.topic`), the documents per arm, the trials and the two ablations. The graph, every step cached and
resumable like the pipeline's (`ROOT/pipeline.json`), so it may be run in parts:

    holdout -> sae/tN -> curate/tN -> arm/D/finescope-tN --.
            -> arm/D/oracle -------------------------------+-> union/D -> distill/D -> train/<arm> --.
            -> arm/random-tN -----------------------------> union/random -> distill/random -> ...    |
    arm/D/finescope-t0 -> prune/D ------------------------------------------------------------+-> finetune/D/<arm>
    finetune/D/* -> evaluate/D/domain, evaluate/D/general -> ROOT/replication.md

- **Held-out sets** are drawn from the labelled corpus before anything else: per domain `heldout`
  documents of its topic, and `general_heldout` of any topic. The pool every arm draws from is the rest
  (`pool` documents), so no curator chose a held-out document and no arm trained on one.
- **Arms** get `budget` documents each, the same pruned model (pruned on FineScope's trial-0 documents),
  the same hyper-parameters and the same number of optimizer steps: `finescope` (the curator's best for
  the domain), `random` (a seeded draw from the pool, shared by the domains), `oracle` (a seeded draw of
  the pool's documents labelled with the domain's topic: what a perfect curator would pick). Trials
  re-seed the SAE, the random draw and fine-tuning. References: the base and pruned models, the
  unpruned model fine-tuned on FineScope data (`unpruned`), and the pruned model fine-tuned on
  FineScope's raw text instead of the teacher's rewrites (`undistilled`).
- **The teacher** rewrites each document once per group of arms (the random arms; each domain's; the
  coordinates ablation's), since greedy decoding rewrites a document the same way whichever arm holds
  it, and each arm trains on its own rows of its group's rewrites. Groups keep the domains apart, so the
  job runs one domain at a time (`--only evaluate/mathematics`).
- **Ablations** on one domain: the pruning ratio (`ablation_ratios` with `ratio`) and the SAE's input
  coordinates (`ablation_coords`: K chosen by the Jacobian on the seeds, against all of them), each
  fine-tuned the same way.

`pipeline/replication_report.py` turns the evaluations into the tables, tests and plots.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from core import models, storage
from core.errors import ConfigError, check_range, check_seed
from core.runtime import RunConfig
from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.seeds import load_seeds
from curation.selection.curate import CurateConfig, run_curation
from pipeline import replication_data as data
from pipeline.steps import Step, ratio_tag, stage_config
from training.distillation.distill import DistillConfig, run_distill
from training.evaluation.evaluate import EvaluateConfig, run_evaluation
from training.finetuning.finetune import FinetuneConfig, run_finetune
from training.pruning.prune import PruneConfig, run_pruning

# Settings each stage takes from the replication's own fields; a spec that sets them per stage is refused.
_OWNED = {
    "sae": frozenset({"seed", "coords", "num_coords"}),
    "curate": frozenset({"rule", "top_n"}),
    "finetune": frozenset({"seed", "max_steps", "epochs"}),
    "evaluate": frozenset({"ppl_max_docs"}),
}


@dataclass
class ReplicationSpec(RunConfig):
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
    sae: dict[str, Any] = field(default_factory=dict)
    curate: dict[str, Any] = field(default_factory=dict)
    prune: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)

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


class _Graph:
    """Builds the replication's steps in an order that runs each after the ones it reads."""

    def __init__(self, spec: ReplicationSpec):
        self.spec, self.root = spec, spec.root.rstrip("/")
        self.steps: list[Step] = []
        self.shared = {name: getattr(spec, name) for name in ("s3_endpoint", "s3_region", "ray_address")}
        probe = self.config("finetune", FinetuneConfig, {"model": spec.model, "data": "-", "out": "-"})
        rows_per_step = probe.micro_batch * probe.grad_accum * probe.num_workers
        self.max_steps = max(1, spec.budget * spec.epochs // rows_per_step)

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def config(self, stage: str, cls: type, wired: dict[str, Any]) -> Any:
        return stage_config(self.spec, stage, cls, wired, _OWNED.get(stage, frozenset()))

    def add(self, name: str, stage: str, config: Any, run: Any, after: list[str]) -> str:
        self.steps.append(Step(name, stage, config, run, after))
        return config.out

    def holdout(self) -> None:
        spec = self.spec
        config = data.HoldoutConfig(
            out=self.path("data"), topics=dict(spec.domains), pool=spec.pool, pool_topic_docs=spec.pool_topic_docs,
            heldout=spec.heldout, general=spec.general_heldout, seed=spec.split_seed, **self.shared,
        )  # fmt: skip
        self.add("holdout", "holdout", config, data.run_holdout, [])

    def curation(self, tag: str, sae_settings: dict[str, Any]) -> str:
        """Train an SAE on the pool and curate the pool with it; returns the curate step's name."""
        spec, pool = self.spec, [data.pool_glob(self.path("data"))]
        wired = {"corpus": pool, "out": self.path("sae", tag), "model": spec.model, "seeds": spec.seeds, **sae_settings}
        sae_out = self.add(f"sae/{tag}", "sae", self.config("sae", TrainSAEConfig, wired), run_train_sae, ["holdout"])
        wired = {"corpus": pool, "seeds": spec.seeds, "sae": sae_out, "out": self.path("curate", tag),
                 "model": spec.model, "rule": "global_topn", "top_n": spec.budget}  # fmt: skip
        config = self.config("curate", CurateConfig, wired)
        self.add(f"curate/{tag}", "curate", config, run_curation, ["holdout", f"sae/{tag}"])
        return f"curate/{tag}"

    def arm(self, name: str, kind: str, seed: int, domain: str | None = None, curate: str | None = None) -> str:
        spec = self.spec
        config = data.ArmConfig(
            out=self.path("arms", name), kind=kind, holdout=self.path("data"), domain=domain,
            topic=spec.domains.get(domain) if domain else None, budget=spec.budget, seed=seed,
            curated=self.path(*curate.split("/")) if curate else None, **self.shared,
        )  # fmt: skip
        self.add(f"arm/{name}", "arm", config, data.run_arm, ["holdout", *([curate] if curate else [])])
        return name

    def teacher_data(self, group: str, arms: list[str], raw: dict[str, str]) -> dict[str, str]:
        """The union of a group's arms' documents, rewritten once, and each arm's selection of it (and, in
        `raw`, training names that read an arm's original text). Returns training name -> rows directory.
        Groups (the random arms, and each domain's) let a part of the replication run without the others."""
        spec = self.spec
        union = data.UnionConfig(out=self.path("union", group), arms=[self.path("arms", a) for a in arms],
                                 **self.shared)  # fmt: skip
        self.add(f"union/{group}", "union", union, data.run_union, [f"arm/{a}" for a in arms])
        wired = {"data": data.rows_dir(union.out), "teacher": spec.teacher or spec.model, "backend": spec.backend,
                 "out": self.path("distill", group)}  # fmt: skip
        config = self.config("distill", DistillConfig, wired)
        self.add(f"distill/{group}", "distill", config, run_distill, [f"union/{group}"])
        chosen = {a: (a, "teacher") for a in arms} | {name: (a, "original") for name, a in raw.items()}
        rows = {}
        for name, (arm, target) in chosen.items():
            config = data.SelectConfig(out=self.path("train", name), arm=self.path("arms", arm),
                                       distilled=self.path("distill", group), target=target, **self.shared)  # fmt: skip
            self.add(f"train/{name}", "select", config, data.run_select, [f"arm/{arm}", f"distill/{group}"])
            rows[name] = data.rows_dir(config.out)
        return rows

    def prune(self, domain: str, ratio: float, arm: str) -> str:
        wired = {"model": self.spec.model, "data": data.rows_dir(self.path("arms", arm)),
                 "out": self.path("pruned", f"{domain}-{ratio_tag(ratio)}"), "ratio": ratio}  # fmt: skip
        name = f"prune/{domain}/{ratio_tag(ratio)}"
        self.add(name, "prune", self.config("prune", PruneConfig, wired), run_pruning, [f"arm/{arm}"])
        return name

    def finetune(self, name: str, model_step: str | None, rows: tuple[str, str], seed: int) -> str:
        """Fine-tune the pruned model of `model_step` (None: the base model) on `rows` (training name, dir)."""
        spec = self.spec
        model = self.step(model_step).out if model_step else spec.model
        wired = {"model": model, "data": rows[1], "out": self.path("finetuned", name), "seed": seed,
                 "max_steps": self.max_steps, "epochs": spec.epochs + 1}  # fmt: skip
        if spec.finetune.get("kd_weight"):
            wired["teacher"] = spec.teacher or spec.model
        after = [*([model_step] if model_step else []), f"train/{rows[0]}"]
        self.add(f"finetune/{name}", "finetune", self.config("finetune", FinetuneConfig, wired), run_finetune, after)
        return f"finetune/{name}"

    def evaluate(self, name: str, labelled: dict[str, str], documents: str, limit: int, title: str) -> str:
        """Perplexity of `labelled` (label -> step name, or a model for the base) on one held-out set."""
        entries = [f"{label}={self.model_of(source)}" for label, source in labelled.items()]
        wired = {"models": entries, "out": self.path("eval", name), "mmlu": [], "ppl": [documents],
                 "ppl_topic": None, "ppl_name": title, "ppl_max_docs": limit}  # fmt: skip
        after = [source for source in labelled.values() if source in self.names()]
        self.add(f"evaluate/{name}", "evaluate", self.config("evaluate", EvaluateConfig, wired), run_evaluation, after)
        return f"evaluate/{name}"

    def names(self) -> set[str]:
        return {s.name for s in self.steps}

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def model_of(self, source: str) -> str:
        if source not in self.names():
            return source
        step = self.step(source)
        return storage.join(step.out, "model") if step.stage == "finetune" else step.out


def build_replication(spec: ReplicationSpec) -> tuple[list[Step], dict[str, Any]]:
    """Every step of the replication, and where the report finds each evaluation."""
    graph = _Graph(spec)
    graph.holdout()
    trials, domains, focus = spec.trials, list(spec.domains), spec.ablation_domain
    for t in trials:
        graph.curation(f"t{t}", {"seed": t, "coords": "all"})
    for k in spec.ablation_coords:
        graph.curation(f"k{k}", {"seed": trials[0], "coords": "jacobian", "num_coords": k})
    rows = graph.teacher_data("random", [graph.arm(f"random-t{t}", "random", t) for t in trials], {})
    for d in domains:
        arms = [graph.arm(f"{d}/finescope-t{t}", "finescope", t, d, f"curate/t{t}") for t in trials]
        arms.append(graph.arm(f"{d}/oracle", "oracle", spec.split_seed, d))
        rows |= graph.teacher_data(d, arms, {f"{d}/undistilled": f"{d}/finescope-t{trials[0]}"})
    if spec.ablation_coords:
        arms = [graph.arm(f"{focus}/finescope-k{k}", "finescope", trials[0], focus, f"curate/k{k}")
                for k in spec.ablation_coords]  # fmt: skip
        rows |= graph.teacher_data("coords", arms, {})
    layout: dict[str, Any] = {"domains": {}, "ratio": None, "coords": None}
    pruned = {}
    for d in domains:
        pruned[d] = graph.prune(d, spec.ratio, f"{d}/finescope-t{trials[0]}")
        layout["domains"][d] = _domain_arms(graph, d, pruned[d], rows)
    if spec.ablation_ratios:
        layout["ratio"] = _ratio_ablation(graph, focus, pruned[focus], rows)
    if spec.ablation_coords:
        layout["coords"] = _coords_ablation(graph, focus, pruned[focus], rows)
    return graph.steps, layout


def _domain_arms(graph: _Graph, d: str, pruned: str, rows: dict[str, str]) -> tuple[str, str]:
    """One domain's fine-tunes and its two evaluations; returns their results.json URIs."""
    spec, trials = graph.spec, graph.spec.trials
    sources: dict[str, str] = {"base": spec.model, "pruned": pruned}
    for t in trials:
        sources[f"finescope-t{t}"] = graph.finetune(
            f"{d}/finescope-t{t}", pruned, _rows(rows, f"{d}/finescope-t{t}"), t
        )
    for t in trials:
        sources[f"random-t{t}"] = graph.finetune(f"{d}/random-t{t}", pruned, _rows(rows, f"random-t{t}"), t)
    first = _rows(rows, f"{d}/finescope-t{trials[0]}")
    sources["oracle"] = graph.finetune(f"{d}/oracle", pruned, _rows(rows, f"{d}/oracle"), trials[0])
    sources["unpruned"] = graph.finetune(f"{d}/unpruned", None, first, trials[0])
    sources["undistilled"] = graph.finetune(f"{d}/undistilled", pruned, _rows(rows, f"{d}/undistilled"), trials[0])
    topic = spec.domains[d]
    held, general = data.heldout_glob(graph.path("data"), d), data.heldout_glob(graph.path("data"), data.GENERAL)
    graph.evaluate(f"{d}/domain", sources, held, spec.heldout, f"{d}: {topic} documents held out before curation")
    graph.evaluate(
        f"{d}/general", sources, general, spec.general_heldout, "general: documents of every topic, held out"
    )
    return graph.path("eval", d, "domain", "results.json"), graph.path("eval", d, "general", "results.json")


def _rows(rows: dict[str, str], name: str) -> tuple[str, str]:
    return name, rows[name]


def _ratio_ablation(graph: _Graph, d: str, main_pruned: str, rows: dict[str, str]) -> tuple[str, str, list[float]]:
    spec, first = graph.spec, _rows(rows, f"{d}/finescope-t{graph.spec.trials[0]}")
    sources: dict[str, str] = {"base": spec.model}
    ratios = sorted([*spec.ablation_ratios, spec.ratio])
    for r in ratios:
        pruned = main_pruned if r == spec.ratio else graph.prune(d, r, first[0])
        sources[f"pruned-{ratio_tag(r)}"] = pruned
        name = f"{d}/finescope-t{spec.trials[0]}" if r == spec.ratio else f"{d}/ratio-{ratio_tag(r)}"
        sources[f"finescope-{ratio_tag(r)}"] = (
            f"finetune/{name}" if r == spec.ratio else graph.finetune(name, pruned, first, spec.trials[0])
        )
    held = data.heldout_glob(graph.path("data"), d)
    graph.evaluate("ablation-ratio", sources, held, spec.heldout, f"{d}: {spec.domains[d]} documents, by pruning ratio")
    return d, graph.path("eval", "ablation-ratio", "results.json"), ratios


def _coords_ablation(graph: _Graph, d: str, pruned: str, rows: dict[str, str]) -> tuple[str, str, list[Any]]:
    spec = graph.spec
    sources: dict[str, str] = {"base": spec.model, "pruned": pruned}
    for k in spec.ablation_coords:
        sources[f"finescope-k{k}"] = graph.finetune(f"{d}/coords-k{k}", pruned, _rows(rows, f"{d}/finescope-k{k}"),
                                                    spec.trials[0])  # fmt: skip
    sources["finescope-kall"] = f"finetune/{d}/finescope-t{spec.trials[0]}"
    held = data.heldout_glob(graph.path("data"), d)
    title = f"{d}: {spec.domains[d]} documents, by SAE input coordinates"
    graph.evaluate("ablation-coords", sources, held, spec.heldout, title)
    return d, graph.path("eval", "ablation-coords", "results.json"), [*spec.ablation_coords, "all"]


def budget_rows(steps: list[Step], options: storage.StorageOptions) -> list[dict[str, Any]]:
    """Per fine-tune: documents, training tokens and optimizer steps, from its manifest."""
    from core import manifest

    rows = []
    for step in steps:
        if step.stage != "finetune":
            continue
        found = manifest.read_manifest(step.out, options)
        if found:
            counts = found["counts"]
            rows.append({"arm": step.name.removeprefix("finetune/"), "documents": counts["rows"],
                         "tokens": counts["tokens"], "steps": counts["steps"]})  # fmt: skip
    return rows


def now() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def run_replication(spec: ReplicationSpec, only: list[str] | None = None, command: str = "") -> dict[str, Any]:
    """Run every step not up to date (or only `only` and what it needs), then write the report from the
    evaluations that exist. Returns the state, with the report's text and URI."""
    from pipeline.replication_report import ReplicationLayout, write_report
    from pipeline.runner import run_steps, spec_dict

    spec.check_seeds()
    steps, layout = build_replication(spec)
    options = spec.storage_options()
    state = run_steps(steps, spec.root, options, force=spec.force, only=only, spec_dict=spec_dict(spec))
    records = state["steps"]
    hours = sum(record.get("seconds", 0.0) for record in records.values()) / 3600
    header = [
        "# Replication: FineScope data against random data, on held-out labelled documents",
        "",
        f"Command: `{command or 'python -m jobs.replicate --spec SPEC'}`; report written {now()}; steps' run time "
        f"{hours:.2f} h on {os.cpu_count()} CPUs (each step's last run, over every part).",
        f"Base model `{spec.model}`, ratio {spec.ratio}, {spec.budget} documents per arm, {len(spec.trials)} trials "
        f"({', '.join(map(str, spec.trials))}), held-out {spec.heldout} per domain and {spec.general_heldout} general.",
        "",
    ]
    ready = {d: uris for d, uris in layout["domains"].items() if all(storage.exists(u, options) for u in uris)}
    report_layout = ReplicationLayout(
        domains=ready,
        trials=list(spec.trials),
        ratio_ablation=_if_done(layout["ratio"], options),
        coords_ablation=_if_done(layout["coords"], options),
        budget=budget_rows(steps, options),
    )
    report = write_report(spec.root, report_layout, options, header=header)
    from pipeline.report import steps_table

    text = report["markdown"] + "\n" + "\n".join(steps_table(spec.root, steps, records, options)) + "\n"
    uri = storage.join(spec.root, "replication.md")
    storage.write_bytes_atomic(uri, text.encode(), options)
    return {**state, "report": text, "report_uri": uri, "figures": report.get("figures", {})}


def _if_done(entry: tuple | None, options: storage.StorageOptions) -> tuple | None:
    return entry if entry and storage.exists(entry[1], options) else None


@dataclass
class ReplicationJobConfig:
    """What `python -m jobs.replicate` does."""

    spec: str = ""
    """The replication spec (YAML): domains and topics, pool, held-out sizes, budget, trials, ablations."""
    root: str | None = None
    """Overrides the spec's storage root."""
    only: list[str] = field(default_factory=list)
    """Run only these steps (or stages, or step prefixes such as `finetune/mathematics`) and what they need."""
    force: bool = False
    """Redo every step, even those that are up to date."""
    ray_address: str | None = None
    """Ray cluster to join; unset: $RAY_ADDRESS (set by `ray job submit`), else a local Ray."""

    def __post_init__(self) -> None:
        if not self.spec:
            raise ConfigError("spec", self.spec, "is required: pass --spec REPLICATION.yaml")


def run_replication_job(config: ReplicationJobConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = {"force": config.force}
    if config.root:
        overrides["root"] = config.root
    if config.ray_address:
        overrides["ray_address"] = config.ray_address
    spec = load_replication_spec(config.spec, overrides)
    command = f"python -m jobs.replicate --spec {config.spec}"
    return run_replication(spec, config.only or None, command=command)
