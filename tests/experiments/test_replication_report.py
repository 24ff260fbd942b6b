"""The replication report on synthetic results.json files whose per-document NLLs the test sets."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from experiments.replication.report import ReplicationLayout, ablation_figures, domain_figures, write_report

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
    assert names == ["ablation-ratio.png", "recovery.png", "replication.json", "replication.md"]
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
