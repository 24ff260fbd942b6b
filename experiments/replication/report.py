"""The replication report: does FineScope-curated data help a pruned model recover, against random data of
the same size?

Every figure comes from the per-document NLLs in the evaluations' results.json. L is a model's
token-weighted mean NLL (log perplexity), and an arm's recovered share is

    R = (L_pruned - L_arm) / (L_pruned - L_base)

1 = back to the base model, 0 = no better than the pruned one, negative = worse. Intervals are 95%
percentile bootstraps over documents, with the same resampled documents for every model of one
results.json, so that differences between models are not blurred by which documents were drawn.
FineScope is tested against random data with `stats.paired_bootstrap_perplexity`, per trial and pooled
(per document, the mean over trials of each arm's NLL).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import storage
from core.figures import png_bytes
from core.storage import StorageOptions
from training.evaluation import stats

SAMPLES = 1000
SEED = 0
EPSILON = 1e-9
"""|L_pruned - L_reference| below this leaves a share undefined: pruning (or the oracle) changed nothing."""
UNDEFINED = "undefined (pruning cost nothing on this set)"
PRUNED_TOLERANCE = 1e-4
"""Largest difference of the pruned model's mean NLL per token on one document between two parts' evaluations
for the parts to compare: each part prunes the base model again on its own machine."""
RECOVERY_ARMS = ("finescope", "random", "oracle", "unpruned", "undistilled")
TRIAL_LABEL = re.compile(r"^(?P<kind>.+)-t(?P<trial>\d+)$")
"""A trial arm's label, `<kind>-t<N>`: finescope-t0, bm25-t2, topic25-t1."""
SINGLE_ARMS = ("base", "pruned", "oracle", "unpruned", "undistilled")
"""Labels that are arms without trials (`oracle` in runs that had a single oracle)."""
ALTERNATIVES = ("bm25", "minilm", "dense")
"""The curators a user would pick instead of FineScope, in the report's order."""
DOSE_ARMS = {"random": 0.0, "topic25": 0.25, "topic50": 0.5, "oracle": 1.0}
"""The dose-response arms and their nominal on-topic share, used where selection.json does not measure it."""
CURATORS = ("finescope", *ALTERNATIVES)

Scores = tuple[np.ndarray, np.ndarray]
"""Per document: summed NLL in nats, scored tokens."""
Resampled = tuple[float, np.ndarray]
"""L on the documents as scored, and L on each bootstrap resample, shape (SAMPLES,)."""


@dataclass
class DomainParts:
    """One domain's evaluations as the replication runs them, in parts: the references (base, pruned,
    unpruned, undistilled) and each trial's arms with the pruned model, each a (domain set, general set)
    pair of results.json URIs. The report merges them per held-out set into one evaluation."""

    reference: tuple[str, str]
    trials: dict[int, tuple[str, str]]
    """Trial -> its evaluations; only the trials that were run."""


@dataclass
class ReplicationLayout:
    domains: dict[str, tuple[str, str] | DomainParts]
    """Domain -> (results.json URI on the domain's held-out set, results.json URI on the general held-out set)
    of one evaluation of every model, or its evaluations in parts."""
    trials: list[int]
    """Trial numbers n of the `finescope-t{n}` and `random-t{n}` arms."""
    ratio_ablation: tuple[str, str, list[float]] | None
    """(domain, results.json URI, prune ratios including the main one), or None to leave the section out."""
    coords_ablation: tuple[str, str, list[int | str]] | None
    """(domain, results.json URI, numbers of SAE coordinates K including "all"), or None."""
    budget: list[dict[str, Any]]
    """One row per fine-tuned arm, e.g. {"arm", "documents", "tokens", "steps"}; rendered as a table as-is."""
    selections: list[str] = field(default_factory=list)
    """selection.json URIs of the arms' data directories ({"arm", "domain", "trial", "docs", "on_topic",
    "oracle_overlap"}); one that does not exist is left out."""
    pilot: dict[float, dict[str, str]] = field(default_factory=dict)
    """Pilot evaluations: prune ratio -> domain -> results.json URI (labels base, pruned, random, oracle)."""


def arm_kinds(labels: Any) -> dict[str, list[int]]:
    """The arm kinds an evaluation holds, from its labels: `<kind>-t<N>` gives kind -> its trials (sorted);
    a single arm (base, pruned, an old run's `oracle`, ...) gives kind -> []."""
    kinds: dict[str, list[int]] = {}
    for label in labels:
        match = TRIAL_LABEL.match(label)
        if match:
            kinds.setdefault(match["kind"], []).append(int(match["trial"]))
        elif label in SINGLE_ARMS:
            kinds.setdefault(label, [])
    return {kind: sorted(trials) for kind, trials in kinds.items()}


def _trial_labels(kind: str, trials: list[int]) -> list[str]:
    return [f"{kind}-t{n}" for n in trials] if trials else [kind]


def paired_trials(kinds: dict[str, list[int]], ours: str, theirs: str) -> list[tuple[str, str]]:
    """The label pairs that compare two kinds: trials paired by training seed (the trials both have); a
    kind without trials pairs with every trial of the other."""
    a, b = kinds[ours], kinds[theirs]
    if a and b:
        return [(f"{ours}-t{n}", f"{theirs}-t{n}") for n in a if n in b]
    mine, other = _trial_labels(ours, a), _trial_labels(theirs, b)
    if len(mine) == 1:
        mine = mine * len(other)
    if len(other) == 1:
        other = other * len(mine)
    return list(zip(mine, other, strict=True))


def _scores(results: dict[str, Any]) -> tuple[str, dict[str, Scores]]:
    """The one perplexity dataset's name and each model's per-document scores; all on the same documents."""
    name, entry = next(iter(results["perplexity"].items()))
    scores: dict[str, Scores] = {}
    for label, row in entry["results"].items():
        if "document_nll" not in row:
            raise ValueError(f"{name}: model {label!r} has no document_nll; re-run its evaluation with this version")
        scores[label] = (np.asarray(row["document_nll"], float), np.asarray(row["document_tokens"], float))
    counts = {label: (len(nll), len(tokens)) for label, (nll, tokens) in scores.items()}
    if len({c for pair in counts.values() for c in pair}) > 1:
        raise ValueError(f"{name}: models were scored on different numbers of documents: {counts}")
    return name, scores


def _require(name: str, scores: dict[str, Scores], labels: list[str]) -> None:
    missing = [label for label in labels if label not in scores]
    if missing:
        raise ValueError(f"{name}: results.json lacks the models {missing}; it has {sorted(scores)}")


def _trial_mean(scores: dict[str, Scores], labels: list[str]) -> Scores:
    """Per document, the mean over trials of NLL and tokens: the pooled arm."""
    return np.mean([scores[label][0] for label in labels], axis=0), np.mean([scores[label][1] for label in labels], 0)


