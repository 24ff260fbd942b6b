"""The whole method as one job: SAE -> curate -> split -> prune -> distill -> fine-tune -> evaluate.

One spec file (YAML, :class:`PipelineSpec`) names the base model, the corpus, the seeds, the domains, the
pruning ratios, the teacher and its backend, and a storage root; each stage's own settings go under its
name (`sae:`, `curate:`, `prune:`, `distill:`, `finetune:`, `evaluate:`) with the same keys as that
stage's job flags. Every config is built and checked before anything runs, so a bad value fails at once
and names `stage.field`.

Steps form a graph, not a chain. Per domain `d` and ratio `r`:

    sae -> curate -> split/d -> prune/d/r ------------------> finetune/d/r --------> evaluate/d
                             -> distill/d ----------------/                     /
                             -> distill-random/d -> finetune-random/d/r -------/

`split/d` cuts the curated rows of `d` into train and held-out by a hash of each row's id (stable as the
corpus grows), and draws the random control: as many corpus documents, none of them curated for `d`,
as the train split has. The held-out rows give the domain perplexity; the control fine-tune (same
budget, random data of the same size) shows what the curation itself is worth.

A step's key hashes its config and the stage hashes of the steps it reads. `ROOT/pipeline.json` records
each finished step's key and its stage's manifest hash; a step whose key and manifest still match is
skipped without loading anything. Any other step is handed to its stage, which skips itself when its
own manifest (config plus input files) still matches, resumes from what it left after a crash
(distillation parts, fine-tuning checkpoints), or redoes it. Changing one stage's setting therefore
reruns that stage and exactly the steps downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from curation import cli, manifest, models, storage
from curation.curate import CurateConfig, run_curation
from curation.errors import ConfigError
from curation.runtime import EXECUTION_FIELDS, RunConfig
from curation.sae_training import TrainSAEConfig, run_train_sae
from curation.storage import StorageOptions
from training.distill import DistillConfig, run_distill
from training.evaluate import EvaluateConfig, run_evaluation
from training.finetune import FinetuneConfig, run_finetune
from training.prune import PruneConfig, run_pruning

logger = logging.getLogger(__name__)

STATE = "pipeline.json"
REPORT = "report.md"
STAGES = ("sae", "curate", "split", "prune", "distill", "finetune", "evaluate")


@dataclass
class DomainSpec:
    """What the pipeline needs to know about one domain of the seeds file."""

    mmlu: list[str] = field(default_factory=list)
    """MMLU subjects or groups that test this domain (`high_school_mathematics`, `stem`); empty: none."""


@dataclass
class PipelineSpec(RunConfig):
    root: str = ""
    """Storage root, local or s3://: every stage writes under it, with `pipeline.json` and `report.md`."""
    model: str = models.DEFAULT_MODEL
    """The base model: a name from the embedded registry, a Hugging Face directory, or an s3:// one."""
    corpus: list[str] = field(default_factory=list)
    """Corpus shards: paths, directories or globs, local or s3:// (RedPajama JSONL, plain/.gz/.zst)."""
    seeds: str = ""
    """Seeds file (JSONL with `text` and `domain`); every domain in `domains` must have seeds there."""
    domains: dict[str, Any] = field(default_factory=dict)
    """Domains to specialise to, each with its evaluation settings: `{mathematics: {mmlu: [stem]}}`."""
    ratios: list[float] = field(default_factory=lambda: [0.30])
    """Pruning ratios (share of total parameters removed); one pruned and fine-tuned model per ratio."""
    teacher: str | None = None
    """The distillation teacher (and KD teacher when finetune.kd_weight > 0); unset: the base model."""
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
    sae: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.train_sae` (its flag names, e.g. `layer`, `max_train_tokens`)."""
    curate: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.curate` (e.g. `rule`, `top_n`, `threshold`)."""
    prune: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.prune` (e.g. `method`, `ranking`, `max_docs`); the ratio comes from `ratios`."""
    distill: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.distill` (e.g. `max_new_tokens`, `batch_size`, `engine_kwargs`)."""
    finetune: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.finetune` (e.g. `max_steps`, `lr`, `zero_stage`, `kd_weight`, `lora_r`)."""
    evaluate: dict[str, Any] = field(default_factory=dict)
    """Settings for `jobs.evaluate` (e.g. `limit`, `shots`); the MMLU subjects come from `domains`."""

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
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise ConfigError("ratios", self.ratios, "give one or more pruning ratios, each in (0, 1), e.g. [0.3]")
        if len(set(self.ratios)) != len(self.ratios):
            raise ConfigError("ratios", self.ratios, "each ratio once")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError("heldout_fraction", self.heldout_fraction, "must be in (0, 1), e.g. 0.2")
        # Local paths become absolute: stage workers (Ray Train's above all) run in directories of their own.
        self.root = storage.absolute(self.root)
        self.corpus = [storage.absolute(pattern) for pattern in self.corpus]
        self.seeds = storage.absolute(self.seeds)
        if self.sae_path:
            self.sae_path = storage.absolute(self.sae_path)
        for name in ("model", "teacher"):
            value = getattr(self, name)
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
        return cli.from_mapping(DomainSpec, value, origin=f"domains.{name}")
    except ConfigError as error:
        raise ConfigError(f"domains.{name}.{error.field}", error.value, error.fix) from None


def load_spec(path: str, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """A spec from its YAML file (plus command-line overrides); unknown keys and bad values name the field."""
    values = {**cli.load_yaml(path), **(overrides or {})}
    return cli.from_mapping(PipelineSpec, values, origin=path)


# The split step ------------------------------------------------------------------------------------


@dataclass
class SplitConfig(RunConfig):
    """Cut one domain's curated rows into train and held-out, and draw the random control."""

    curated: str = ""
    """The curate stage's output directory (its `curated/` and `scored/` are read)."""
    domain: str = ""
    out: str = ""
    heldout_fraction: float = 0.2
    control: bool = True
    seed: int = 0


