"""The replication report on synthetic results.json files whose per-document NLLs the test sets."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from experiments.replication.report import ReplicationLayout, ablation_figures, domain_figures, write_report
from experiments.replication.spec import arm_labels

TRIALS = [0, 1, 2]
# NLL per token: FineScope recovers 3/4 of what pruning cost, random 1/4, the oracle 5/6.
MAIN = {"base": 2.0, "pruned": 4.0, "oracle": 2.2, "unpruned": 1.9, "undistilled": 2.8}
MAIN |= {f"finescope-t{n}": 2.5 for n in TRIALS} | {f"random-t{n}": 3.5 for n in TRIALS}


def results_json(means: dict[str, float], documents: int = 200, seed: int = 0, name: str = "heldout") -> dict:
    """A results.json with one perplexity dataset: document i of model m has tokens_i * (mean_m + difficulty_i
    + noise) nats, so models share each document's difficulty, as real models on real documents do."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(20, 200, documents)
    difficulty = rng.normal(0.0, 0.3, documents)
    results = {}
    for label, mean in means.items():
        nll = tokens * (mean + difficulty + rng.normal(0.0, 0.2, documents))
        results[label] = {"perplexity": math.exp(nll.sum() / tokens.sum()), "ci_low": 0.0, "ci_high": 0.0,
                          "tokens": int(tokens.sum()), "document_nll": [round(float(v), 5) for v in nll],
                          "document_tokens": tokens.tolist()}  # fmt: skip
    return {"perplexity": {name: {"documents": documents, "skipped": {}, "results": results, "comparisons": []}}}


def test_recovered_shares_and_their_intervals():
    figures = domain_figures(results_json(MAIN), TRIALS)
    recovered = figures["recovered"]
    assert recovered["finescope"]["value"] == pytest.approx(0.75, abs=0.03)
    assert recovered["random"]["value"] == pytest.approx(0.25, abs=0.03)
    assert recovered["base"]["value"] == pytest.approx(1.0) and recovered["pruned"]["value"] == pytest.approx(0.0)
    for label in ("finescope", "random", "finescope-t1", "oracle", "undistilled"):
        share = recovered[label]
        assert share["ci_low"] <= share["value"] <= share["ci_high"] and share["ci_high"] - share["ci_low"] < 0.1
    assert figures["perplexity"]["pruned"] == pytest.approx(math.exp(4.0), rel=0.05)
    assert figures["documents"] == 200 and figures["recovery_defined"]


def test_finescope_against_random_per_trial_pooled_and_the_other_findings():
    figures = domain_figures(results_json(MAIN), TRIALS)
    for key in ("t0", "t1", "t2", "pooled"):
        test = figures["versus_random"][key]
        assert test["log_ratio"] == pytest.approx(-1.0, abs=0.05) and test["significant"]
        assert test["ci_low"] <= test["log_ratio"] <= test["ci_high"] < 0
        assert test["ppl_ratio"] == pytest.approx(math.exp(test["log_ratio"]))
    # The pooled arm is the per-document mean over trials: its noise shrinks, its interval narrows.
    pooled, single = figures["versus_random"]["pooled"], figures["versus_random"]["t0"]
    assert pooled["ci_high"] - pooled["ci_low"] < single["ci_high"] - single["ci_low"]
    oracle = figures["oracle_share"]
    assert oracle["value"] == pytest.approx(1.5 / 1.8, abs=0.03) and oracle["ci_low"] <= oracle["value"]
    per_trial = [figures["recovered"][f"finescope-t{n}"]["value"] for n in TRIALS]
    spread = figures["spread"]["finescope"]
    assert spread["values"] == per_trial and spread["std"] == pytest.approx(np.std(per_trial, ddof=1))
    assert spread["mean"] == pytest.approx(np.mean(per_trial)) and 0 < spread["std"] < 0.05
    assert (
        figures["distillation"]["log_ratio"] == pytest.approx(-0.3, abs=0.05) and figures["distillation"]["significant"]
    )