def _resample(scores: dict[str, Scores]) -> dict[str, Resampled]:
    """Each model's L, as scored and on each resample; every model gets the same resampled documents."""
    documents = len(next(iter(scores.values()))[0])
    picks = np.random.default_rng(SEED).integers(0, documents, size=(SAMPLES, documents))
    return {label: (float(nll.sum() / tokens.sum()), nll[picks].sum(axis=1) / tokens[picks].sum(axis=1))
            for label, (nll, tokens) in scores.items()}  # fmt: skip


def _share(pruned: Resampled, arm: Resampled, reference: Resampled) -> dict[str, float]:
    """(L_pruned - L_arm) / (L_pruned - L_reference) with its bootstrap interval; nan where undefined."""
    if abs(pruned[0] - reference[0]) < EPSILON:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    with np.errstate(divide="ignore", invalid="ignore"):
        values = (pruned[1] - arm[1]) / (pruned[1] - reference[1])
    values = values[np.isfinite(values)]  # a resample where the reference ties with pruned has no share
    low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
    return {"value": (pruned[0] - arm[0]) / (pruned[0] - reference[0]), "ci_low": float(low), "ci_high": float(high)}


def _versus(ours: Scores, theirs: Scores) -> dict[str, Any]:
    """Paired bootstrap of log(ppl_ours) - log(ppl_theirs) on the same documents; negative = ours better."""
    test = stats.paired_bootstrap_perplexity(ours[0], theirs[0], np.stack([ours[1], theirs[1]]), SAMPLES, SEED)
    return {**test, "ppl_ratio": math.exp(test["log_ratio"]), "significant": test["p_value"] < stats.ALPHA}


def two_level_bootstrap(ours: list[Scores], theirs: list[Scores], samples: int = SAMPLES, seed: int = SEED) -> dict:
    """log(ppl_ours) - log(ppl_theirs), the arms' trials paired by training seed, with a 95% interval from a
    two-level bootstrap: trials (seeds) resampled with replacement, then the held-out documents, so that
    the interval holds training noise as well as the documents'. Negative = ours better."""
    trials, documents = len(ours), len(ours[0][0])

    def gap(picked: np.ndarray, docs: np.ndarray) -> float:
        return _pooled_l(ours, picked, docs) - _pooled_l(theirs, picked, docs)

    everything = np.arange(documents)
    values = [gap(picked, docs) for picked, docs in _two_level_draws(trials, documents, samples, seed)]
    low, high = np.percentile(values, [2.5, 97.5])
    p_value = min(1.0, 2 * min(np.mean(np.asarray(values) >= 0), np.mean(np.asarray(values) <= 0)))
    return {"log_ratio": gap(np.arange(trials), everything), "ci_low": float(low), "ci_high": float(high),
            "p_value": float(p_value), "trials": trials, "samples": samples}  # fmt: skip


def _two_level_draws(trials: int, documents: int, samples: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per bootstrap sample: trials drawn with replacement, then documents drawn with replacement."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, trials, trials), rng.integers(0, documents, documents)) for _ in range(samples)]


def _pooled_l(arm: list[Scores], picked: np.ndarray, docs: np.ndarray) -> float:
    """L of an arm's picked trials on the picked documents, token-weighted over both."""
    return float(sum(arm[t][0][docs].sum() for t in picked) / sum(arm[t][1][docs].sum() for t in picked))


def two_level_share(pruned: Scores, ours: list[Scores], reference: list[Scores], samples: int = SAMPLES,
                    seed: int = SEED) -> dict[str, float]:  # fmt: skip
    """(L_pruned - L_ours) / (L_pruned - L_reference), trials paired by seed, with a 95% interval from the
    two-level bootstrap (trials, then documents): the share of the reference's gain that ours reaches."""
    trials, documents = len(ours), len(ours[0][0])

    def share(picked: np.ndarray, docs: np.ndarray) -> float:
        base = pruned[0][docs].sum() / pruned[1][docs].sum()
        cost = base - _pooled_l(reference, picked, docs)
        return (base - _pooled_l(ours, picked, docs)) / cost if abs(cost) >= EPSILON else math.nan

    values = np.array([share(picked, docs) for picked, docs in _two_level_draws(trials, documents, samples, seed)])
    values = values[np.isfinite(values)]
    low, high = np.percentile(values, [2.5, 97.5]) if len(values) else (math.nan, math.nan)
    value = share(np.arange(trials), np.arange(documents))
    return {"value": value, "ci_low": float(low), "ci_high": float(high), "trials": trials, "samples": samples}


def holm(p_values: dict[str, float], alpha: float = stats.ALPHA) -> dict[str, dict[str, Any]]:
    """Holm's step-down correction over a family of tests (here, one per domain): each adjusted p-value and
    whether it stays significant."""
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p_values[name]))
        adjusted[name] = running
    return {name: {"p_value": p_values[name], "p_holm": adjusted[name], "significant": adjusted[name] < alpha}
            for name in p_values}  # fmt: skip


def _spread(shares: list[float]) -> dict[str, Any]:
    std = float(np.std(shares, ddof=1)) if len(shares) > 1 else 0.0
    return {"mean": float(np.mean(shares)), "std": std, "values": shares}


