"""The replication's graph: held-out sets, curations, arms, rewrites, pruned models, fine-tunes, evaluations."""

from __future__ import annotations

import logging
from typing import Any

from curation.sae.train import TRAIN_SAE, TrainSAEConfig
from curation.selection.curate import CURATE, CurateConfig
from experiments.replication import data
from experiments.replication.spec import ALTERNATIVES, OWNED, ReplicationSpec, arm_kinds, dose_label
from pipeline.graph import Graph, Step, ratio_tag
from training.distillation.distill import DISTILL, DistillConfig
from training.evaluation.evaluate import EVALUATE, EvaluateConfig
from training.finetuning.finetune import FINETUNE, FinetuneConfig
from training.pruning.prune import PRUNE, PruneConfig

logger = logging.getLogger(__name__)

CALIBRATION = "calibration"


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

    def rank(self, method: str) -> str:
        """Score the pool for every domain by an alternative curator; the dense ranking reads the base model at
        the SAE's layer, with curation's token limit, precision and resources."""
        spec = self.spec
        sae = self.config("sae", TrainSAEConfig, {"corpus": ["-"], "out": "-", "model": spec.model, "seeds": "-"})
        curate = self.config("curate", CurateConfig, {"corpus": ["-"], "seeds": "-", "sae": "-", "out": "-",
                                                      "model": spec.model})  # fmt: skip
        config = data.RankConfig(
            out=self.path("rank", method), method=method, holdout=self.path("data"), seeds=spec.seeds,
            domains=list(spec.domains), model=spec.model, layer=sae.layer, max_tokens=curate.max_tokens,
            dtype=curate.dtype, cpus=curate.cpus, threads=curate.threads, **self.shared(),
        )  # fmt: skip
        self.add(f"rank/{method}", "rank", config, data.RANK, ["holdout"])
        return f"rank/{method}"

    def arm(self, name: str, kind: str, trial: int, domain: str | None = None, source: str | None = None,
            dose: float | None = None, budget: int | None = None) -> str:  # fmt: skip
        """One arm's documents; `source` is the curate or rank step a curator's arm reads. Added once: the
        pilot's teacher group adds the first trial's oracle arms before their domain's groups do."""
        spec = self.spec
        if f"arm/{name}" in self.names():
            return name
        source_dir = self.path(*source.split("/")) if source else None
        config = data.ArmConfig(
            out=self.path("arms", name), kind=kind, holdout=self.path("data"), domain=domain,
            topic=spec.domains.get(domain) if domain else None, label=name.split("/")[-1],
            budget=budget or spec.budget, trial=trial, dose=dose,
            curated=source_dir if kind == "finescope" else None, ranking=source_dir if kind in ALTERNATIVES else None,
            **self.shared(),
        )  # fmt: skip
        self.add(f"arm/{name}", "arm", config, data.ARM, ["holdout", *([source] if source else [])])
        return name

    def teacher_data(
        self, group: str, chosen: dict[str, tuple[str, str]], covered: list[str], also: list[str]
    ) -> dict[str, str]:
        """The union of a group's arms' documents, rewritten once, and each training set's selection of it:
        `chosen` maps a training name to (arm, `teacher` or `original`). Documents of the `covered` arms are
        rewritten by the groups in `also`, whose rewrites the selections read too. Returns training name ->
        rows directory. Groups (each trial's random draw, each domain's arms of one trial, the pilot's) let
        a part of the replication run without the others."""
        spec = self.spec
        arms = list(dict.fromkeys(arm for arm, _ in chosen.values()))
        union = data.UnionConfig(out=self.path("union", group), arms=[self.path("arms", a) for a in arms],
                                 covered=[self.path("arms", a) for a in covered], **self.shared())  # fmt: skip
        self.add(f"union/{group}", "union", union, data.UNION, [f"arm/{a}" for a in [*arms, *covered]])
        wired = {"data": data.rows_dir(union.out), "teacher": spec.teacher or spec.model, "backend": spec.backend,
                 "out": self.path("distill", group)}  # fmt: skip
        config = self.config("distill", DistillConfig, wired)
        self.add(f"distill/{group}", "distill", config, DISTILL, [f"union/{group}"])
        groups = [group, *also]
        rows = {}
        for name, (arm, target) in chosen.items():
            config = data.SelectConfig(
                out=self.path("train", name), arm=self.path("arms", arm), target=target,
                distilled=[self.path("distill", g) for g in groups], **self.shared(),
            )  # fmt: skip
            self.add(f"train/{name}", "select", config, data.SELECT, [f"arm/{arm}", *(f"distill/{g}" for g in groups)])
            rows[name] = data.rows_dir(config.out)
        return rows

    def prune(self, ratio: float) -> str:
        """The base model pruned at `ratio` on the calibration documents: one step per ratio, shared by the
        arms, the pilot and the ratio ablation."""
        name = f"prune/{ratio_tag(ratio)}"
        if name not in self.names():
            wired = {"model": self.spec.model, "data": data.rows_dir(self.path("arms", CALIBRATION)),
                     "out": self.path("pruned", ratio_tag(ratio)), "ratio": ratio}  # fmt: skip
            config = self.config("prune", PruneConfig, wired)
            if ratio == self.spec.ratio and 0 < calibration_read(self.spec, config) < self.spec.calibration:
                logger.warning(
                    "the pruning reads the first %d of the %d calibration documents (prune.max_docs); set "
                    "calibration: %d to draw only what it reads, or raise prune.max_docs",
                    config.max_docs, self.spec.calibration, config.max_docs,
                )  # fmt: skip
            self.add(name, "prune", config, PRUNE, [f"arm/{CALIBRATION}"])
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

    def evaluate(
        self, name: str, labelled: dict[str, str], documents: str, limit: int, title: str, continuation: bool = False
    ) -> str:
        """Perplexity of `labelled` (label -> step name, or a model for the base) on one held-out set, and with
        `continuation` the continuation task built from the same documents."""
        entries = [f"{label}={self.model_of(source)}" for label, source in labelled.items()]
        wired = {"models": entries, "out": self.path("eval", name), "mmlu": [], "ppl": [documents],
                 "ppl_topic": None, "ppl_name": title, "ppl_max_docs": limit, "continuation": continuation}  # fmt: skip
        after = [source for source in labelled.values() if source in self.names()]
        self.add(f"evaluate/{name}", "evaluate", self.config("evaluate", EvaluateConfig, wired), EVALUATE, after)
        return f"evaluate/{name}"


