"""The replication's graph: held-out sets, curations, arms, rewrites, pruned models, fine-tunes, evaluations."""

from __future__ import annotations

from typing import Any

from curation.sae.train import TRAIN_SAE, TrainSAEConfig
from curation.selection.curate import CURATE, CurateConfig
from experiments.replication import data
from experiments.replication.spec import OWNED, ReplicationSpec
from pipeline.graph import Graph, Step, ratio_tag
from training.distillation.distill import DISTILL, DistillConfig
from training.evaluation.evaluate import EVALUATE, EvaluateConfig
from training.finetuning.finetune import FINETUNE, FinetuneConfig
from training.pruning.prune import PRUNE, PruneConfig


class ReplicationGraph(Graph):
    """The pipeline's graph builder, with the replication's kinds of step."""

    def __init__(self, spec: ReplicationSpec):
        super().__init__(spec, owned=OWNED)
        probe = self.config("finetune", FinetuneConfig, {"model": spec.model, "data": "-", "out": "-"})
        rows_per_step = probe.micro_batch * probe.grad_accum * probe.actors
        self.max_steps = max(1, spec.budget * spec.epochs // rows_per_step)

    def holdout(self) -> None:
        spec = self.spec
        config = data.HoldoutConfig(
            out=self.path("data"), topics=dict(spec.domains), pool=spec.pool, pool_topic_docs=spec.pool_topic_docs,
            heldout=spec.heldout, general=spec.general_heldout, seed=spec.split_seed, **self.shared(),
        )  # fmt: skip
        self.add("holdout", "holdout", config, data.HOLDOUT, [])

    def curation(self, tag: str, sae_settings: dict[str, Any]) -> str:
        """Train an SAE on the pool and curate the pool with it; returns the curate step's name."""
        spec, pool = self.spec, [data.pool_glob(self.path("data"))]
        wired = {"corpus": pool, "out": self.path("sae", tag), "model": spec.model, "seeds": spec.seeds, **sae_settings}
        sae_out = self.add(f"sae/{tag}", "sae", self.config("sae", TrainSAEConfig, wired), TRAIN_SAE, ["holdout"])
        wired = {"corpus": pool, "seeds": spec.seeds, "sae": sae_out, "out": self.path("curate", tag),
                 "model": spec.model, "rule": "global_topn", "top_n": spec.budget}  # fmt: skip
        config = self.config("curate", CurateConfig, wired)
        self.add(f"curate/{tag}", "curate", config, CURATE, ["holdout", f"sae/{tag}"])
        return f"curate/{tag}"

    def arm(self, name: str, kind: str, seed: int, domain: str | None = None, curate: str | None = None) -> str:
        spec = self.spec
        config = data.ArmConfig(
            out=self.path("arms", name), kind=kind, holdout=self.path("data"), domain=domain,
            topic=spec.domains.get(domain) if domain else None, budget=spec.budget, seed=seed,
            curated=self.path(*curate.split("/")) if curate else None, **self.shared(),
        )  # fmt: skip
        self.add(f"arm/{name}", "arm", config, data.ARM, ["holdout", *([curate] if curate else [])])
        return name

    def teacher_data(self, group: str, arms: list[str], raw: dict[str, str]) -> dict[str, str]:
        """The union of a group's arms' documents, rewritten once, and each arm's selection of it (and, in
        `raw`, training names that read an arm's original text). Returns training name -> rows directory.
        Groups (the random arms, and each domain's) let a part of the replication run without the others."""
        spec = self.spec
        union = data.UnionConfig(out=self.path("union", group), arms=[self.path("arms", a) for a in arms],
                                 **self.shared())  # fmt: skip
        self.add(f"union/{group}", "union", union, data.UNION, [f"arm/{a}" for a in arms])
        wired = {"data": data.rows_dir(union.out), "teacher": spec.teacher or spec.model, "backend": spec.backend,
                 "out": self.path("distill", group)}  # fmt: skip
        config = self.config("distill", DistillConfig, wired)
        self.add(f"distill/{group}", "distill", config, DISTILL, [f"union/{group}"])
        chosen = {a: (a, "teacher") for a in arms} | {name: (a, "original") for name, a in raw.items()}
        rows = {}
        for name, (arm, target) in chosen.items():
            config = data.SelectConfig(
                out=self.path("train", name), arm=self.path("arms", arm), distilled=self.path("distill", group),
                target=target, **self.shared(),
            )  # fmt: skip
            self.add(f"train/{name}", "select", config, data.SELECT, [f"arm/{arm}", f"distill/{group}"])
            rows[name] = data.rows_dir(config.out)
        return rows

    def prune(self, domain: str, ratio: float, arm: str) -> str:
        wired = {"model": self.spec.model, "data": data.rows_dir(self.path("arms", arm)),
                 "out": self.path("pruned", f"{domain}-{ratio_tag(ratio)}"), "ratio": ratio}  # fmt: skip
        name = f"prune/{domain}/{ratio_tag(ratio)}"
        self.add(name, "prune", self.config("prune", PruneConfig, wired), PRUNE, [f"arm/{arm}"])
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
        self.add(f"finetune/{name}", "finetune", self.config("finetune", FinetuneConfig, wired), FINETUNE, after)
        return f"finetune/{name}"

    def evaluate(self, name: str, labelled: dict[str, str], documents: str, limit: int, title: str) -> str:
        """Perplexity of `labelled` (label -> step name, or a model for the base) on one held-out set."""
        entries = [f"{label}={self.model_of(source)}" for label, source in labelled.items()]
        wired = {"models": entries, "out": self.path("eval", name), "mmlu": [], "ppl": [documents],
                 "ppl_topic": None, "ppl_name": title, "ppl_max_docs": limit}  # fmt: skip
        after = [source for source in labelled.values() if source in self.names()]
        self.add(f"evaluate/{name}", "evaluate", self.config("evaluate", EvaluateConfig, wired), EVALUATE, after)
        return f"evaluate/{name}"


def build_replication(spec: ReplicationSpec) -> tuple[list[Step], dict[str, Any]]:
    """Every step of the replication, and where the report finds each evaluation."""
    graph = ReplicationGraph(spec)
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


def _domain_arms(graph: ReplicationGraph, d: str, pruned: str, rows: dict[str, str]) -> tuple[str, str]:
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


def _ratio_ablation(
    graph: ReplicationGraph, d: str, main_pruned: str, rows: dict[str, str]
) -> tuple[str, str, list[float]]:
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


def _coords_ablation(graph: ReplicationGraph, d: str, pruned: str, rows: dict[str, str]) -> tuple[str, str, list[Any]]:
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