def heldout_mask(ids: list[str], fraction: float) -> np.ndarray:
    """True for the rows held out: a row's fate depends on its id alone, so it never changes side."""
    buckets = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:8], "big") / 2**64 for i in ids]
    return np.asarray(buckets) < fraction


def run_split(config: SplitConfig) -> dict[str, Any]:
    options = config.storage_options()
    curated_dir, scored_dir = storage.join(config.curated, "curated"), storage.join(config.curated, "scored")
    inputs = storage.expand([curated_dir, *([scored_dir] if config.control else [])], options)
    hashed = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION_FIELDS}
    digest = manifest.config_hash(hashed, inputs)
    if (done := manifest.finished(config.out, digest, options, config.force)) is not None:
        return done
    manifest.prepare_output(config.out, options)
    curated = storage.read_parquet(curated_dir, options)
    keep = [c for c in ("id", "text", "domain", "score", "source", "meta") if c in curated.column_names]
    rows = curated.select(keep).filter(pa.compute.equal(curated.column("domain"), config.domain))
    rows = rows.sort_by("id")
    if rows.num_rows < 2:
        found = sorted(set(curated.column("domain").to_pylist()))
        raise ConfigError(
            "domains", config.domain, f"has {rows.num_rows} curated rows (domains curated: {found}); "
            "it needs seeds in the seeds file and at least 2 curated rows (raise curate.top_n)"
        )  # fmt: skip
    mask = heldout_mask(rows.column("id").to_pylist(), config.heldout_fraction)
    if mask.all() or not mask.any():  # tiny sets: keep one row on each side
        mask = np.zeros(rows.num_rows, dtype=bool)
        mask[-1] = True
    train, heldout = rows.filter(pa.array(~mask)), rows.filter(pa.array(mask))
    storage.write_parquet_atomic(train, storage.join(config.out, "train", "part-00000.parquet"), options)
    storage.write_parquet_atomic(heldout, storage.join(config.out, "heldout", "part-00000.parquet"), options)
    counts: dict[str, Any] = {"train": train.num_rows, "heldout": heldout.num_rows}
    if config.control:
        scored = storage.read_parquet(scored_dir, options, columns=["id", "text", "source"])
        taken = set(rows.column("id").to_pylist())
        pool = scored.filter(pa.array([i not in taken for i in scored.column("id").to_pylist()]))
        pool = pool.sort_by("id")  # the draw must not depend on the order Ray wrote the files in
        if pool.num_rows < train.num_rows:
            raise ConfigError(
                "control", "random", f"the corpus has {pool.num_rows} uncurated documents for "
                f"{train.num_rows} control rows; use a larger corpus or `control: none`"
            )  # fmt: skip
        draw = np.random.default_rng(config.seed).choice(pool.num_rows, size=train.num_rows, replace=False)
        random_rows = pool.take(pa.array(np.sort(draw)))
        random_rows = random_rows.append_column("domain", pa.array(["random"] * random_rows.num_rows))
        storage.write_parquet_atomic(random_rows, storage.join(config.out, "random", "part-00000.parquet"), options)
        counts["random"] = random_rows.num_rows
    return manifest.write_manifest(
        config.out, stage="split", config=dataclasses.asdict(config), digest=digest, inputs=inputs,
        counts=counts, timings={}, options=options,
    )  # fmt: skip