def calibration_read(spec: ReplicationSpec, prune: PruneConfig) -> int:
    """How many of the `calibration` documents a pruning reads: the first `prune.max_docs` of them (a
    magnitude pruning reads none, but its plan still names the draw)."""
    return min(spec.calibration, prune.max_docs) if prune.method == "taylor" else 0


def build_replication(spec: ReplicationSpec) -> tuple[list[Step], dict[str, Any]]:
    """Every step of the replication, and where the report finds each evaluation."""
    graph = ReplicationGraph(spec)
    graph.holdout()
    graph.arm(CALIBRATION, CALIBRATION, spec.split_seed, budget=spec.calibration)
    trials, domains, focus = spec.trials, list(spec.domains), spec.ablation_domain
    for t in trials:
        graph.curation(f"t{t}", {"seed": t, "coords": "all"})
    for k in spec.ablation_coords:
        graph.curation(f"k{k}", {"seed": trials[0], "coords": "jacobian", "num_coords": k})
    for method in spec.alternatives:  # each ranked once for every domain: the same documents every trial
        graph.rank(method)
    rows = _teacher_groups(graph)
    pruned = graph.prune(spec.ratio)
    for t in trials:  # one pruned model: a random arm's fine-tune is the same model for every domain
        graph.finetune(f"random-t{t}", pruned, _rows(rows, f"random-t{t}"), t)
    layout: dict[str, Any] = {"domains": {}, "ratio": None, "coords": None, "pilot": {}}
    for d in domains:
        layout["domains"][d] = _domain_arms(graph, d, pruned, rows)
    layout["pilot"] = _pilot(graph, pruned, rows)
    if spec.ablation_ratios:
        layout["ratio"] = _ratio_ablation(graph, focus, pruned, rows)
    if spec.ablation_coords:
        layout["coords"] = _coords_ablation(graph, focus, pruned, rows)
    return graph.steps, layout


