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
from dataclasses import dataclass
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
RECOVERY_ARMS = ("finescope", "random", "oracle", "unpruned", "undistilled")

Scores = tuple[np.ndarray, np.ndarray]
"""Per document: summed NLL in nats, scored tokens."""
Resampled = tuple[float, np.ndarray]
"""L on the documents as scored, and L on each bootstrap resample, shape (SAMPLES,)."""


@dataclass
class ReplicationLayout:
    domains: dict[str, tuple[str, str]]
    """Domain -> (results.json URI on the domain's held-out set, results.json URI on the general held-out set)."""
    trials: list[int]
    """Trial numbers n of the `finescope-t{n}` and `random-t{n}` arms."""
    ratio_ablation: tuple[str, str, list[float]] | None
    """(domain, results.json URI, prune ratios including the main one), or None to leave the section out."""
    coords_ablation: tuple[str, str, list[int | str]] | None
    """(domain, results.json URI, numbers of SAE coordinates K including "all"), or None."""
    budget: list[dict[str, Any]]
    """One row per fine-tuned arm, e.g. {"arm", "documents", "tokens", "steps"}; rendered as a table as-is."""


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
    rng = np.random.default_rng(seed)
    trials, documents = len(ours), len(ours[0][0])

    def gap(picked: np.ndarray, docs: np.ndarray) -> float:
        ours_nll = sum(ours[t][0][docs].sum() for t in picked) / sum(ours[t][1][docs].sum() for t in picked)
        theirs_nll = sum(theirs[t][0][docs].sum() for t in picked) / sum(theirs[t][1][docs].sum() for t in picked)
        return float(ours_nll - theirs_nll)

    everything = np.arange(documents)
    values = [gap(rng.integers(0, trials, trials), rng.integers(0, documents, documents)) for _ in range(samples)]
    low, high = np.percentile(values, [2.5, 97.5])
    p_value = min(1.0, 2 * min(np.mean(np.asarray(values) >= 0), np.mean(np.asarray(values) <= 0)))
    return {"log_ratio": gap(np.arange(trials), everything), "ci_low": float(low), "ci_high": float(high),
            "p_value": float(p_value), "trials": trials, "samples": samples}  # fmt: skip


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


def domain_figures(domain_results: dict[str, Any], trials: list[int]) -> dict[str, Any]:
    """Every statistic of one held-out set (a loaded results.json): perplexities, recovered shares with
    intervals (per model and for the trial-mean finescope and random arms), FineScope against random per
    trial and pooled, the share of the oracle's gain, the spread over trials and distillation's effect."""
    name, scores = _scores(domain_results)
    finescope, random = [f"finescope-t{n}" for n in trials], [f"random-t{n}" for n in trials]
    _require(name, scores, ["base", "pruned", *finescope, *random])
    scores = {**scores, "finescope": _trial_mean(scores, finescope), "random": _trial_mean(scores, random)}
    resampled = _resample(scores)
    pruned, base = resampled["pruned"], resampled["base"]
    recovered = {label: _share(pruned, value, base) for label, value in resampled.items()}
    versus = {f"t{n}": _versus(scores[f"finescope-t{n}"], scores[f"random-t{n}"]) for n in trials}
    versus["pooled"] = _versus(scores["finescope"], scores["random"])
    spread = {arm: _spread([recovered[label]["value"] for label in labels]) for arm, labels in
              (("finescope", finescope), ("random", random))}  # fmt: skip
    gaps = [a - b for a, b in zip(spread["finescope"]["values"], spread["random"]["values"], strict=True)]
    over_seeds = stats.seed_t_test(gaps) if len(gaps) > 1 else None
    first = f"finescope-t{trials[0]}"  # the undistilled arm trains on the first trial's documents
    distilled = {first, "undistilled"} <= scores.keys()
    return {
        "dataset": name,
        "documents": len(scores["base"][0]),
        "perplexity": {label: math.exp(value[0]) for label, value in resampled.items()},
        "pruning_cost": pruned[0] - base[0],
        "recovery_defined": abs(pruned[0] - base[0]) >= EPSILON,
        "recovered": recovered,
        "versus_random": versus,
        "oracle_share": _share(pruned, resampled["finescope"], resampled["oracle"]) if "oracle" in scores else None,
        "spread": spread,
        "over_seeds": over_seeds and {**over_seeds, "significant": over_seeds["p_value"] < stats.ALPHA},
        "two_level": two_level_bootstrap([scores[label] for label in finescope], [scores[label] for label in random]),
        "distillation": _versus(scores[first], scores["undistilled"]) if distilled else None,
    }


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
    per_trial = [f"{arm}-t{n}" for arm in ("finescope", "random") for n in trials]
    arms = ["base", "pruned", "finescope", "random", *per_trial, *REFERENCE_ARMS]
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
        subject = f"distillation (finescope-t{trials[0]} against undistilled)"
        verdicts.append(_verdict(subject, figures["distillation"], DISTILLATION))
    intro = "FineScope against random data of the same size: paired bootstrap over documents, negative log-ppl ="
    return [f"{intro} FineScope better.", "", *(f"- {v}" for v in verdicts), ""]