# The graph ---------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    """`stage` or `stage/domain[/ratio]`; also its place in `pipeline.json`."""
    stage: str
    config: Any
    run: Callable[[Any], dict[str, Any]]
    after: list[str]
    """The steps whose outputs this one reads."""

    @property
    def out(self) -> str:
        return self.config.out


# Keys the pipeline sets in each stage's config; a spec that sets them under the stage is refused.
_WIRED = {
    "sae": {"corpus", "out", "model", "seeds"},
    "curate": {"corpus", "seeds", "sae", "out", "model"},
    "prune": {"model", "data", "out", "ratio"},
    "distill": {"data", "teacher", "backend", "out"},
    "finetune": {"model", "data", "out", "teacher"},
    "evaluate": {"models", "out", "mmlu", "ppl", "ppl_name"},
}


def _ratio_tag(ratio: float) -> str:
    return f"{ratio:.2f}"


def _stage_config(spec: PipelineSpec, stage: str, cls: type, wired: dict[str, Any]) -> Any:
    """A stage's config: the spec's settings for it, the wiring, and the spec's storage and Ray fields."""
    settings = dict(getattr(spec, stage))
    clash = sorted(set(settings) & _WIRED[stage])
    if clash:
        raise ConfigError(
            f"{stage}.{clash[0]}", settings[clash[0]], "is set by the pipeline from the spec's top-level fields; "
            "remove it from this stage's settings"
        )  # fmt: skip
    shared = {name: getattr(spec, name) for name in ("s3_endpoint", "s3_region", "ray_address")}
    try:
        return cli.from_mapping(cls, {**settings, **wired, **shared}, origin=f"the spec's `{stage}:` settings")
    except ConfigError as error:
        raise ConfigError(f"{stage}.{error.field}", error.value, error.fix) from None


def build_steps(spec: PipelineSpec) -> list[Step]:
    """Every step's config, checked, in an order that runs each step after the ones it reads."""
    root = spec.root.rstrip("/")
    teacher = spec.teacher or spec.model
    steps: list[Step] = []
    sae_dir = spec.sae_path
    if sae_dir is None:
        sae_dir = storage.join(root, "sae")
        wired = {"corpus": spec.corpus, "out": sae_dir, "model": spec.model, "seeds": spec.seeds}
        steps.append(Step("sae", "sae", _stage_config(spec, "sae", TrainSAEConfig, wired), run_train_sae, []))
    curate_dir = storage.join(root, "curate")
    wired = {"corpus": spec.corpus, "seeds": spec.seeds, "sae": sae_dir, "out": curate_dir, "model": spec.model}
    after_sae = ["sae"] if spec.sae_path is None else []
    steps.append(Step("curate", "curate", _stage_config(spec, "curate", CurateConfig, wired), run_curation, after_sae))
    for domain, domain_spec in spec.domains.items():
        base = storage.join(root, domain)
        split_dir = storage.join(base, "split")
        split = SplitConfig(
            curated=curate_dir, domain=domain, out=split_dir, heldout_fraction=spec.heldout_fraction,
            control=spec.control == "random", seed=spec.seed,
            s3_endpoint=spec.s3_endpoint, s3_region=spec.s3_region, ray_address=spec.ray_address,
        )  # fmt: skip
        steps.append(Step(f"split/{domain}", "split", split, run_split, ["curate"]))
        # step name -> (split part it reads, output directory)
        variants = {"distill": ("train", "distilled")}
        if spec.control == "random":
            variants["distill-random"] = ("random", "distilled-random")
        for name, (part, directory) in variants.items():
            wired = {"data": storage.join(split_dir, part), "teacher": teacher, "backend": spec.backend,
                     "out": storage.join(base, directory)}  # fmt: skip
            config = _stage_config(spec, "distill", DistillConfig, wired)
            steps.append(Step(f"{name}/{domain}", "distill", config, run_distill, [f"split/{domain}"]))
        models_to_compare = [("base", spec.model)]
        for ratio in spec.ratios:
            tag = _ratio_tag(ratio)
            pruned = storage.join(base, f"pruned-{tag}")
            wired = {"model": spec.model, "data": storage.join(split_dir, "train"), "out": pruned, "ratio": ratio}
            prune = _stage_config(spec, "prune", PruneConfig, wired)
            steps.append(Step(f"prune/{domain}/{tag}", "prune", prune, run_pruning, [f"split/{domain}"]))
            models_to_compare.append((f"pruned-{tag}", pruned))
            for name in variants:
                label = "finescope" if name == "distill" else "random"
                out = storage.join(base, f"finetuned-{tag}" if label == "finescope" else f"finetuned-random-{tag}")
                wired = {"model": pruned, "data": storage.join(base, variants[name][1], "distilled"), "out": out}
                if spec.finetune.get("kd_weight"):
                    wired["teacher"] = teacher
                config = _stage_config(spec, "finetune", FinetuneConfig, wired)
                after = [f"prune/{domain}/{tag}", f"{name}/{domain}"]
                step_name = f"finetune/{domain}/{tag}" if label == "finescope" else f"finetune-random/{domain}/{tag}"
                steps.append(Step(step_name, "finetune", config, run_finetune, after))
                models_to_compare.append((f"{label}-{tag}", storage.join(out, "model")))
        wired = {
            "models": [f"{label}={path}" for label, path in models_to_compare],
            "out": storage.join(base, "eval"),
            "mmlu": domain_spec.mmlu,
            "ppl": [storage.join(split_dir, "heldout")],
            "ppl_name": f"{domain} (held out)",
        }
        after = [s.name for s in steps if s.name.split("/")[1:2] == [domain] and s.stage in ("prune", "finetune")]
        evaluate = _stage_config(spec, "evaluate", EvaluateConfig, wired)
        steps.append(Step(f"evaluate/{domain}", "evaluate", evaluate, run_evaluation, [f"split/{domain}", *after]))
    return steps