def _teacher_groups(graph: ReplicationGraph) -> dict[str, str]:
    """Every arm's documents and the teacher's groups, each over one trial so that a trial runs alone: the
    trial's random draw (`random/tN`, shared by the domains), each domain's other arms of the trial
    (`D/tN`, less the random draw's documents), and the coordinates ablation's (`coords`, less the first
    trial's). With a pilot, each domain's first-trial oracle is a group of its own (`pilot/D`), so the
    pilot needs no curation and no teacher pass over the curators' arms. Returns training name -> rows
    directory."""
    spec, trials, domains = graph.spec, graph.spec.trials, list(graph.spec.domains)
    first, rows = trials[0], {}
    randoms = {t: {d: graph.arm(f"{d}/random-t{t}", "random", t, d) for d in domains} for t in trials}
    for t in trials:
        rows |= graph.teacher_data(f"random/t{t}", {f"random-t{t}": (randoms[t][domains[0]], "teacher")}, [], [])
    pilot = {}  # domain -> its first-trial oracle, rewritten by the pilot's group
    if spec.pilot_ratios:
        for d in domains:
            pilot[d] = graph.arm(f"{d}/oracle-t{first}", "oracle", first, d)
            rows |= graph.teacher_data(f"pilot/{d}", {pilot[d]: (pilot[d], "teacher")}, [randoms[first][d]],
                                       [f"random/t{first}"])  # fmt: skip
    for d in domains:
        for t in trials:
            arms = _domain_arm_steps(graph, d, t)
            covered, also = [randoms[t][d]], [f"random/t{t}"]
            if t == first and d in pilot:
                arms.remove(pilot[d])
                covered, also = [*covered, pilot[d]], [*also, f"pilot/{d}"]
            chosen = {a: (a, "teacher") for a in arms}
            if t == first:  # the undistilled reference reads FineScope's first-trial documents as they are
                chosen[f"{d}/undistilled"] = (f"{d}/finescope-t{first}", "original")
            rows |= graph.teacher_data(f"{d}/t{t}", chosen, covered, also)
    if spec.ablation_coords:
        focus = spec.ablation_domain
        arms = [graph.arm(f"{focus}/finescope-k{k}", "finescope", first, focus, f"curate/k{k}")
                for k in spec.ablation_coords]  # fmt: skip
        covered = [*_domain_arm_steps(graph, focus, first), randoms[first][focus]]
        also = [f"{focus}/t{first}", f"random/t{first}", *([f"pilot/{focus}"] if focus in pilot else [])]
        rows |= graph.teacher_data("coords", {a: (a, "teacher") for a in arms}, covered, also)
    return rows


def _domain_arm_steps(graph: ReplicationGraph, d: str, t: int) -> list[str]:
    """A domain's arms of trial `t` besides the random draw: every curator, the oracle and the doses."""
    spec = graph.spec
    names = [graph.arm(f"{d}/finescope-t{t}", "finescope", t, d, f"curate/t{t}")]
    names += [graph.arm(f"{d}/{m}-t{t}", m, t, d, f"rank/{m}") for m in spec.alternatives]
    names.append(graph.arm(f"{d}/oracle-t{t}", "oracle", t, d))
    names += [graph.arm(f"{d}/{dose_label(x)}-t{t}", "dose", t, d, dose=x) for x in spec.dose]
    return names