def domain_figures(domain_results: dict[str, Any], trials: list[int], undistilled_trial: int | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    """Every statistic of one held-out set (a loaded results.json): perplexities, recovered shares with
    intervals (per model and per arm kind, the mean over its trials), FineScope against random per trial
    and pooled, the share of the oracle's gain, the spread over trials, distillation's effect, the
    headline comparisons over seeds and documents, and the continuation task where it was scored.
    Distillation compares `undistilled` with FineScope of the trial whose documents it trains on
    (`undistilled_trial`, unset: the first of `trials`), where that trial was evaluated."""
    name, scores = _scores(domain_results)
    finescope, random = [f"finescope-t{n}" for n in trials], [f"random-t{n}" for n in trials]
    _require(name, scores, ["base", "pruned", *finescope, *random])
    kinds = arm_kinds(scores)
    pooled = {kind: _trial_mean(scores, _trial_labels(kind, runs)) for kind, runs in kinds.items() if runs}
    scores = {**scores, **pooled}
    resampled = _resample(scores)
    pruned, base = resampled["pruned"], resampled["base"]
    recovered = {label: _share(pruned, value, base) for label, value in resampled.items()}
    versus = {f"t{n}": _versus(scores[f"finescope-t{n}"], scores[f"random-t{n}"]) for n in trials}
    versus["pooled"] = _versus(scores["finescope"], scores["random"])
    spread = {kind: _spread([recovered[label]["value"] for label in _trial_labels(kind, runs)])
              for kind, runs in kinds.items() if runs}  # fmt: skip
    gaps = [a - b for a, b in zip(spread["finescope"]["values"], spread["random"]["values"], strict=True)]
    over_seeds = stats.seed_t_test(gaps) if len(gaps) > 1 else None
    first = f"finescope-t{trials[0] if undistilled_trial is None else undistilled_trial}"
    distilled = {first, "undistilled"} <= scores.keys()
    return {
        "dataset": name,
        "documents": len(scores["base"][0]),
        "kinds": kinds,
        "perplexity": {label: math.exp(value[0]) for label, value in resampled.items()},
        "pruning_cost": pruned[0] - base[0],
        "recovery_defined": abs(pruned[0] - base[0]) >= EPSILON,
        "recovered": recovered,
        "versus_random": versus,
        "oracle_share": _share(pruned, resampled["finescope"], resampled["oracle"]) if "oracle" in scores else None,
        "spread": spread,
        "over_seeds": over_seeds and {**over_seeds, "significant": over_seeds["p_value"] < stats.ALPHA},
        "two_level": two_level_bootstrap([scores[label] for label in finescope], [scores[label] for label in random]),
        "headline": headline_figures(scores, kinds),
        "distillation": _versus(scores[first], scores["undistilled"]) if distilled else None,
        "distillation_arm": first,
        "continuation": continuation_figures(domain_results),
    }


def headline_figures(scores: dict[str, Scores], kinds: dict[str, list[int]]) -> dict[str, Any]:
    """Over seeds and documents (two-level bootstrap): FineScope against random and against each
    alternative curator present (negative log-ppl = FineScope better), and the share of the oracle's gain
    FineScope reaches, with FineScope against the oracle as its test."""
    figures: dict[str, Any] = {}
    for other in ("random", *ALTERNATIVES, "oracle"):
        if other not in kinds:
            continue
        pairs = paired_trials(kinds, "finescope", other)
        ours, theirs = [scores[a] for a, _ in pairs], [scores[b] for _, b in pairs]
        figures[other] = two_level_bootstrap(ours, theirs)
        figures[other]["pairs"] = [list(pair) for pair in pairs]
        if other == "oracle":
            figures[other]["share"] = two_level_share(scores["pruned"], ours, theirs)
    return figures


def continuation_figures(results: dict[str, Any]) -> dict[str, Any] | None:
    """The continuation task on this held-out set, where the evaluation scored it: questions, each model's
    and each arm kind's accuracy (pooled over its trials) with a Wilson interval, and McNemar's exact test
    of every arm against random and against FineScope. Trials are paired by seed and their questions
    stacked (a question answered in 3 trials is 3 pairs); an arm without trials pairs with every trial.
    McNemar's test takes every pair as independent, but a document asks up to `spans` questions and every
    trial asks the same ones: each test also carries `two_level`, the accuracy difference with a 95%
    interval from the two-level bootstrap (seeds, then documents, each document's questions together)."""
    section = next(iter((results.get("continuation") or {}).values()), None)
    if section is None:
        return None
    hits = {label: np.asarray(row["correct"], bool) for label, row in section["results"].items()}
    by_document = _document_hits(hits, section["doc_ids"])
    kinds = arm_kinds(hits)
    accuracy = {label: stats.accuracy(hit).to_dict() for label, hit in hits.items()}
    for kind, runs in kinds.items():
        if runs:
            accuracy[kind] = stats.accuracy(np.concatenate([hits[label] for label in _trial_labels(kind, runs)]))
            accuracy[kind] = accuracy[kind].to_dict()
    tests: dict[str, dict[str, Any]] = {}
    for reference in ("random", "finescope"):
        if reference not in kinds:
            continue
        for kind in (kind for kind in kinds if kind != reference):
            pairs = paired_trials(kinds, kind, reference)
            test = stats.mcnemar_exact(np.concatenate([hits[a] for a, _ in pairs]),
                                       np.concatenate([hits[b] for _, b in pairs]))  # fmt: skip
            clustered = two_level_bootstrap([by_document[a] for a, _ in pairs], [by_document[b] for _, b in pairs])
            tests.setdefault(reference, {})[kind] = {**test, "pairs": len(pairs) * len(section["doc_ids"]),
                                                     "significant": test["p_value"] < stats.ALPHA,
                                                     "two_level": _accuracy_gap(clustered)}  # fmt: skip
    return {"questions": section["questions"], "documents": section["documents"], "skipped": section["skipped"],
            "asked_documents": len(set(section["doc_ids"])), "settings": section["settings"],
            "accuracy": accuracy, "mcnemar": tests}  # fmt: skip


def _document_hits(hits: dict[str, np.ndarray], doc_ids: list[str]) -> dict[str, Scores]:
    """Per label, per document that asked a question (in order of first appearance): its right answers and its
    questions, the pair the two-level bootstrap pools as it pools NLL and tokens."""
    index = {doc: n for n, doc in enumerate(dict.fromkeys(doc_ids))}
    groups = np.array([index[doc] for doc in doc_ids], dtype=int)
    asked = np.bincount(groups, minlength=len(index)).astype(float)
    return {label: (np.bincount(groups, weights=hit.astype(float), minlength=len(index)), asked)
            for label, hit in hits.items()}  # fmt: skip


def _accuracy_gap(test: dict[str, Any]) -> dict[str, Any]:
    """A two-level bootstrap of pooled accuracies, its `log_ratio` named for what it is: the accuracy
    difference (positive: the arm answers more questions right than its reference)."""
    return {"difference": test["log_ratio"], **{key: test[key] for key in ("ci_low", "ci_high", "p_value", "trials")}}


def _fraction(value: Any, docs: Any) -> float | None:
    """A share from selection.json: a whole number counts documents (of `docs`), a float is the share."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value / docs if docs else None
    return float(value)


def selection_figures(rows: list[dict[str, Any]], domain: str) -> dict[str, dict[str, Any]]:
    """Per arm kind, from the arms' selection.json rows for `domain` (a row without a domain, like the
    random arms' shared draw, counts for every domain): the mean over trials of the on-topic share and of
    the overlap with the oracle's documents."""
    found: dict[str, list[tuple[float | None, float | None]]] = {}
    for row in rows:
        if row.get("domain") not in (None, domain):
            continue
        arm = str(row.get("arm", "")).rsplit("/", 1)[-1]
        match = TRIAL_LABEL.match(arm)
        on_topic, overlap = row.get("on_topic"), row.get("oracle_overlap")
        on_topic, overlap = (v.get(domain) if isinstance(v, dict) else v for v in (on_topic, overlap))
        pair = (_fraction(on_topic, row.get("docs")), _fraction(overlap, row.get("docs")))
        found.setdefault(match["kind"] if match else arm, []).append(pair)
    figures = {}
    for kind, pairs in found.items():
        means = [[v for v in column if v is not None] for column in zip(*pairs, strict=True)]
        figures[kind] = {
            "on_topic": float(np.mean(means[0])) if means[0] else None,
            "oracle_overlap": float(np.mean(means[1])) if means[1] else None,
            "trials": len(pairs),
        }
    return figures  # fmt: skip


def monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean_a, n_a), (mean_b, n_b) = blocks.pop(-2), blocks.pop()
            blocks.append([(mean_a * n_a + mean_b * n_b) / (n_a + n_b), n_a + n_b])
    return [mean for mean, count in blocks for _ in range(int(count))]