def step_key(step: Step, upstream_hashes: list[str]) -> str:
    """What a step's output depends on: its stage, its config (less how it executes) and its inputs' hashes."""
    config = {k: v for k, v in dataclasses.asdict(step.config).items() if k not in EXECUTION_FIELDS}
    payload = {"stage": step.stage, "config": config, "upstream": upstream_hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Running -----------------------------------------------------------------------------------------


def _read_state(root: str, options: StorageOptions) -> dict[str, Any]:
    uri = storage.join(root, STATE)
    return storage.read_json(uri, options) if storage.exists(uri, options) else {"steps": {}}


def run_pipeline(spec: PipelineSpec, only: list[str] | None = None) -> dict[str, Any]:
    """Run every step that is not up to date, in order; returns the pipeline state (also in pipeline.json)
    with the report's text (`report`, also in report.md) and where it was written (`report_uri`).

    `only`: stop after these steps and what they need (step names or stage names)."""
    steps = build_steps(spec)
    wanted = _needed(steps, only) if only else {s.name for s in steps}
    options = spec.storage_options()
    state = _read_state(spec.root, options)
    records: dict[str, dict[str, Any]] = state["steps"]
    started = time.perf_counter()
    logger.info("pipeline: %d steps under %s", len(wanted), spec.root)
    for step in steps:
        if step.name not in wanted:
            continue
        upstream = [records[name]["stage_hash"] for name in step.after]
        key = step_key(step, upstream)
        record = records.get(step.name, {})
        current = manifest.read_manifest(step.out, options)
        if (
            not spec.force
            and record.get("key") == key
            and current is not None
            and current.get("hash") == record.get("stage_hash")
        ):
            logger.info("step %-32s skipped: up to date (key %s)", step.name, key)
            record["status"] = "skipped"
            continue
        before = current.get("finished_at") if current else None
        logger.info("step %-32s running (key %s) -> %s", step.name, key, step.out)
        if spec.force:
            step.config.force = True
        began = time.perf_counter()
        step.run(step.config)
        finished = manifest.read_manifest(step.out, options)
        if finished is None:
            raise RuntimeError(f"step {step.name} finished without writing {step.out}/manifest.json")
        reran = finished.get("finished_at") != before or finished.get("hash") != (current or {}).get("hash")
        records[step.name] = {
            "key": key,
            "stage_hash": finished["hash"],
            "stage": step.stage,
            "out": step.out,
            "status": "ran" if reran else "stage up to date",
            "seconds": round(time.perf_counter() - began, 1),
            "finished_at": finished.get("finished_at"),
        }
        storage.write_json_atomic(storage.join(spec.root, STATE), {**state, "spec": _spec_dict(spec)}, options)
    state["spec"] = _spec_dict(spec)
    state["seconds"] = round(time.perf_counter() - started, 1)
    storage.write_json_atomic(storage.join(spec.root, STATE), state, options)
    report = pipeline_report(spec, steps, records, options)
    storage.write_bytes_atomic(storage.join(spec.root, REPORT), report.encode(), options)
    return {**state, "report": report, "report_uri": storage.join(spec.root, REPORT)}


def _needed(steps: list[Step], only: list[str]) -> set[str]:
    by_name = {s.name: s for s in steps}
    chosen = {s.name for s in steps if s.name in only or s.stage in only or s.name.split("/")[0] in only}
    if not chosen:
        raise ConfigError("only", only, f"names no step; steps: {', '.join(by_name)}")
    todo, needed = list(chosen), set()
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].after
    return needed