def _domain_lines(domain: str, figures: dict[str, Any], general: dict[str, Any], trials: list[int]) -> list[str]:
    sets = f"`{figures['dataset']}` ({figures['documents']} documents)"
    sets += f" and `{general['dataset']}` ({general['documents']} documents)"
    lines = [f"## {domain}", "", f"Held-out sets: {sets}; `finescope` and `random` are the means over trials.", ""]
    return lines + _arm_table(figures, general, trials) + _finding_lines(domain, figures, general, trials)


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


def write_report(root: str, layout: ReplicationLayout, options: StorageOptions | None = None,
                 header: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Read every evaluation the layout names and write replication.json, replication.md and the PNG
    charts under `root`; returns {"markdown", "figures", "files"}."""
    figures: dict[str, Any] = {"trials": layout.trials, "domains": {}, "budget": layout.budget, "ablations": {}}
    lines = [*(header or ["# FineScope replication"]), "", "Recovered share R = (L_pruned - L_arm) / (L_pruned -"
             " L_base), with L the token-weighted mean NLL: 1 = back to the base model, 0 = no better than pruned."
             " Intervals: 95% bootstrap over documents.", "", "![recovery](recovery.png)", ""]  # fmt: skip
    for domain, (domain_uri, general_uri) in layout.domains.items():
        scopes = {"domain": domain_uri, "general": general_uri}
        entry = {scope: domain_figures(storage.read_json(uri, options), layout.trials) for scope, uri in scopes.items()}
        figures["domains"][domain] = {**entry, "sources": scopes}
        lines += _domain_lines(domain, entry["domain"], entry["general"], layout.trials)
    if figures["domains"]:
        figures["holm"] = holm({d: entry["domain"]["two_level"]["p_value"] for d, entry in figures["domains"].items()})
        lines += ["Across domains (Holm's correction of the two-level p-values): " + ", ".join(
            f"{d} {_significance(h['p_holm'])}" for d, h in figures["holm"].items()) + ".", ""]  # fmt: skip
    lines += _budget_lines(layout.budget)
    images = {"recovery.png": _recovery_chart(figures["domains"])} if figures["domains"] else {}
    for kind, ablation in (("ratio", layout.ratio_ablation), ("coords", layout.coords_ablation)):
        if ablation is None:
            continue
        domain, uri, values = ablation
        rows = ablation_figures(storage.read_json(uri, options), kind, values)
        figures["ablations"][kind] = {"domain": domain, "source": uri, "rows": rows}
        lines += _ablation_lines(kind, domain, rows)
        images[f"ablation-{kind}.png"] = _ablation_chart(kind, rows)
    markdown = "\n".join(lines) + "\n"
    files = [storage.join(root, "replication.json"), storage.join(root, "replication.md")]
    storage.write_json_atomic(files[0], _plain(figures), options)
    storage.write_bytes_atomic(files[1], markdown.encode(), options)
    for name, png in images.items():
        files.append(storage.join(root, name))
        storage.write_bytes_atomic(files[-1], png, options)
    return {"markdown": markdown, "figures": figures, "files": files}