def place_on_curve(level: float, xs: list[float], ys: list[float]) -> dict[str, Any]:
    """The x at which the non-decreasing curve (xs ascending, ys) reaches `level`, by linear interpolation;
    the first x on a flat stretch. Outside the curve: "below 0%" (under its lowest point) or "above 100%"."""
    if not math.isfinite(level):
        return {"on_topic": None, "where": "n/a"}
    if level < ys[0]:
        return {"on_topic": None, "where": "below 0%"}
    if level > ys[-1]:
        return {"on_topic": None, "where": "above 100%"}
    for i in range(len(xs) - 1):
        if ys[i] <= level <= ys[i + 1]:
            if ys[i + 1] == ys[i] or level == ys[i]:
                return {"on_topic": xs[i], "where": "on the curve"}
            return {"on_topic": xs[i] + (level - ys[i]) / (ys[i + 1] - ys[i]) * (xs[i + 1] - xs[i]),
                    "where": "on the curve"}  # fmt: skip
    return {"on_topic": xs[-1], "where": "on the curve"}


def dose_response(figures: dict[str, Any], selections: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Recovery and continuation accuracy of random, topic25, topic50 and oracle against their measured
    on-topic share (the nominal 0/25/50/100% where selection.json does not measure it), the monotone
    curve through them, and where each curator's recovery and accuracy fall on it."""
    accuracy = (figures.get("continuation") or {}).get("accuracy", {})
    points = [{"arm": arm, "on_topic": selections.get(arm, {}).get("on_topic", nominal), "nominal": nominal,
               "measured": selections.get(arm, {}).get("on_topic") is not None,
               "recovery": figures["recovered"][arm]["value"], "accuracy": accuracy.get(arm, {}).get("accuracy")}
              for arm, nominal in DOSE_ARMS.items() if arm in figures["recovered"]]  # fmt: skip
    for point in points:
        point["on_topic"] = point["nominal"] if point["on_topic"] is None else point["on_topic"]
    if len(points) < 2:
        return None
    points.sort(key=lambda point: (point["on_topic"], point["nominal"]))
    xs, curves, placements = [point["on_topic"] for point in points], {}, {}
    for metric in ("recovery", "accuracy"):
        ys = [point[metric] for point in points]
        if all(y is not None and math.isfinite(y) for y in ys):
            curves[metric] = monotone(ys)
    for curator in (c for c in CURATORS if c in figures["recovered"]):
        levels = {"recovery": figures["recovered"][curator]["value"], "accuracy": accuracy.get(curator, {}).get(
            "accuracy")}  # fmt: skip
        placements[curator] = {metric: {"level": levels[metric], **place_on_curve(levels[metric], xs, curve)}
                               for metric, curve in curves.items() if levels[metric] is not None}  # fmt: skip
    return {"points": points, "curves": curves, "placements": placements}


def pilot_figures(evaluations: dict[float, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per pilot prune ratio (ratio -> domain -> a loaded results.json with base, pruned, random and
    oracle): the oracle's recovered share minus random's per domain, and the ratio whose smallest gap over
    domains is largest (the first such ratio on a tie; None where no ratio has every gap defined)."""
    rows = []
    for ratio in sorted(evaluations):
        gaps = {}
        for domain, results in evaluations[ratio].items():
            name, scores = _scores(results)
            _require(name, scores, ["base", "pruned", "random", "oracle"])
            level = {label: float(nll.sum() / tokens.sum()) for label, (nll, tokens) in scores.items()}
            cost = level["pruned"] - level["base"]
            gaps[domain] = (level["random"] - level["oracle"]) / cost if abs(cost) >= EPSILON else math.nan
        smallest = min(gaps.values()) if gaps else math.nan
        rows.append({"ratio": ratio, "gaps": gaps, "smallest": smallest})
    defined = [row for row in rows if math.isfinite(row["smallest"])]
    best = max(defined, key=lambda row: row["smallest"]) if defined else None
    return {"rows": rows, "choice": best["ratio"] if best else None}


def _ablation_order(value: Any) -> tuple[int, float]:
    return (1, 0.0) if str(value) == "all" else (0, float(value))


def ablation_figures(results: dict[str, Any], kind: str, values: list) -> list[dict[str, Any]]:
    """Per ablation value, in ascending order (K = "all" last): the FineScope arm's recovered share with
    its interval. kind "ratio": arms `finescope-{r:.2f}` against `pruned-{r:.2f}`; kind "coords": arms
    `finescope-k{K}` against `pruned`."""
    if kind not in ("ratio", "coords"):
        raise ValueError(f"kind={kind!r} must be 'ratio' or 'coords'")
    name, scores = _scores(results)
    rows = []
    for value in sorted(values, key=_ablation_order):
        if kind == "ratio":
            rows.append({"value": value, "arm": f"finescope-{value:.2f}", "pruned": f"pruned-{value:.2f}"})
        else:
            rows.append({"value": value, "arm": f"finescope-k{value}", "pruned": "pruned"})
    _require(name, scores, ["base", *dict.fromkeys(label for row in rows for label in (row["arm"], row["pruned"]))])
    resampled = _resample(scores)
    for row in rows:
        arm, pruned = resampled[row["arm"]], resampled[row["pruned"]]
        row.update(
            perplexity=math.exp(arm[0]),
            pruned_perplexity=math.exp(pruned[0]),
            base_perplexity=math.exp(resampled["base"][0]),
            recovered=_share(pruned, arm, resampled["base"]),
        )
    return rows


def _number(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, spec)


def _interval(share: dict[str, float] | None) -> str:
    if share is None or not math.isfinite(share["value"]):
        return "n/a"
    return f"{share['value']:.2f} [{_number(share['ci_low'])}, {_number(share['ci_high'])}]"


def _verdict(subject: str, test: dict[str, Any], outcomes: tuple[str, str, str]) -> str:
    """One sentence: outcomes are (significantly better, significantly worse, no significant difference)."""
    better, worse, neither = outcomes
    outcome = (better if test["log_ratio"] < 0 else worse) if test["significant"] else neither
    log_ratio, low, high = (_number(test[key], ".3f") for key in ("log_ratio", "ci_low", "ci_high"))
    return (
        f"{subject}: {outcome}, log-ppl {log_ratio} [{low}, {high}], ppl x{_number(test['ppl_ratio'])},"
        f" {_significance(test['p_value'])}"
    )


def _p(p_value: float) -> str:
    """A bootstrap p of 0 reads as below the smallest p that SAMPLES resamples can give (two-sided)."""
    return f"p<{2 / SAMPLES:g}" if p_value == 0 else f"p={p_value:.3g}"


def _significance(p_value: float) -> str:
    """stats.significance_word, except that a bootstrap p of 0 reads as below the smallest p that 1000 resamples
    can give (two-sided: 2 / SAMPLES)."""
    return f"significant (p<{2 / SAMPLES:g})" if p_value == 0 else stats.significance_word(p_value)


VERSUS_RANDOM = ("FineScope beat random", "FineScope did worse than random", "FineScope did not beat random")
DISTILLATION = (
    "the teacher's rewrites helped",
    "the teacher's rewrites hurt",
    "the rewrites made no significant difference",
)
REFERENCE_ARMS = ("oracle", "unpruned", "undistilled")


def _arm_table(figures: dict[str, Any], general: dict[str, Any], trials: list[int]) -> list[str]:
    """Per arm: perplexity and recovered share [95% CI] on the domain's and on the general held-out set."""
    kinds = figures["kinds"]
    pooled = [kind for kind, runs in kinds.items() if runs]
    per_trial = [label for kind in pooled for label in _trial_labels(kind, kinds[kind])]
    arms = list(dict.fromkeys(["base", "pruned", *pooled, *per_trial, *REFERENCE_ARMS]))
    lines = [
        "| arm | perplexity (domain) | recovered (domain) | perplexity (general) | recovered (general) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in (arm for arm in arms if arm in figures["perplexity"]):
        sets = (figures, general)
        cells = [f"{_number(s['perplexity'].get(arm))} | {_interval(s['recovered'].get(arm))}" for s in sets]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    for where, scope in (("domain", figures), ("general", general)):
        if not scope["recovery_defined"]:
            lines += [f"Recovered share on the {where} set: {UNDEFINED}.", ""]
    return lines


def _finding_lines(domain: str, figures: dict[str, Any], general: dict[str, Any], trials: list[int]) -> list[str]:
    """FineScope against random per trial and pooled, the oracle share, the spread over trials, distillation."""
    pooled = f"pooled over {len(trials)} trials"
    verdicts = [_verdict(f"{domain} (trial {n})", figures["versus_random"][f"t{n}"], VERSUS_RANDOM) for n in trials]
    verdicts.append(_verdict(f"{domain} ({pooled})", figures["versus_random"]["pooled"], VERSUS_RANDOM))
    verdicts.append(_verdict(f"general set ({pooled})", general["versus_random"]["pooled"], VERSUS_RANDOM))
    if figures["oracle_share"] is not None:
        verdicts.append(f"share of the oracle's gain that FineScope reaches: {_interval(figures['oracle_share'])}")
    fs, rnd = figures["spread"]["finescope"], figures["spread"]["random"]
    verdicts.append(
        f"recovered share over {len(trials)} trials, mean ± sample std: FineScope {_number(fs['mean'])} ±"
        f" {_number(fs['std'])}, random {_number(rnd['mean'])} ± {_number(rnd['std'])}"
    )
    if figures.get("over_seeds"):
        seeds = figures["over_seeds"]
        verdicts.append(
            f"over seeds (FineScope's recovered share minus random's, per trial): {seeds['mean']:+.3f} ±"
            f" {seeds['std']:.3f}, t-test with {seeds['df']} df {stats.significance_word(seeds['p_value'])}"
        )
    if figures.get("two_level"):
        both = figures["two_level"]
        verdicts.append(
            f"over seeds and documents (two-level bootstrap, the headline): log-ppl {both['log_ratio']:+.3f}"
            f" [{both['ci_low']:+.3f}, {both['ci_high']:+.3f}], {_significance(both['p_value'])}"
        )
    if figures["distillation"] is not None:
        subject = f"distillation ({figures['distillation_arm']} against undistilled)"
        verdicts.append(_verdict(subject, figures["distillation"], DISTILLATION))
    intro = "FineScope against random data of the same size: paired bootstrap over documents, negative log-ppl ="
    return [f"{intro} FineScope better.", "", *(f"- {v}" for v in verdicts), ""]


def _domain_lines(domain: str, figures: dict[str, Any], general: dict[str, Any], trials: list[int]) -> list[str]:
    sets = f"`{figures['dataset']}` ({figures['documents']} documents)"
    sets += f" and `{general['dataset']}` ({general['documents']} documents)"
    lines = [f"## {domain}", "", f"Held-out sets: {sets}; trials {', '.join(map(str, trials))}; an arm without `-tN`"
             " is the mean over its trials.", ""]  # fmt: skip
    return lines + _arm_table(figures, general, trials) + _finding_lines(domain, figures, general, trials)


HEADLINE = {"random": "FineScope against random", "bm25": "FineScope against BM25",
            "minilm": "FineScope against MiniLM", "dense": "FineScope against dense embeddings",
            "oracle": "FineScope against the oracle"}  # fmt: skip


def _headline_lines(domain: str, figures: dict[str, Any], holm_by: dict[str, dict[str, Any]]) -> list[str]:
    """The headline per comparison: two-level bootstrap (seeds, then documents), Holm-adjusted across domains."""
    lines = [f"### {domain}: the headline, over seeds and documents", "",
             "Two-level bootstrap (trials, then documents), log-ppl difference (negative = FineScope better) with"
             " its 95% interval; p Holm-adjusted across domains.", ""]  # fmt: skip
    for other, test in figures["headline"].items():
        adjusted = holm_by.get(other, {}).get(domain)
        verdict = (
            (
                f"{_p(test['p_value'])}, Holm {_p(adjusted['p_holm'])}, "
                f"{'significant' if adjusted['significant'] else 'not significant'}"
            )
            if adjusted
            else ""
        )
        line = (
            f"- {HEADLINE.get(other, other)}: {test['log_ratio']:+.3f} [{test['ci_low']:+.3f}, {test['ci_high']:+.3f}]"
        )
        lines.append(f"{line}, {verdict}")  # fmt: skip
        if "share" in test:
            lines.append(f"- share of the oracle's gain FineScope recovers: {_interval(test['share'])}")
    return [*lines, ""]


def _selection_lines(selections: dict[str, dict[str, Any]]) -> list[str]:
    if not selections:
        return []
    lines = ["| arm | selection.json files | on-topic share | overlap with the oracle |", "|---|---:|---:|---:|"]
    for kind, row in selections.items():
        lines.append(f"| {kind} | {row['trials']} | {_number(row['on_topic'], '.3f')} |"
                     f" {_number(row['oracle_overlap'], '.3f')} |")  # fmt: skip
    return ["Selections (mean over trials):", "", *lines, ""]


def _pct(entry: dict[str, float]) -> str:
    return f"{100 * entry['accuracy']:.1f}% [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def _continuation_lines(domain: str, section: dict[str, Any] | None, holm_by: dict[str, Any]) -> list[str]:
    """Each arm's continuation accuracy with its Wilson interval, and McNemar against random and FineScope."""
    if section is None:
        return []
    references = list(section["mcnemar"])
    header = (
        "| arm | accuracy [95% Wilson] | "
        + " | ".join(f"vs {r} [95% CI, seeds and documents]; McNemar p; Holm p" for r in references)
        + " |"
    )
    asked = section.get("asked_documents", section["documents"])
    lines = [f"### {domain}: continuation task, {section['questions']} questions from {asked} of"
             f" {section['documents']} documents", "", header, "|---|---:|" + "---|" * len(references)]  # fmt: skip
    for label, accuracy in section["accuracy"].items():
        cells = []
        for reference in references:
            test = section["mcnemar"][reference].get(label)
            adjusted = holm_by.get(reference, {}).get(label, {}).get(domain)
            cells.append(_continuation_cell(test, adjusted) if test and adjusted else "")
        lines.append(f"| {label} | {_pct(accuracy)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _continuation_cell(test: dict[str, Any], adjusted: dict[str, Any]) -> str:
    clustered = test.get("two_level")
    interval = f" [{100 * clustered['ci_low']:+.1f}, {100 * clustered['ci_high']:+.1f}]" if clustered else ""
    return f"{100 * test['difference']:+.1f} pts{interval}; p={test['p_value']:.3g}; {adjusted['p_holm']:.3g}"


def _dose_lines(domain: str, dose: dict[str, Any] | None) -> list[str]:
    if dose is None:
        return []
    lines = [f"### {domain}: dose-response", "", "| arm | on-topic share | recovery | continuation accuracy |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for point in dose["points"]:
        source = "" if point["measured"] else " (nominal)"
        accuracy = "n/a" if point["accuracy"] is None else f"{100 * point['accuracy']:.1f}%"
        lines.append(f"| {point['arm']} | {100 * point['on_topic']:.1f}%{source} | {_number(point['recovery'], '.3f')}"
                     f" | {accuracy} |")  # fmt: skip
    lines += ["", "Each curator on the monotone curve: the on-topic share that would give its figure.", ""]
    for curator, metrics in dose["placements"].items():
        where = [f"{metric} {_number(place['level'], '.3f')} -> " + (
            f"{100 * place['on_topic']:.1f}%" if place["on_topic"] is not None else place["where"])
            for metric, place in metrics.items()]  # fmt: skip
        lines.append(f"- {curator}: " + "; ".join(where))
    return [*lines, "", f"![dose-response {domain}](dose-{domain}.png)", ""]


def _pilot_lines(pilot: dict[str, Any] | None) -> list[str]:
    if not pilot or not pilot["rows"]:
        return []
    domains = list(dict.fromkeys(d for row in pilot["rows"] for d in row["gaps"]))
    lines = ["## Pilot: prune ratio", "", "Oracle's recovered share minus random's, per domain; the ratio whose"
             " smallest gap is largest is chosen.", "", "| ratio | " + " | ".join(domains) + " | smallest |",
             "|---:|" + "---:|" * (len(domains) + 1)]  # fmt: skip
    for row in pilot["rows"]:
        cells = [_number(row["gaps"].get(d), ".3f") for d in domains]
        lines.append(f"| {row['ratio']:.2f} | " + " | ".join(cells) + f" | {_number(row['smallest'], '.3f')} |")
    choice = "none (no ratio has every gap defined)" if pilot["choice"] is None else f"{pilot['choice']:.2f}"
    return [*lines, "", f"Chosen ratio: {choice}.", ""]


def _budget_lines(budget: list[dict[str, Any]]) -> list[str]:
    if not budget:
        return []
    columns = list(dict.fromkeys(key for row in budget for key in row))
    aligns = ["---:|" if all(isinstance(row.get(c), int) for row in budget) else "---|" for c in columns]
    lines = ["## Training budget", "", "| " + " | ".join(columns) + " |", "|" + "".join(aligns)]
    for row in budget:
        cells = [f"{row[c]:,}" if isinstance(row.get(c), int) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _ablation_lines(kind: str, domain: str, rows: list[dict[str, Any]]) -> list[str]:
    if kind == "ratio":
        title, header = "prune ratio", "| prune ratio | pruned perplexity | FineScope perplexity | recovered [95% CI] |"
    else:
        title, header = "SAE coordinates K", "| K | pruned perplexity | FineScope perplexity | recovered [95% CI] |"
    lines = [f"## Ablation: {title} ({domain})", "", header, "|---|---:|---:|---:|"]
    for row in rows:
        value = f"{row['value']:.2f}" if kind == "ratio" else str(row["value"])
        lines.append(
            f"| {value} | {_number(row['pruned_perplexity'])} | {_number(row['perplexity'])} |"
            f" {_interval(row['recovered'])} |"
        )
    return [*lines, "", f"![ablation {title}](ablation-{kind}.png)", ""]


def _errors(shares: list[dict[str, float]]) -> np.ndarray:
    """Error bar lengths below and above each value, shape (2, n); 0 where the interval is unknown."""
    values = np.array([[s["value"] - s["ci_low"], s["ci_high"] - s["value"]] for s in shares], float).T
    return np.clip(np.nan_to_num(values, nan=0.0), 0, None)


def _pyplot():
    """matplotlib.pyplot, headless; imported on use so that importing the report stays light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _recovery_chart(figures: dict[str, dict[str, Any]]) -> bytes:
    """Per domain, grouped bars of each arm's recovered share on the domain set, with 95% intervals."""
    plt = _pyplot()
    domains = list(figures)
    fig, axis = plt.subplots(figsize=(max(5.0, 2.2 * len(domains) + 2), 3.8))
    width = 0.8 / len(RECOVERY_ARMS)
    nan = {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    for number, arm in enumerate(RECOVERY_ARMS):
        shares = [figures[d]["domain"]["recovered"].get(arm, nan) for d in domains]
        shown = [i for i, s in enumerate(shares) if math.isfinite(s["value"])]
        if shown:
            axis.bar(np.array(shown) + number * width - 0.4 + width / 2, [shares[i]["value"] for i in shown], width,
                     yerr=_errors([shares[i] for i in shown]), capsize=3, label=arm)  # fmt: skip
    for level in (0.0, 1.0):
        axis.axhline(level, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(np.arange(len(domains)), domains)
    axis.set_ylabel("recovered share (0 = pruned, 1 = base)", fontsize=9)
    axis.set_title("Recovery on each domain's held-out set (finescope, random: trial means)", fontsize=10)
    axis.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)


def _ablation_chart(kind: str, rows: list[dict[str, Any]]) -> bytes:
    """Recovered share with its 95% interval against the ablated value, on a categorical x axis."""
    fig, axis = _pyplot().subplots(figsize=(max(4.5, 0.9 * len(rows) + 2), 3.4))
    positions = np.arange(len(rows))
    values = np.array([row["recovered"]["value"] for row in rows], float)
    axis.errorbar(positions, values, yerr=_errors([row["recovered"] for row in rows]), marker="o", capsize=3)
    for level in (0.0, 1.0):  # the pruned and the base model
        axis.axhline(level, color="grey", linestyle="--", linewidth=1)
    ticks = [f"{row['value']:.2f}" if kind == "ratio" else str(row["value"]) for row in rows]
    axis.set_xticks(positions, ticks)
    axis.set_xlabel("prune ratio" if kind == "ratio" else "SAE coordinates K")
    axis.set_title(f"FineScope's recovery by {axis.get_xlabel()}", fontsize=10)
    axis.set_ylabel("recovered share (0 = pruned, 1 = base)", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)


def _plain(value: Any) -> Any:
    """JSON-ready: nan and inf become null (JSON has no NaN), numpy scalars plain Python, tuples lists."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dose_chart(domain: str, dose: dict[str, Any]) -> bytes:
    """Recovery (and continuation accuracy, right axis) against the on-topic share, with the curators placed."""
    fig, axis = _pyplot().subplots(figsize=(5.5, 3.6))
    xs = [100 * point["on_topic"] for point in dose["points"]]
    axis.plot(xs, [point["recovery"] for point in dose["points"]], "o", color="C0", label="recovery")
    axis.plot(xs, dose["curves"].get("recovery", [math.nan] * len(xs)), "-", color="C0")
    for point, x in zip(dose["points"], xs, strict=True):
        axis.annotate(point["arm"], (x, point["recovery"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for number, (curator, metrics) in enumerate(dose["placements"].items()):
        if "recovery" in metrics:
            axis.axhline(metrics["recovery"]["level"], color=f"C{number + 2}", linestyle=":", label=curator)
    if "accuracy" in dose["curves"]:
        right = axis.twinx()
        right.plot(xs, dose["curves"]["accuracy"], "s--", color="C1", label="continuation accuracy")
        right.set_ylabel("continuation accuracy", fontsize=9)
    axis.set_xlabel("measured on-topic share of the arm's documents (%)")
    axis.set_ylabel("recovered share", fontsize=9)
    axis.set_title(f"{domain}: dose-response", fontsize=10)
    axis.legend(fontsize=7)
    fig.tight_layout()
    return png_bytes(fig)


def merge_results(parts: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """One held-out set's evaluations in parts (URI -> loaded results.json, the reference first) as one
    results.json, with the pruned model's agreement between the parts.

    Every part must have scored the same documents: the same dataset, the same number of documents and the
    same tokens per document, and for the continuation task the same questions; else ValueError naming the
    files. Each part evaluated the pruned model again; the merged one keeps the first part's, and the
    agreement is the largest difference between two parts of its NLL per token on one document (None with
    fewer than two parts that have it). Labels come in the order of one evaluation of every model: base and
    pruned, each kind's trials (kinds in the order the parts name them), then the other references."""
    (first_uri, first), *_ = parts.items()
    name, entry = next(iter(first["perplexity"].items()))
    tokens = _document_tokens(entry)
    continuation = next(iter((first.get("continuation") or {}).items()), None)
    ppl_rows: dict[str, Any] = {}
    hits: dict[str, Any] = {}
    for uri, results in parts.items():
        other_name, other = next(iter(results["perplexity"].items()))
        if other_name != name or other["documents"] != entry["documents"] or _document_tokens(other) != tokens:
            raise ValueError(f"{uri} and {first_uri} did not score the same documents ({other_name!r}, "
                             f"{other['documents']} documents; {name!r}, {entry['documents']} documents)")  # fmt: skip
        if continuation is not None:
            section = (results.get("continuation") or {}).get(continuation[0])
            asked = [(section or {}).get(key) for key in ("doc_ids", "offsets")]
            if section is None or asked != [continuation[1].get(key) for key in ("doc_ids", "offsets")]:
                raise ValueError(f"{uri} and {first_uri} did not ask the same continuation questions")
            hits.update((label, row) for label, row in section["results"].items() if label not in hits)
        for label, row in other["results"].items():
            if label in ppl_rows and label != "pruned":
                raise ValueError(f"{uri}: model {label!r} is evaluated in another part too; give each part its own")
            ppl_rows.setdefault(label, row)
    order = _merged_order(list(ppl_rows))
    merged = {**first, "perplexity": {name: {**entry, "results": {label: ppl_rows[label] for label in order},
                                             "comparisons": []}}}  # fmt: skip
    if continuation is not None:
        answered = {label: hits[label] for label in order if label in hits}
        merged["continuation"] = {continuation[0]: {**continuation[1], "comparisons": [], "results": answered}}
    return merged, _pruned_agreement([next(iter(r["perplexity"].values())) for r in parts.values()])


def _document_tokens(entry: dict[str, Any]) -> list[int]:
    return list(next(iter(entry["results"].values()))["document_tokens"])


def _merged_order(labels: list[str]) -> list[str]:
    """base, pruned, the trial labels kind by kind (trials ascending), then the rest in their order."""
    kinds = list(dict.fromkeys(match["kind"] for match in map(TRIAL_LABEL.match, labels) if match))
    per_trial = sorted((label for label in labels if TRIAL_LABEL.match(label)),
                       key=lambda label: (kinds.index(TRIAL_LABEL.match(label)["kind"]),
                                          int(TRIAL_LABEL.match(label)["trial"])))  # fmt: skip
    head = [label for label in ("base", "pruned") if label in labels]
    return [*head, *per_trial, *(label for label in labels if label not in {*head, *per_trial})]


def _pruned_agreement(entries: list[dict[str, Any]]) -> float | None:
    """The largest difference of the pruned model's NLL per token on one document between two evaluations."""
    rows = [entry["results"]["pruned"] for entry in entries if "pruned" in entry["results"]]
    if len(rows) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = np.array([np.asarray(r["document_nll"], float) / np.asarray(r["document_tokens"], float)
                              for r in rows])  # fmt: skip
    return float(np.nanmax(per_token.max(axis=0) - per_token.min(axis=0))) if per_token.size else 0.0


def _domain_sources(sources: tuple[str, str] | DomainParts, options: StorageOptions | None, trials: list[int]
                    ) -> tuple[dict[str, Any], dict[str, Any], list[int], dict[str, float | None]]:  # fmt: skip
    """A domain's results per held-out set, where they came from, the trials they hold and the pruned model's
    agreement between parts (None for one evaluation)."""
    if not isinstance(sources, DomainParts):
        scopes = dict(zip(SCOPES, sources, strict=True))
        return ({scope: storage.read_json(uri, options) for scope, uri in scopes.items()}, scopes, trials,
                {scope: None for scope in SCOPES})  # fmt: skip
    present = [t for t in trials if t in sources.trials] + sorted(set(sources.trials) - set(trials))
    uris = {scope: [sources.reference[i], *(sources.trials[t][i] for t in present)] for i, scope in enumerate(SCOPES)}
    merged, agreement = {}, {}
    for scope, listed in uris.items():
        merged[scope], agreement[scope] = merge_results({uri: storage.read_json(uri, options) for uri in listed})
    return merged, uris, present, agreement


SCOPES = ("domain", "general")


def _domain_entries(layout: ReplicationLayout, options: StorageOptions | None) -> dict[str, Any]:
    """Per domain: the figures of its two held-out sets, its selections and its dose-response."""
    rows = [storage.read_json(uri, options) for uri in layout.selections if storage.exists(uri, options)]
    entries = {}
    for domain, sources in layout.domains.items():
        results, scopes, trials, agreement = _domain_sources(sources, options, layout.trials)
        entry = {scope: domain_figures(results[scope], trials, layout.trials[0]) for scope in SCOPES}
        selections = selection_figures(rows, domain)
        dose = dose_response(entry["domain"], selections)
        entries[domain] = {**entry, "sources": scopes, "trials": trials, "pruned_agreement": agreement,
                           "selections": selections, "dose_response": dose}  # fmt: skip
    return entries


def _disagreement_lines(domains: dict[str, Any]) -> list[str]:
    """A warning where the parts' pruned models differ: their figures do not compare."""
    found = [
        f"{domain} {scope} set {value:.3g}"
        for domain, entry in domains.items()
        for scope, value in entry["pruned_agreement"].items()
        if value is not None and value > PRUNED_TOLERANCE
    ]
    if not found:
        return []
    return [f"**Warning: the pruned model differs between parts: {', '.join(found)} (largest difference of its NLL"
            f" per token on one document, above {PRUNED_TOLERANCE:g}). Each part pruned the base model again and"
            " the pruning was not the same, so arms of different parts do not compare.**", ""]  # fmt: skip


def _holm_families(domains: dict[str, Any]) -> dict[str, Any]:
    """Holm's correction across domains: the two-level p of FineScope against random (`holm`), of each
    headline comparison (`holm_headline`), and of each continuation McNemar test (`holm_continuation`)."""
    figures: dict[str, Any] = {"holm": holm({d: e["domain"]["two_level"]["p_value"] for d, e in domains.items()})}
    headline: dict[str, dict[str, float]] = {}
    continuation: dict[str, dict[str, dict[str, float]]] = {}
    for domain, entry in domains.items():
        for other, test in entry["domain"]["headline"].items():
            headline.setdefault(other, {})[domain] = test["p_value"]
        for reference, tests in ((entry["domain"]["continuation"] or {}).get("mcnemar") or {}).items():
            for kind, test in tests.items():
                continuation.setdefault(reference, {}).setdefault(kind, {})[domain] = test["p_value"]
    figures["holm_headline"] = {other: holm(p_values) for other, p_values in headline.items()}
    figures["holm_continuation"] = {reference: {kind: holm(p_values) for kind, p_values in kinds.items()}
                                    for reference, kinds in continuation.items()}  # fmt: skip
    return figures


def write_report(root: str, layout: ReplicationLayout, options: StorageOptions | None = None,
                 header: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Read every evaluation (and selection.json) the layout names and write replication.json,
    replication.md and the PNG charts under `root`; returns {"markdown", "figures", "files"}. Every number
    the markdown prints is in replication.json (percentages as fractions)."""
    domains = _domain_entries(layout, options)
    figures: dict[str, Any] = {"trials": layout.trials, "domains": domains, "budget": layout.budget, "ablations": {},
                               "confidence": 0.95, "samples": SAMPLES, "p_floor": 2 / SAMPLES,
                               "pruned_agreement": {d: e["pruned_agreement"] for d, e in domains.items()},
                               "pruned_tolerance": PRUNED_TOLERANCE}  # fmt: skip
    lines = [*(header or ["# FineScope replication"]), "", *_disagreement_lines(domains), "Recovered share R ="
             " (L_pruned - L_arm) / (L_pruned - L_base), with L the token-weighted mean NLL: 1 = back to the base"
             " model, 0 = no better than pruned. Intervals: 95% bootstrap over documents.", "",
             "![recovery](recovery.png)", ""]  # fmt: skip
    images = {"recovery.png": _recovery_chart(figures["domains"])} if figures["domains"] else {}
    if figures["domains"]:
        figures.update(_holm_families(figures["domains"]))
    for domain, entry in figures["domains"].items():
        lines += _domain_lines(domain, entry["domain"], entry["general"], entry["trials"])
        lines += _selection_lines(entry["selections"])
        lines += _headline_lines(domain, entry["domain"], figures["holm_headline"])
        lines += _continuation_lines(domain, entry["domain"]["continuation"], figures["holm_continuation"])
        lines += _dose_lines(domain, entry["dose_response"])
        if entry["dose_response"]:
            images[f"dose-{domain}.png"] = _dose_chart(domain, entry["dose_response"])
    if figures["domains"]:
        lines += ["Across domains (Holm's correction of the two-level p-values): " + ", ".join(
            f"{d} {_significance(h['p_holm'])}" for d, h in figures["holm"].items()) + ".", ""]  # fmt: skip
    lines += _budget_lines(layout.budget)
    if layout.pilot:
        evaluations = {
            r: {d: storage.read_json(uri, options) for d, uri in by.items()} for r, by in layout.pilot.items()
        }
        figures["pilot"] = pilot_figures(evaluations)
        lines += _pilot_lines(figures["pilot"])
    for kind, ablation in (("ratio", layout.ratio_ablation), ("coords", layout.coords_ablation)):
        if ablation is None:
            continue
        domain, uri, values = ablation
        rows = ablation_figures(storage.read_json(uri, options), kind, values)
        figures["ablations"][kind] = {"domain": domain, "source": uri, "rows": rows}
        lines += _ablation_lines(kind, domain, rows)
        images[f"ablation-{kind}.png"] = _ablation_chart(kind, rows)
    return _write_files(root, "\n".join(lines) + "\n", figures, images, options)


def _write_files(root: str, markdown: str, figures: dict[str, Any], images: dict[str, bytes],
                 options: StorageOptions | None) -> dict[str, Any]:  # fmt: skip
    files = [storage.join(root, "replication.json"), storage.join(root, "replication.md")]
    storage.write_json_atomic(files[0], _plain(figures), options)
    storage.write_bytes_atomic(files[1], markdown.encode(), options)
    for name, png in images.items():
        files.append(storage.join(root, name))
        storage.write_bytes_atomic(files[-1], png, options)
    return {"markdown": markdown, "figures": figures, "files": files}