def _spec_dict(spec: PipelineSpec) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


# The report ---------------------------------------------------------------------------------------


_STAGE_REPORTS = {
    "sae": ["manifest.json"],
    "curate": ["report.md"],
    "split": ["manifest.json"],
    "prune": ["prune_report.json"],
    "distill": ["manifest.json"],
    "finetune": ["metrics.jsonl", "train_summary.json"],
    "evaluate": ["report.md", "results.json"],
}


def _link(root: str, uri: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix) :] if uri.startswith(prefix) else uri


def pipeline_report(spec: PipelineSpec, steps: list[Step], records: dict[str, Any], options: StorageOptions) -> str:
    from training.eval_report import summary_lines

    lines = [
        "# FineScope pipeline report",
        "",
        f"Base model `{spec.model}`, teacher `{spec.teacher or spec.model}` ({spec.backend}), pruning ratios "
        f"{', '.join(_ratio_tag(r) for r in spec.ratios)}, domains: {', '.join(spec.domains)}.",
        "",
    ]
    for domain in spec.domains:
        results_uri = storage.join(spec.root, domain, "eval", "results.json")
        lines += [f"## {domain}", ""]
        if storage.exists(results_uri, options):
            lines += summary_lines(storage.read_json(results_uri, options))
            lines += [f"Full evaluation: [{domain}/eval/report.md]({domain}/eval/report.md).", ""]
        else:
            lines += ["Not evaluated yet.", ""]
    lines += ["## Steps", "", "| step | status | seconds | output | reports |", "|---|---|---:|---|---|"]
    for step in steps:
        record = records.get(step.name)
        if record is None:
            lines.append(f"| {step.name} | not run | | `{_link(spec.root, step.out)}` | |")
            continue
        links = []
        for name in _STAGE_REPORTS[step.stage]:
            uri = storage.join(step.out, name)
            if storage.exists(uri, options):
                links.append(f"[{name}]({_link(spec.root, uri)})")
        lines.append(
            f"| {step.name} | {record['status']} | {record['seconds']} | `{_link(spec.root, step.out)}` |"
            f" {', '.join(links)} |"
        )
    return "\n".join(lines) + "\n"


# The job ------------------------------------------------------------------------------------------


@dataclass
class PipelineJobConfig:
    """What `python -m jobs.pipeline` does."""

    spec: str = ""
    """The pipeline spec (YAML): model, corpus, seeds, domains, ratios, teacher, backend, root, stages."""
    root: str | None = None
    """Overrides the spec's storage root (local or s3://)."""
    corpus: list[str] = field(default_factory=list)
    """Overrides the spec's corpus shards (paths, directories or globs)."""
    only: list[str] = field(default_factory=list)
    """Run only these steps or stages and what they need, e.g. `curate` or `prune/mathematics/0.30`."""
    force: bool = False
    """Redo every step, even those that are up to date."""
    ray_address: str | None = None
    """Ray cluster to join; unset: $RAY_ADDRESS (set by `ray job submit`), else a local Ray."""

    def __post_init__(self) -> None:
        if not self.spec:
            raise ConfigError("spec", self.spec, "is required: pass --spec PIPELINE.yaml")


def run_pipeline_job(config: PipelineJobConfig) -> dict[str, Any]:
    overrides: dict[str, Any] = {"force": config.force}
    if config.root:
        overrides["root"] = config.root
    if config.corpus:
        overrides["corpus"] = config.corpus
    if config.ray_address:
        overrides["ray_address"] = config.ray_address
    spec = load_spec(config.spec, overrides)
    return run_pipeline(spec, config.only or None)