def _domain_arms(graph: ReplicationGraph, d: str, pruned: str, rows: dict[str, str]) -> dict[str, Any]:
    """One domain's fine-tunes and evaluations: per trial N the pruned model and every arm of the trial
    (`evaluate/D/tN/domain`, `.../general`), and the references base, pruned, unpruned and undistilled
    (`evaluate/D/reference/...`). Returns {"reference": (domain, general), "trials": {N: (domain, general)}},
    results.json URIs."""
    spec, trials = graph.spec, graph.spec.trials
    found: dict[str, Any] = {"trials": {}}
    for t in trials:
        sources: dict[str, str] = {"pruned": pruned}
        for kind in arm_kinds(spec.dose, spec.alternatives):
            label = f"{kind}-t{t}"
            sources[label] = (f"finetune/{label}" if kind == "random"
                              else graph.finetune(f"{d}/{label}", pruned, _rows(rows, f"{d}/{label}"), t))  # fmt: skip
        found["trials"][t] = _evaluations(graph, f"{d}/t{t}", d, sources)
    first = _rows(rows, f"{d}/finescope-t{trials[0]}")
    sources = {"base": spec.model, "pruned": pruned}
    sources["unpruned"] = graph.finetune(f"{d}/unpruned", None, first, trials[0])
    sources["undistilled"] = graph.finetune(f"{d}/undistilled", pruned, _rows(rows, f"{d}/undistilled"), trials[0])
    found["reference"] = _evaluations(graph, f"{d}/reference", d, sources)
    return found


def _evaluations(graph: ReplicationGraph, name: str, d: str, sources: dict[str, str]) -> tuple[str, str]:
    """`sources` on the domain's held-out set (with the continuation task) and on the general one; returns
    their results.json URIs."""
    spec, topic = graph.spec, graph.spec.domains[d]
    held, general = data.heldout_glob(graph.path("data"), d), data.heldout_glob(graph.path("data"), data.GENERAL)
    graph.evaluate(f"{name}/domain", sources, held, spec.heldout, f"{d}: {topic} documents held out before curation",
                   continuation=True)  # fmt: skip
    graph.evaluate(
        f"{name}/general", sources, general, spec.general_heldout, "general: documents of every topic, held out"
    )
    return graph.path("eval", name, "domain", "results.json"), graph.path("eval", name, "general", "results.json")


def _rows(rows: dict[str, str], name: str) -> tuple[str, str]:
    return name, rows[name]


def _pilot(graph: ReplicationGraph, main_pruned: str, rows: dict[str, str]) -> dict[float, dict[str, str]]:
    """Per pilot ratio, the first trial's random and oracle arms on a model pruned at that ratio, evaluated on
    each domain's held-out set (`evaluate/pilot/r<ratio>/<domain>`, labels base, pruned, random, oracle); at
    `ratio` itself the main arms' fine-tunes serve. Their rows come from the teacher groups `random/t<first>`
    and `pilot/<domain>` (each domain's first-trial oracle, nothing else), not from the domains' groups of
    the first trial, which would pull in every curator: `--only evaluate/pilot` runs no SAE, no curation, no
    ranking and no teacher pass over another arm. Returns ratio -> domain -> results.json URI."""
    spec, first = graph.spec, graph.spec.trials[0]
    found: dict[float, dict[str, str]] = {}
    for r in spec.pilot_ratios:
        tag, main = ratio_tag(r), r == spec.ratio
        pruned = main_pruned if main else graph.prune(r)
        random = f"finetune/random-t{first}"
        if not main:
            random = graph.finetune(
                f"pilot/r{tag}/random", pruned, _rows(rows, random.removeprefix("finetune/")), first
            )
        found[r] = {}
        for d in spec.domains:
            oracle = f"finetune/{d}/oracle-t{first}"
            if not main:
                oracle = graph.finetune(f"pilot/r{tag}/{d}/oracle", pruned, _rows(rows, f"{d}/oracle-t{first}"), first)
            sources = {"base": spec.model, "pruned": pruned, "random": random, "oracle": oracle}
            title = f"{d}: {spec.domains[d]} documents, pruned at {tag}"
            graph.evaluate(f"pilot/r{tag}/{d}", sources, data.heldout_glob(graph.path("data"), d), spec.heldout, title)
            found[r][d] = graph.path("eval", "pilot", f"r{tag}", d, "results.json")
    return found


def _ratio_ablation(
    graph: ReplicationGraph, d: str, main_pruned: str, rows: dict[str, str]
) -> tuple[str, str, list[float]]:
    spec, first = graph.spec, _rows(rows, f"{d}/finescope-t{graph.spec.trials[0]}")
    sources: dict[str, str] = {"base": spec.model}
    ratios = sorted([*spec.ablation_ratios, spec.ratio])
    for r in ratios:
        pruned = main_pruned if r == spec.ratio else graph.prune(r)
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
