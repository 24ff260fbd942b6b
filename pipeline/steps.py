"""The step graph: every stage's config, wired from the spec, and the key that says when a step is up to date."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core import cli, storage
from core.errors import ConfigError
from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.selection.curate import CurateConfig, run_curation
from curation.split import SplitConfig, run_split
from pipeline.spec import DomainSpec, PipelineSpec
from training.distillation.distill import DistillConfig, run_distill
from training.evaluation.evaluate import EvaluateConfig, run_evaluation
from training.finetuning.finetune import FinetuneConfig, run_finetune
from training.pruning.prune import PruneConfig, run_pruning


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
    "evaluate": {"models", "out", "mmlu", "ppl", "ppl_name", "ppl_topic"},
}


def ratio_tag(ratio: float) -> str:
    return f"{ratio:.2f}"


def stage_config(spec: Any, stage: str, cls: type, wired: dict[str, Any], owned: frozenset[str] = frozenset()) -> Any:
    """A stage's config: the spec's settings for it (`spec.<stage>`), the wiring, and the spec's storage and
    Ray fields. A setting the graph sets itself (the pipeline's wiring, plus `owned`) is refused."""
    settings = dict(getattr(spec, stage))
    clash = sorted(set(settings) & (_WIRED[stage] | owned))
    if clash:
        raise ConfigError(
            f"{stage}.{clash[0]}", settings[clash[0]], "is set by the job from the spec's top-level fields; "
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
        steps.append(Step("sae", "sae", stage_config(spec, "sae", TrainSAEConfig, wired), run_train_sae, []))
    curate_dir = storage.join(root, "curate")
    wired = {"corpus": spec.corpus, "seeds": spec.seeds, "sae": sae_dir, "out": curate_dir, "model": spec.model}
    after_sae = ["sae"] if spec.sae_path is None else []
    steps.append(Step("curate", "curate", stage_config(spec, "curate", CurateConfig, wired), run_curation, after_sae))
    for domain, domain_spec in spec.domains.items():
        steps.extend(_domain_steps(spec, domain, domain_spec, root, curate_dir, teacher))
    return steps


def _domain_steps(
    spec: PipelineSpec, domain: str, domain_spec: DomainSpec, root: str, curate_dir: str, teacher: str
) -> list[Step]:
    """One domain's steps: split the curated rows, distill each variant, prune and finetune per ratio, evaluate."""
    base = storage.join(root, domain)
    split_dir = storage.join(base, "split")
    split = SplitConfig(
        curated=curate_dir, domain=domain, out=split_dir, heldout_fraction=spec.heldout_fraction,
        control=spec.control == "random", seed=spec.seed,
        s3_endpoint=spec.s3_endpoint, s3_region=spec.s3_region, ray_address=spec.ray_address,
    )  # fmt: skip
    steps = [Step(f"split/{domain}", "split", split, run_split, ["curate"])]
    # step name -> (split part it reads, output directory)
    variants = {"distill": ("train", "distilled")}
    if spec.control == "random":
        variants["distill-random"] = ("random", "distilled-random")
    for name, (part, directory) in variants.items():
        wired = {"data": storage.join(split_dir, part), "teacher": teacher, "backend": spec.backend,
                 "out": storage.join(base, directory)}  # fmt: skip
        config = stage_config(spec, "distill", DistillConfig, wired)
        steps.append(Step(f"{name}/{domain}", "distill", config, run_distill, [f"split/{domain}"]))
    models_to_compare = [("base", spec.model)]
    for ratio in spec.ratios:
        ratio_steps, ratio_models = _ratio_steps(spec, domain, base, split_dir, ratio, variants, teacher)
        steps.extend(ratio_steps)
        models_to_compare.extend(ratio_models)
    wired = {
        "models": [f"{label}={path}" for label, path in models_to_compare],
        "out": storage.join(base, "eval"),
        "mmlu": domain_spec.mmlu,
        **_heldout(domain, domain_spec, split_dir),
    }
    after = [s.name for s in steps if s.stage in ("prune", "finetune")]
    evaluate = stage_config(spec, "evaluate", EvaluateConfig, wired)
    steps.append(Step(f"evaluate/{domain}", "evaluate", evaluate, run_evaluation, [f"split/{domain}", *after]))
    return steps


def _heldout(domain: str, domain_spec: DomainSpec, split_dir: str) -> dict[str, Any]:
    """The evaluation's perplexity documents: the domain's labelled held-out set when the spec names one,
    else the held-out split of its curated rows. The name says which, so every table states it."""
    if domain_spec.heldout:
        label = f"{domain_spec.topic} documents" if domain_spec.topic else "documents"
        return {"ppl": domain_spec.heldout, "ppl_topic": domain_spec.topic,
                "ppl_name": f"{domain}: labelled {label}, not in the corpus"}  # fmt: skip
    return {"ppl": [storage.join(split_dir, "heldout")], "ppl_topic": None,
            "ppl_name": f"{domain}: curated rows held out (FineScope's own choices)"}  # fmt: skip


def _ratio_steps(
    spec: PipelineSpec,
    domain: str,
    base: str,
    split_dir: str,
    ratio: float,
    variants: dict[str, tuple[str, str]],
    teacher: str,
) -> tuple[list[Step], list[tuple[str, str]]]:
    """Prune at one ratio, then finetune the pruned model on each distilled variant.

    Returns the steps and the (label, model path) pairs they add to the domain's evaluation.
    """
    tag = ratio_tag(ratio)
    pruned = storage.join(base, f"pruned-{tag}")
    wired = {"model": spec.model, "data": storage.join(split_dir, "train"), "out": pruned, "ratio": ratio}
    prune = stage_config(spec, "prune", PruneConfig, wired)
    steps = [Step(f"prune/{domain}/{tag}", "prune", prune, run_pruning, [f"split/{domain}"])]
    models = [(f"pruned-{tag}", pruned)]
    for name in variants:
        label = "finescope" if name == "distill" else "random"
        out = storage.join(base, f"finetuned-{tag}" if label == "finescope" else f"finetuned-random-{tag}")
        wired = {"model": pruned, "data": storage.join(base, variants[name][1], "distilled"), "out": out}
        if spec.finetune.get("kd_weight"):
            wired["teacher"] = teacher
        config = stage_config(spec, "finetune", FinetuneConfig, wired)
        after = [f"prune/{domain}/{tag}", f"{name}/{domain}"]
        step_name = f"finetune/{domain}/{tag}" if label == "finescope" else f"finetune-random/{domain}/{tag}"
        steps.append(Step(step_name, "finetune", config, run_finetune, after))
        models.append((f"{label}-{tag}", storage.join(out, "model")))
    return steps, models


def step_key(step: Step, upstream_hashes: list[str]) -> str:
    """What a step's output depends on: its stage, its config (less how it executes) and its inputs' hashes."""
    payload = {"stage": step.stage, "config": step.config.content(), "upstream": upstream_hashes}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