def test_seeds_that_disagree_make_the_gap_not_significant_over_seeds_though_each_trial_is():
    """Each trial's own test sees only the documents' noise; the test over seeds sees the trials disagree."""
    means = dict(MAIN) | {"finescope-t0": 2.5, "random-t0": 3.5, "finescope-t1": 3.5, "random-t1": 2.5}
    means |= {"finescope-t2": 2.9, "random-t2": 3.0}
    figures = domain_figures(results_json(means), TRIALS)
    assert all(figures["versus_random"][f"t{n}"]["significant"] for n in (0, 1))
    seeds = figures["over_seeds"]
    gaps = [figures["recovered"][f"finescope-t{n}"]["value"] - figures["recovered"][f"random-t{n}"]["value"]
            for n in TRIALS]  # fmt: skip
    assert seeds["mean"] == pytest.approx(np.mean(gaps)) and seeds["std"] == pytest.approx(np.std(gaps, ddof=1))
    assert seeds["df"] == 2 and seeds["p_value"] > 0.5 and not seeds["significant"]
    # Where the seeds agree (MAIN: every trial recovers 3/4 against 1/4), the gap holds over seeds too.
    agreeing = domain_figures(results_json(MAIN), TRIALS)["over_seeds"]
    assert agreeing["mean"] == pytest.approx(0.5, abs=0.03) and agreeing["p_value"] < 0.001 and agreeing["significant"]


def test_one_trial_has_no_spread_and_missing_reference_arms_are_left_out():
    means = {"base": 2.0, "pruned": 4.0, "finescope-t0": 2.5, "random-t0": 3.5}
    figures = domain_figures(results_json(means), [0])
    assert figures["spread"]["random"]["std"] == 0.0
    assert figures["oracle_share"] is None and figures["distillation"] is None and figures["over_seeds"] is None


def pruning_cost_nothing(data: dict) -> dict:
    """The pruned model scores every document exactly as the base model does."""
    rows = next(iter(data["perplexity"].values()))["results"]
    rows["pruned"] = dict(rows["base"])
    return data


def test_recovery_is_undefined_without_warnings_when_pruning_cost_nothing():
    data = pruning_cost_nothing(results_json(MAIN))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figures = domain_figures(data, TRIALS)
    assert not figures["recovery_defined"]
    assert all(math.isnan(share["value"]) for share in figures["recovered"].values())
    assert math.isnan(figures["spread"]["finescope"]["mean"])
    assert figures["versus_random"]["pooled"]["significant"]  # the paired test does not need the base


def test_mismatched_document_counts_and_missing_models_raise():
    data = results_json(MAIN)
    row = data["perplexity"]["heldout"]["results"]["random-t1"]
    row["document_nll"], row["document_tokens"] = row["document_nll"][:-1], row["document_tokens"][:-1]
    with pytest.raises(ValueError, match="different numbers of documents"):
        domain_figures(data, TRIALS)
    with pytest.raises(ValueError, match=r"lacks the models \['finescope-t3', 'random-t3'\]"):
        domain_figures(results_json(MAIN), [*TRIALS, 3])


def test_ablation_rows_are_ordered_with_all_last_and_use_their_own_pruned_reference():
    ratios = results_json({"base": 2.0, "pruned-0.25": 3.0, "finescope-0.25": 2.5, "pruned-0.50": 4.0,
                           "finescope-0.50": 2.5})  # fmt: skip
    rows = ablation_figures(ratios, "ratio", [0.5, 0.25])
    assert [row["value"] for row in rows] == [0.25, 0.5]
    assert [row["pruned"] for row in rows] == ["pruned-0.25", "pruned-0.50"]
    assert [row["recovered"]["value"] for row in rows] == pytest.approx([0.5, 0.75], abs=0.05)
    coords = results_json({"base": 2.0, "pruned": 4.0, "finescope-k8": 3.5, "finescope-k32": 3.0,
                           "finescope-kall": 2.5})  # fmt: skip
    rows = ablation_figures(coords, "coords", ["all", 32, 8])
    assert [row["value"] for row in rows] == [8, 32, "all"]
    assert [row["arm"] for row in rows] == ["finescope-k8", "finescope-k32", "finescope-kall"]
    assert [row["recovered"]["value"] for row in rows] == pytest.approx([0.25, 0.5, 0.75], abs=0.05)
    with pytest.raises(ValueError, match="kind"):
        ablation_figures(coords, "layers", [1])


