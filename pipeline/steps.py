"""The pipeline's step graph: every stage's config, wired from the spec (pipeline/graph.py builds and keys it)."""

from __future__ import annotations

from typing import Any

from core import storage
from curation.sae.train import TRAIN_SAE, TrainSAEConfig
from curation.selection.curate import CURATE, CurateConfig
from curation.split import SPLIT, SplitConfig
from pipeline.graph import Graph, Step, ratio_tag
from pipeline.spec import DomainSpec, PipelineSpec
from training.distillation.distill import DISTILL, DistillConfig
from training.evaluation.evaluate import EVALUATE, EvaluateConfig
from training.finetuning.finetune import FINETUNE, FinetuneConfig
from training.pruning.prune import PRUNE, PruneConfig

ARMS = {"finescope": ("train", "distilled"), "random": ("random", "distilled-random")}
"""Each arm's split part and the directory of its distilled rows: FineScope's training rows, and the random
control of the same size."""


def build_steps(spec: PipelineSpec) -> list[Step]:
    """Every step's config, checked, in an order that runs each step after the ones it reads."""
    graph = Graph(spec)
    sae_dir = spec.sae_path
    if sae_dir is None:
        wired = {"corpus": spec.corpus, "out": graph.path("sae"), "model": spec.model, "seeds": spec.seeds}
        sae_dir = graph.add("sae", "sae", graph.config("sae", TrainSAEConfig, wired), TRAIN_SAE, [])
    wired = {"corpus": spec.corpus, "seeds": spec.seeds, "sae": sae_dir, "out": graph.path("curate"),
             "model": spec.model}  # fmt: skip
    after_sae = ["sae"] if spec.sae_path is None else []
    graph.add("curate", "curate", graph.config("curate", CurateConfig, wired), CURATE, after_sae)
    for domain, domain_spec in spec.domains.items():
        _domain_steps(graph, domain, domain_spec)
    return graph.steps


def _arms(spec: PipelineSpec) -> list[str]:
    return ["finescope", *(["random"] if spec.control == "random" else [])]


def _domain_steps(graph: Graph, domain: str, domain_spec: DomainSpec) -> None:
    """One domain's steps: split the curated rows, distill each arm, prune and finetune per ratio, evaluate."""
    spec = graph.spec
    split = SplitConfig(
        curated=graph.path("curate"), domain=domain, out=graph.path(domain, "split"),
        heldout_fraction=spec.heldout_fraction, control=spec.control == "random", seed=spec.seed, **graph.shared(),
    )  # fmt: skip
    graph.add(f"split/{domain}", "split", split, SPLIT, ["curate"])
    for arm in _arms(spec):
        part, directory = ARMS[arm]
        wired = {"data": storage.join(split.out, part), "teacher": spec.teacher or spec.model,
                 "backend": spec.backend, "out": graph.path(domain, directory)}  # fmt: skip
        name = "distill" if arm == "finescope" else "distill-random"
        graph.add(f"{name}/{domain}", "distill", graph.config("distill", DistillConfig, wired), DISTILL,
                  [f"split/{domain}"])  # fmt: skip
    compared = [("base", spec.model)]
    for ratio in spec.ratios:
        compared += _ratio_steps(graph, domain, ratio)
    wired = {
        "models": [f"{label}={path}" for label, path in compared],
        "out": graph.path(domain, "eval"),
        "mmlu": domain_spec.mmlu,
        **_heldout(domain, domain_spec, split.out),
    }
    after = [s.name for s in graph.steps if s.stage in ("prune", "finetune") and f"/{domain}/" in s.name]
    evaluate = graph.config("evaluate", EvaluateConfig, wired)
    graph.add(f"evaluate/{domain}", "evaluate", evaluate, EVALUATE, [f"split/{domain}", *after])


def _heldout(domain: str, domain_spec: DomainSpec, split_dir: str) -> dict[str, Any]:
    """The evaluation's perplexity documents: the domain's labelled held-out set when the spec names one,
    else the held-out split of its curated rows. The name says which, so every table states it."""
    if domain_spec.heldout:
        label = f"{domain_spec.topic} documents" if domain_spec.topic else "documents"
        return {"ppl": domain_spec.heldout, "ppl_topic": domain_spec.topic,
                "ppl_name": f"{domain}: labelled {label}, not in the corpus"}  # fmt: skip
    return {"ppl": [storage.join(split_dir, "heldout")], "ppl_topic": None,
            "ppl_name": f"{domain}: curated rows held out (FineScope's own choices)"}  # fmt: skip


def _ratio_steps(graph: Graph, domain: str, ratio: float) -> list[tuple[str, str]]:
    """Prune at one ratio, then finetune the pruned model on each arm's distilled rows; returns the
    (label, model path) pairs they add to the domain's evaluation."""
    spec, tag = graph.spec, ratio_tag(ratio)
    wired = {"model": spec.model, "data": graph.path(domain, "split", "train"),
             "out": graph.path(domain, f"pruned-{tag}"), "ratio": ratio}  # fmt: skip
    pruned = graph.add(f"prune/{domain}/{tag}", "prune", graph.config("prune", PruneConfig, wired), PRUNE,
                       [f"split/{domain}"])  # fmt: skip
    models = [(f"pruned-{tag}", pruned)]
    for arm in _arms(spec):
        suffix = "" if arm == "finescope" else "-random"
        wired = {"model": pruned, "data": graph.path(domain, ARMS[arm][1], "distilled"),
                 "out": graph.path(domain, f"finetuned{suffix}-{tag}")}  # fmt: skip
        if spec.finetune.get("kd_weight"):
            wired["teacher"] = spec.teacher or spec.model
        after = [f"prune/{domain}/{tag}", f"distill{suffix}/{domain}"]
        out = graph.add(f"finetune{suffix}/{domain}/{tag}", "finetune", graph.config("finetune", FinetuneConfig, wired),
                        FINETUNE, after)  # fmt: skip
        models.append((f"{arm}-{tag}", storage.join(out, "model")))
    return models