def _save(path, data: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def test_write_report_writes_figures_markdown_and_charts(tmp_path):
    same = MAIN | {f"random-t{n}": 2.5 for n in TRIALS}  # random as good as FineScope
    flat = pruning_cost_nothing(results_json(MAIN, seed=1, name="general"))
    layout = ReplicationLayout(
        domains={
            "mathematics": (_save(tmp_path / "m" / "results.json", results_json(MAIN, name="mathematics-heldout")),
                            _save(tmp_path / "mg" / "results.json", flat)),
            "law": (_save(tmp_path / "l" / "results.json", results_json(same, seed=2, name="law-heldout")),
                    _save(tmp_path / "lg" / "results.json", results_json(MAIN, seed=3, name="general"))),
        },
        trials=TRIALS,
        ratio_ablation=("mathematics", _save(tmp_path / "r" / "results.json", results_json(
            {"base": 2.0, "pruned-0.25": 3.0, "finescope-0.25": 2.5, "pruned-0.50": 4.0, "finescope-0.50": 2.5})),
            [0.25, 0.5]),
        coords_ablation=None,
        budget=[{"arm": "finescope-t0", "documents": 1000, "tokens": 250000, "steps": 40}],
    )  # fmt: skip
    out = tmp_path / "report"
    report = write_report(str(out), layout, header=["# Replication", "", "SmolLM2-135M pruned to 50%."])
    names = sorted(path.name for path in out.iterdir())
    # An old run's random and single oracle arm make a two-point dose-response at their nominal 0% and 100%.
    assert names == ["ablation-ratio.png", "dose-law.png", "dose-mathematics.png", "recovery.png", "replication.json",
                     "replication.md"]  # fmt: skip
    assert sorted(report["files"]) == sorted(str(out / name) for name in names)
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    markdown = (out / "replication.md").read_text()
    assert markdown == report["markdown"] and markdown.startswith("# Replication\n\nSmolLM2-135M pruned to 50%.")
    assert "- mathematics (pooled over 3 trials): FineScope beat random, log-ppl -" in markdown
    assert "- law (pooled over 3 trials): FineScope did not beat random," in markdown
    law = report["figures"]["domains"]["law"]["domain"]["versus_random"]["pooled"]
    assert f"not significant (p={law['p_value']:.2g})" in markdown and not law["significant"]
    assert "| arm | perplexity (domain) | recovered (domain) | perplexity (general) | recovered (general) |" in markdown
    assert "Recovered share on the general set: undefined (pruning cost nothing on this set)." in markdown
    assert "the teacher's rewrites helped" in markdown and "share of the oracle's gain" in markdown
    seeds = report["figures"]["domains"]["mathematics"]["domain"]["over_seeds"]
    assert (f"- over seeds (FineScope's recovered share minus random's, per trial): {seeds['mean']:+.3f} ± "
            f"{seeds['std']:.3f}, t-test with 2 df significant (p=") in markdown  # fmt: skip
    assert "| finescope-t0 | 1,000 | 250,000 | 40 |" in markdown
    assert "## Ablation: prune ratio (mathematics)" in markdown and "## Ablation: SAE coordinates" not in markdown
    table = markdown.split("| arm |")[1].split("\n\n")[0]
    assert "| finescope | " in table and "n/a" in table  # mathematics' general set: recovery undefined
    saved = json.loads((out / "replication.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert saved["domains"]["mathematics"]["general"]["recovered"]["finescope"]["value"] is None
    assert saved["domains"]["mathematics"]["sources"]["domain"] == layout.domains["mathematics"][0]
    assert [row["value"] for row in saved["ablations"]["ratio"]["rows"]] == [0.25, 0.5]


def test_the_two_level_bootstrap_holds_training_noise_and_holm_adjusts_across_domains():
    """Seeds that agree give a tight interval that excludes zero; seeds that disagree, each tight over
    documents, give one that holds zero: the interval sees the spread between trials."""
    from experiments.replication.report import holm, two_level_bootstrap

    def arm(mean: float, seed: int):
        entry = results_json({"x": mean}, seed=seed)["perplexity"]["heldout"]["results"]["x"]
        return np.asarray(entry["document_nll"]), np.asarray(entry["document_tokens"], float)

    agree = two_level_bootstrap([arm(2.5, 0), arm(2.5, 0), arm(2.5, 0)], [arm(3.5, 0), arm(3.5, 0), arm(3.5, 0)])
    assert agree["log_ratio"] == pytest.approx(-1.0, abs=0.05) and agree["ci_high"] < 0 and agree["p_value"] == 0
    split = two_level_bootstrap([arm(2.5, 0), arm(3.5, 0), arm(2.0, 0)], [arm(3.5, 0), arm(2.5, 0), arm(3.0, 0)])
    assert split["ci_low"] < 0 < split["ci_high"] and split["p_value"] > 0.05
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert {name: round(entry["p_holm"], 3) for name, entry in adjusted.items()} == {"a": 0.03, "b": 0.06, "c": 0.06}
    assert [name for name, entry in adjusted.items() if entry["significant"]] == ["a"]


def test_the_shipped_report_holds_the_figures_the_docs_quote():
    """docs/replication/replication.json carries the seed-level tests the docs cite."""
    from conftest import REPO

    shipped = json.loads((REPO / "docs" / "replication" / "replication.json").read_text())
    for domain in ("mathematics", "biology", "history"):
        figures = shipped["domains"][domain]["domain"]
        assert {"over_seeds", "two_level"} <= set(figures)
    biology = shipped["domains"]["biology"]["domain"]["two_level"]
    assert (round(biology["log_ratio"], 3), round(biology["ci_low"], 3), round(biology["ci_high"], 3)) == (
        -0.065,
        -0.404,
        0.190,
    )
    assert shipped["holm"]["mathematics"]["significant"] and not shipped["holm"]["biology"]["significant"]


# --- the arms the rebuilt replication evaluates: kinds from labels, continuation, headline, dose, pilot -----------

TWO = [0, 1]
KINDS_MEANS = {"base": 2.0, "pruned": 4.0, "unpruned": 1.9, "undistilled": 2.8}
for _n in TWO:
    KINDS_MEANS |= {f"finescope-t{_n}": 2.5, f"bm25-t{_n}": 2.9, f"minilm-t{_n}": 3.0, f"dense-t{_n}": 3.1}
    KINDS_MEANS |= {f"random-t{_n}": 3.5, f"oracle-t{_n}": 2.2, f"topic25-t{_n}": 3.2, f"topic50-t{_n}": 2.9}
QUESTIONS = 20
# Questions answered right: FineScope the first 15, random the first 5, every other arm the first 10.
CORRECT = {"finescope": 15, "random": 5, "oracle": 18, "topic25": 8, "topic50": 12}


def with_continuation(data: dict, correct: dict[str, int] = CORRECT) -> dict:
    """Add evaluate's continuation section: each label answers its kind's first N of QUESTIONS questions."""
    labels = list(next(iter(data["perplexity"].values()))["results"])
    results = {}
    for label in labels:
        right = correct.get(label.rsplit("-t", 1)[0], 10)
        results[label] = {"correct": [1] * right + [0] * (QUESTIONS - right)}
    data["continuation"] = {"held": {"documents": 25, "questions": QUESTIONS, "skipped": {"too_short": 5},
                                     "settings": {"context_words": 32, "choice_words": 16, "distractors": 3,
                                                  "seed": 0, "norm": "char"},
                                     "doc_ids": [f"d{i}" for i in range(QUESTIONS)], "results": results}}  # fmt: skip
    return data


def test_arm_kinds_come_from_the_labels_and_pair_by_trial():
    from experiments.replication.report import arm_kinds, paired_trials

    kinds = arm_kinds(["base", "pruned", "finescope-t0", "finescope-t1", "bm25-t1", "oracle", "topic25-t0", "x"])
    assert kinds == {"base": [], "pruned": [], "finescope": [0, 1], "bm25": [1], "oracle": [], "topic25": [0]}
    assert paired_trials(kinds, "finescope", "bm25") == [("finescope-t1", "bm25-t1")]
    assert paired_trials(kinds, "finescope", "oracle") == [("finescope-t0", "oracle"), ("finescope-t1", "oracle")]
    assert paired_trials(kinds, "base", "finescope") == [("base", "finescope-t0"), ("base", "finescope-t1")]


def test_continuation_accuracy_with_wilson_intervals_and_mcnemar_on_hand_made_tables():
    from training.evaluation import stats

    figures = domain_figures(with_continuation(results_json(KINDS_MEANS, documents=60)), TWO)["continuation"]
    accuracy = figures["accuracy"]
    assert accuracy["finescope-t0"]["accuracy"] == 0.75 and accuracy["random"]["accuracy"] == 0.25
    assert (accuracy["finescope"]["correct"], accuracy["finescope"]["total"]) == (30, 40)  # pooled over 2 trials
    assert (accuracy["finescope"]["ci_low"], accuracy["finescope"]["ci_high"]) == pytest.approx(
        stats.wilson_interval(30, 40)
    )
    # FineScope against random: 2 trials x 10 questions only FineScope answers, none the other way round.
    test = figures["mcnemar"]["random"]["finescope"]
    assert (test["only_a"], test["only_b"], test["pairs"]) == (20, 0, 40)
    assert test["p_value"] == pytest.approx(2 / 2**20) and test["difference"] == pytest.approx(0.5)
    # The oracle (18 right) against FineScope (15): 3 discordant per trial, 6 in all, p = 2 / 2^6.
    oracle = figures["mcnemar"]["finescope"]["oracle"]
    assert (oracle["only_a"], oracle["only_b"]) == (6, 0) and oracle["p_value"] == pytest.approx(2 / 64)
    # base has no trials: it pairs with each of random's, so its 10 right against random's 5 count twice.
    assert figures["mcnemar"]["random"]["base"]["only_a"] == 10 and figures["questions"] == QUESTIONS
    # Over seeds and documents: the same difference, an interval around it that excludes zero.
    clustered = test["two_level"]
    assert clustered["difference"] == pytest.approx(0.5) and clustered["trials"] == 2
    assert 0 < clustered["ci_low"] < 0.5 < clustered["ci_high"] <= 1 and clustered["p_value"] < 0.01


def test_continuation_questions_of_one_document_are_resampled_together():
    from experiments.replication.report import _document_hits

    doc_ids = ["a", "a", "b", "c", "c", "c"]
    hits = {"x": np.array([1, 0, 1, 1, 1, 0], bool)}
    right, asked = _document_hits(hits, doc_ids)["x"]
    assert right.tolist() == [1, 1, 2] and asked.tolist() == [2, 1, 3]
    # Ten documents of ten questions each: an arm right on the first five documents' questions, the reference
    # on none. Per question, McNemar sees 50 independent wins; the two-level interval sees five documents.
    data = with_continuation(results_json(KINDS_MEANS, documents=60))
    section = data["continuation"]["held"]
    section["doc_ids"] = [f"d{i // 10}" for i in range(100)]
    section["questions"] = 100
    for label in section["results"]:
        right = 50 if label.startswith("finescope") else 0
        section["results"][label] = {"correct": [1] * right + [0] * (100 - right)}
    figures = domain_figures(data, TWO)["continuation"]
    test = figures["mcnemar"]["random"]["finescope"]
    assert test["p_value"] < 1e-20 and figures["asked_documents"] == 10
    clustered = test["two_level"]
    assert clustered["difference"] == pytest.approx(0.5)
    assert clustered["ci_low"] < 0.3 and clustered["ci_high"] > 0.7  # documents, not questions, set the width


def test_headline_compares_finescope_with_every_alternative_present_and_the_oracle():
    figures = domain_figures(results_json(KINDS_MEANS), TWO)
    headline = figures["headline"]
    assert list(headline) == ["random", "bm25", "minilm", "dense", "oracle"]
    for other, gap in (("random", -1.0), ("bm25", -0.4), ("minilm", -0.5), ("dense", -0.6), ("oracle", 0.3)):
        assert headline[other]["log_ratio"] == pytest.approx(gap, abs=0.05)
        assert headline[other]["ci_low"] <= headline[other]["log_ratio"] <= headline[other]["ci_high"]
    assert headline["bm25"]["pairs"] == [["finescope-t0", "bm25-t0"], ["finescope-t1", "bm25-t1"]]
    share = headline["oracle"]["share"]
    assert share["value"] == pytest.approx(1.5 / 1.8, abs=0.03) and share["ci_low"] < share["value"] < share["ci_high"]
    assert figures["recovered"]["topic50"]["value"] == pytest.approx(0.55, abs=0.03)  # kinds pooled from labels
    # An old run (finescope, random, one oracle) has no alternatives; its oracle pairs with every trial.
    old = domain_figures(results_json(MAIN), TRIALS)["headline"]
    assert list(old) == ["random", "oracle"] and len(old["oracle"]["pairs"]) == 3


def test_dose_places_a_curator_on_a_hand_made_monotone_curve():
    from experiments.replication.report import dose_response, monotone, place_on_curve

    assert monotone([0.1, 0.4, 0.3, 0.9]) == pytest.approx([0.1, 0.35, 0.35, 0.9])
    xs, ys = [0.05, 0.3, 0.55, 1.0], [0.2, 0.4, 0.6, 0.8]
    assert place_on_curve(0.5, xs, ys)["on_topic"] == pytest.approx(0.425)
    assert place_on_curve(0.1, xs, ys) == {"on_topic": None, "where": "below 0%"}
    assert place_on_curve(0.9, xs, ys) == {"on_topic": None, "where": "above 100%"}
    assert place_on_curve(0.35, xs, [0.2, 0.35, 0.35, 0.8])["on_topic"] == 0.3  # a flat stretch: its first x
    figures = {"recovered": {arm: {"value": value} for arm, value in
                             {"random": 0.2, "topic25": 0.4, "topic50": 0.6, "oracle": 0.8, "finescope": 0.5,
                              "bm25": 0.9, "dense": 0.1}.items()}}  # fmt: skip
    selections = {"random": {"on_topic": 0.05}, "topic25": {"on_topic": 0.3}, "oracle": {"on_topic": 1.0}}
    dose = dose_response(figures, selections)  # topic50 has no selection.json: its nominal 50%
    assert [(p["arm"], p["on_topic"], p["measured"]) for p in dose["points"]] == [
        ("random", 0.05, True), ("topic25", 0.3, True), ("topic50", 0.5, False), ("oracle", 1.0, True)]  # fmt: skip
    assert dose["placements"]["finescope"]["recovery"]["on_topic"] == pytest.approx(0.4)
    assert dose["placements"]["bm25"]["recovery"]["where"] == "above 100%"
    assert dose["placements"]["dense"]["recovery"]["where"] == "below 0%"
    assert "accuracy" not in dose["curves"]  # no continuation task scored


def test_pilot_picks_the_ratio_whose_smallest_gap_is_largest():
    from experiments.replication.report import pilot_figures

    def pilot(random: float, oracle: float, seed: int) -> dict:
        return results_json({"base": 2.0, "pruned": 4.0, "random": random, "oracle": oracle}, seed=seed)

    evaluations = {
        0.2: {"a": pilot(3.0, 2.8, 0), "b": pilot(3.0, 2.2, 1)},  # gaps 0.1, 0.4: smallest 0.1
        0.3: {"a": pilot(3.4, 2.8, 2), "b": pilot(3.0, 2.6, 3)},
    }  # gaps 0.3, 0.2: smallest 0.2
    figures = pilot_figures(evaluations)
    gaps = {row["ratio"]: row["gaps"] for row in figures["rows"]}
    assert gaps[0.2] == pytest.approx({"a": 0.1, "b": 0.4}, abs=0.03)
    assert gaps[0.3] == pytest.approx({"a": 0.3, "b": 0.2}, abs=0.03)
    assert figures["choice"] == 0.3


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [float(value)] if isinstance(value, int | float) and not isinstance(value, bool) else []


def test_every_number_the_markdown_prints_is_in_the_json(tmp_path):
    """Each number of replication.md is a value of replication.json at the printed precision, or 100 times
    one (percentages); the header and the fixed prose are left out."""
    import re

    domains, selections = {}, []
    for index, domain in enumerate(("math", "law")):
        made = [with_continuation(results_json(KINDS_MEANS, documents=60, seed=2 * index + k)) for k in (0, 1)]
        domains[domain] = tuple(_save(tmp_path / domain / scope / "results.json", data)
                                for scope, data in zip(("d", "g"), made, strict=True))  # fmt: skip
        for kind, share in (("finescope", 0.6), ("random", 0.05), ("topic25", 0.27), ("topic50", 0.52)):
            for n in TWO:
                row = {"arm": f"{domain}/{kind}-t{n}", "domain": domain, "trial": n, "docs": 100,
                       "on_topic": round(share * 100) + n, "oracle_overlap": 0.1 * (n + 1)}  # fmt: skip
                selections.append(_save(tmp_path / "arms" / domain / f"{kind}-t{n}" / "selection.json", row))
    pilot = {0.2: {"math": _save(tmp_path / "p" / "results.json", results_json(
        {"base": 2.0, "pruned": 4.0, "random": 3.0, "oracle": 2.5}))}}  # fmt: skip
    layout = ReplicationLayout(domains=domains, trials=TWO, ratio_ablation=None, coords_ablation=None,
                               budget=[{"arm": "math/finescope-t0", "documents": 150, "tokens": 17000, "steps": 37}],
                               selections=[*selections, str(tmp_path / "missing" / "selection.json")],
                               pilot=pilot)  # fmt: skip
    report = write_report(str(tmp_path / "out"), layout, header=["# Replication"])
    saved = json.loads((tmp_path / "out" / "replication.json").read_text())
    chosen = saved["domains"]["math"]["selections"]["finescope"]  # counts of 100 documents: 60 and 61 on topic
    assert chosen["on_topic"] == pytest.approx(0.605) and chosen["oracle_overlap"] == pytest.approx(0.15)
    assert chosen["trials"] == 2
    assert saved["pilot"]["choice"] == 0.2 and "Chosen ratio: 0.20." in report["markdown"]
    assert "### math: continuation task, 20 questions from 20 of 25 documents" in report["markdown"]
    assert "- FineScope against BM25: " in report["markdown"] and "### law: dose-response" in report["markdown"]
    assert (tmp_path / "out" / "dose-law.png").read_bytes()[:4] == b"\x89PNG"
    values = _numbers(saved)
    body = report["markdown"].split("![recovery](recovery.png)", 1)[1]
    body = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", body)  # image links
    missing = []
    for token in re.findall(r"(?<![\w.\-+])[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]\d+)?", body):
        plain = token.replace(",", "").lstrip("+")
        target = float(plain)
        if "e" in plain:  # %.3g: three significant digits
            found = any(math.isclose(v, target, rel_tol=5e-3) for v in values)
        else:
            decimals = len(plain.split(".")[1]) if "." in plain else 0
            found = any(math.isclose(round(scale * v, decimals), target, abs_tol=10**-decimals / 2)
                        for v in values for scale in (1, 100, -1))  # fmt: skip
        if not found:
            missing.append(token)
    assert not missing, missing


# --- the replication in parts: the references and each trial evaluated apart, merged per held-out set -----------

REFERENCES = ("base", "pruned", "unpruned", "undistilled")
IN_ORDER = {label: KINDS_MEANS[label] for label in arm_labels(TWO)}
"""KINDS_MEANS in the order one evaluation of every model lists them (jobs.replicate's before it ran in parts)."""


def part_of(data: dict, labels: list[str]) -> dict:
    """The results.json an evaluation of only `labels` would have written on the same documents."""
    name, entry = next(iter(data["perplexity"].items()))
    part = {"perplexity": {name: {**entry, "results": {label: entry["results"][label] for label in labels}}}}
    if "continuation" in data:
        held, section = next(iter(data["continuation"].items()))
        part["continuation"] = {held: {**section, "results": {label: section["results"][label] for label in labels}}}
    return part


def save_parts(tmp_path, domain: str, scopes: dict[str, dict], trials: list[int]):
    """One domain's evaluations in parts, from one evaluation of every model per held-out set."""
    from experiments.replication.report import DomainParts

    def pair(part: str, labels: list[str]) -> tuple[str, str]:
        saved = [_save(tmp_path / domain / part / scope / "results.json", part_of(data, labels))
                 for scope, data in scopes.items()]  # fmt: skip
        return saved[0], saved[1]

    labels = list(next(iter(scopes["domain"]["perplexity"].values()))["results"])
    per_trial = {t: ["pruned", *(label for label in labels if label.endswith(f"-t{t}"))] for t in trials}
    return DomainParts(reference=pair("reference", [r for r in REFERENCES if r in labels]),
                       trials={t: pair(f"t{t}", per_trial[t]) for t in trials})  # fmt: skip


def test_parts_merge_into_the_figures_of_one_evaluation(tmp_path):
    scopes = {"domain": with_continuation(results_json(IN_ORDER, documents=60)),
              "general": results_json(IN_ORDER, documents=80, seed=1, name="general")}  # fmt: skip
    combined = {scope: _save(tmp_path / "one" / scope / "results.json", data) for scope, data in scopes.items()}
    whole = ReplicationLayout(domains={"math": (combined["domain"], combined["general"])}, trials=TWO,
                              ratio_ablation=None, coords_ablation=None, budget=[])  # fmt: skip
    parts = ReplicationLayout(domains={"math": save_parts(tmp_path / "parts", "math", scopes, TWO)}, trials=TWO,
                              ratio_ablation=None, coords_ablation=None, budget=[])  # fmt: skip
    one = write_report(str(tmp_path / "one-report"), whole)
    merged = write_report(str(tmp_path / "parts-report"), parts)
    for scope in ("domain", "general"):
        expected = json.loads((tmp_path / "one-report" / "replication.json").read_text())["domains"]["math"][scope]
        found = json.loads((tmp_path / "parts-report" / "replication.json").read_text())["domains"]["math"][scope]
        assert found == expected, scope
    assert merged["markdown"] == one["markdown"]  # the same tables, tests and order of arms
    saved = json.loads((tmp_path / "parts-report" / "replication.json").read_text())
    assert saved["pruned_agreement"] == {"math": {"domain": 0.0, "general": 0.0}}
    assert saved["domains"]["math"]["trials"] == TWO and len(saved["domains"]["math"]["sources"]["domain"]) == 3
    assert "differs between parts" not in merged["markdown"]
    # A domain whose only trial so far is trial 1: reported with the trials present.
    only = ReplicationLayout(domains={"math": save_parts(tmp_path / "one-trial", "math", scopes, [1])}, trials=TWO,
                             ratio_ablation=None, coords_ablation=None, budget=[])  # fmt: skip
    report = write_report(str(tmp_path / "one-trial-report"), only)
    figures = report["figures"]["domains"]["math"]
    assert figures["trials"] == [1] and list(figures["domain"]["versus_random"]) == ["t1", "pooled"]
    assert figures["domain"]["distillation"] is None  # undistilled trains on trial 0's documents, not present
    assert "trials 1; an arm without" in report["markdown"]


def test_parts_that_scored_other_documents_are_refused_naming_the_files(tmp_path):
    scopes = {"domain": with_continuation(results_json(IN_ORDER, documents=60)),
              "general": results_json(IN_ORDER, documents=80, seed=1, name="general")}  # fmt: skip
    parts = save_parts(tmp_path, "math", scopes, TWO)
    layout = ReplicationLayout(domains={"math": parts}, trials=TWO, ratio_ablation=None, coords_ablation=None,
                               budget=[])  # fmt: skip
    trial = json.loads(open(parts.trials[1][1]).read())
    rows = trial["perplexity"]["general"]["results"]
    rows["pruned"]["document_tokens"] = [n + 1 for n in rows["pruned"]["document_tokens"]]
    for row in rows.values():
        row["document_tokens"] = rows["pruned"]["document_tokens"]
    _save(tmp_path / "math" / "t1" / "general" / "results.json", trial)
    with pytest.raises(ValueError, match="did not score the same documents") as error:
        write_report(str(tmp_path / "out"), layout)
    assert parts.trials[1][1] in str(error.value) and parts.reference[1] in str(error.value)
    # The continuation task asked of other documents.
    _save(tmp_path / "math" / "t1" / "general" / "results.json", part_of(scopes["general"], ["pruned", "random-t1"]))
    trial = json.loads(open(parts.trials[0][0]).read())
    trial["continuation"]["held"]["doc_ids"] = list(reversed(trial["continuation"]["held"]["doc_ids"]))
    _save(tmp_path / "math" / "t0" / "domain" / "results.json", trial)
    with pytest.raises(ValueError, match=f"{parts.trials[0][0]} and {parts.reference[0]} did not ask the same"):
        write_report(str(tmp_path / "out"), layout)


def test_a_pruned_model_that_differs_between_parts_is_flagged(tmp_path):
    scopes = {"domain": results_json(IN_ORDER, documents=60),
              "general": results_json(IN_ORDER, documents=80, seed=1, name="general")}  # fmt: skip
    parts = save_parts(tmp_path, "math", scopes, TWO)
    trial = json.loads(open(parts.trials[1][0]).read())
    pruned = trial["perplexity"]["heldout"]["results"]["pruned"]
    tokens, original = pruned["document_tokens"], list(pruned["document_nll"])
    pruned["document_nll"] = [nll + (0.01 * tokens[i] if i == 7 else 0.0) for i, nll in enumerate(original)]
    _save(tmp_path / "math" / "t1" / "domain" / "results.json", trial)
    layout = ReplicationLayout(domains={"math": parts}, trials=TWO, ratio_ablation=None, coords_ablation=None,
                               budget=[])  # fmt: skip
    report = write_report(str(tmp_path / "out"), layout)
    saved = json.loads((tmp_path / "out" / "replication.json").read_text())
    assert saved["pruned_agreement"]["math"]["domain"] == pytest.approx(0.01, abs=1e-6)
    assert saved["pruned_agreement"]["math"]["general"] == 0.0
    assert saved["domains"]["math"]["pruned_agreement"]["domain"] == pytest.approx(0.01, abs=1e-6)
    warning = "**Warning: the pruned model differs between parts: math domain set 0.01 "
    assert warning in report["markdown"] and report["markdown"].index(warning) < report["markdown"].index("## math")
    # Within the tolerance: one part's rounding, not another pruning.
    pruned["document_nll"] = [nll + (5e-5 * tokens[i] if i == 7 else 0.0) for i, nll in enumerate(original)]
    _save(tmp_path / "math" / "t1" / "domain" / "results.json", trial)
    assert "differs between parts" not in write_report(str(tmp_path / "out"), layout)["markdown"]
