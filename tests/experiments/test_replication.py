"""The replication job on a tiny Llama and a small slice of the packaged labelled corpus: held-out sets that
no arm can train on, one pruned model for every arm, arms of equal budget and steps, one teacher pass per
group, the evaluations, the report, the skip on rerun; the arms' documents and selection.json on a toy
labelled pool; and the shipped spec's graph, and bad specs, without running anything."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO

from core.errors import ConfigError
from curation import demo_corpus
from experiments.replication import arm_labels, build_replication, load_replication_spec, run_replication
from experiments.replication.data import ArmConfig, HoldoutConfig, RankConfig, rank_pool, run_arm, split_labelled
from experiments.replication.run import (
    _calibration_note,
    check_ship,
    layout_record,
    ship_identity,
    ship_parts,
    write_replication_report,
)
from experiments.replication.spec import arm_kinds
from pipeline.runner import _needed

pytestmark = pytest.mark.timeout(1200)

TOPIC = "Mathematics"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# The run uses the alternatives this environment can rank with: BM25 and MiniLM need the bench extra.
ALTERNATIVES = [m for m, module in (("bm25", "bm25s"), ("minilm", "sentence_transformers"), ("dense", "torch"))
                if _installed(module)]  # fmt: skip


def tiny_spec(root: Path, model: str, **changes) -> Path:
    spec = {
        "root": str(root / "run"), "model": model, "seeds": str(REPO / "jobs" / "seeds" / "wikipedia-topics.jsonl"),
        "domains": {"mathematics": TOPIC}, "pool": 80, "pool_topic_docs": 20, "heldout": 5, "general_heldout": 12,
        "budget": 8, "epochs": 1, "trials": [0], "ratio": 0.3, "teacher": model, "ablation_ratios": [0.5],
        "ablation_coords": [], "alternatives": ALTERNATIVES, "dose": [0.5], "pilot_ratios": [0.3],
        "ship": str(root / "ship"),
        "sae": {"layer": 2, "expansion_factor": 4, "k": 8, "max_train_tokens": 1500, "epochs": 2, "max_tokens": 48,
                "batch_tokens": 256, "cpus": 0.5, "calibration_docs": 8},
        "curate": {"max_tokens": 48, "cpus": 0.5, "batch_size": 32},
        "prune": {"max_docs": 8, "max_tokens": 32, "channel_multiple": 8},
        "distill": {"recipe": "continuation", "max_new_tokens": 6, "max_document_tokens": 24,
                    "min_document_tokens": 4, "batch_size": 8, "cpus": 0.5, "threads": 1},
        "finetune": {"actors": 1, "micro_batch": 2, "max_tokens": 32, "warmup_steps": 1, "log_every": 2,
                     "checkpoint_every": 100, "cpus": 0.5, "threads": 1},
        "evaluate": {"window": 32, "stride": 16, "threads": 1},
        **changes,
    }  # fmt: skip
    path = root / "replication.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def replication(ray_local, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("replication")
    spec = load_replication_spec(str(tiny_spec(root, tiny_model_dir)))
    result = run_replication(spec)
    return {"root": Path(spec.root), "spec": spec, "result": result}


def _ids(path: Path) -> list[str]:
    return pq.read_table(path).column("id").to_pylist()


def _jsonl_texts(directory: Path) -> list[dict]:
    import gzip

    return [json.loads(line) for file in sorted(directory.glob("*.jsonl.gz")) for line in gzip.open(file, "rt")]


def test_heldout_sets_are_labelled_and_no_arm_can_train_on_them(replication):
    run = replication["root"]
    domain = _jsonl_texts(run / "data" / "heldout" / "mathematics")
    general = _jsonl_texts(run / "data" / "heldout" / "general")
    assert len(domain) == 5 and {row["meta"]["topic"] for row in domain} == {TOPIC}
    assert len(general) == 12 and TOPIC in {row["meta"]["topic"] for row in general}  # one of each topic
    pool = pq.read_table(run / "data" / "pool.parquet")
    assert pool.num_rows == 80 and sum(t == TOPIC for t in pool.column("topic").to_pylist()) == 20
    held_texts = {row["text"] for row in domain + general}
    assert not held_texts & set(pool.column("text").to_pylist())
    for arm in (run / "arms").rglob("rows"):
        assert not held_texts & set(pq.read_table(arm).column("text").to_pylist()), arm


KINDS = ["finescope", *ALTERNATIVES, "random", "oracle", "topic50"]  # one dose: each costs a fine-tune


def test_arms_have_the_same_budget_and_steps_from_one_pruned_model(replication):
    run = replication["root"]
    arms = {p.parent.relative_to(run / "arms").as_posix(): pq.read_table(p) for p in (run / "arms").rglob("rows")}
    assert set(arms) == {"calibration", *(f"mathematics/{kind}-t0" for kind in KINDS)}
    assert {table.num_rows for table in arms.values()} == {8}
    assert set(arms["mathematics/oracle-t0"].column("topic").to_pylist()) == {TOPIC}
    # The pruning read a random pool draw, not the random arm's.
    assert set(arms["calibration"].column("id").to_pylist()) != set(
        arms["mathematics/random-t0"].column("id").to_pylist()
    )
    for kind in KINDS:
        chosen = json.loads((run / "arms" / "mathematics" / f"{kind}-t0" / "selection.json").read_text())
        assert chosen["arm"] == f"{kind}-t0" and chosen["domain"] == "mathematics" and chosen["docs"] == 8
    # FineScope's arm is the curator's best 8 for the domain, in the pool.
    curated = pq.read_table(run / "curate" / "t0" / "curated").to_pylist()
    best = sorted((r for r in curated if r["domain"] == "mathematics"), key=lambda r: (-r["score"], r["id"]))[:8]
    assert set(arms["mathematics/finescope-t0"].column("id").to_pylist()) == {r["id"] for r in best}
    # Every fine-tune ran the same number of optimizer steps, every pruned one from the one pruned model.
    finetunes = {p.parent.relative_to(run / "finetuned").as_posix(): json.loads(p.read_text())
                 for p in (run / "finetuned").rglob("manifest.json")}  # fmt: skip
    assert set(finetunes) == {"random-t0", *(f"mathematics/{k}-t0" for k in KINDS if k != "random"),
                              "mathematics/unpruned", "mathematics/undistilled", "mathematics/ratio-0.50"}  # fmt: skip
    assert {m["counts"]["steps"] for m in finetunes.values()} == {4}  # 8 documents / micro-batch 2, one worker
    pruned = str(run / "pruned" / "0.30")
    for name, found in finetunes.items():
        expected = {"mathematics/unpruned": replication["spec"].model,
                    "mathematics/ratio-0.50": str(run / "pruned" / "0.50")}.get(name, pruned)  # fmt: skip
        assert found["model"] == expected, name
    assert sorted(p.name for p in (run / "pruned").iterdir()) == ["0.30", "0.50"]


def test_the_teacher_rewrites_each_document_once_per_group(replication):
    run = replication["root"]
    arms = [f"{kind}-t0" for kind in KINDS if kind not in ("random", "oracle")]
    arm_ids = set().union(*(_ids(run / "arms" / "mathematics" / arm / "rows") for arm in arms))
    random_ids = set(_ids(run / "arms" / "mathematics" / "random-t0" / "rows"))
    oracle_ids = set(_ids(run / "arms" / "mathematics" / "oracle-t0" / "rows"))
    # The trial's domain group rewrites its arms' documents but those of the random draw, which the trial's
    # random group does, and those of the first trial's oracle, which the pilot's group does.
    assert sorted(_ids(run / "union" / "mathematics" / "t0" / "rows")) == sorted(arm_ids - random_ids - oracle_ids)
    assert sorted(_ids(run / "union" / "random" / "t0" / "rows")) == sorted(random_ids)
    assert sorted(_ids(run / "union" / "pilot" / "mathematics" / "rows")) == sorted(oracle_ids - random_ids)
    groups = [("mathematics", "t0"), ("random", "t0"), ("pilot", "mathematics")]
    distilled = [
        row for group in groups for row in pq.read_table(run / "distill" / Path(*group) / "distilled").to_pylist()
    ]
    ids = [row["id"] for row in distilled]
    assert len(ids) == len(set(ids))  # no document rewritten twice
    passes = sorted(p.parent.relative_to(run / "distill").as_posix() for p in (run / "distill").rglob("manifest.json"))
    assert passes == ["mathematics/t0", "pilot/mathematics", "random/t0"]
    dose = set(_ids(run / "train" / "mathematics" / "topic50-t0" / "rows"))
    assert dose & random_ids and dose - random_ids  # a dose trains on rewrites from two groups
    oracle = {row["id"]: row for row in pq.read_table(run / "train" / "mathematics" / "oracle-t0" / "rows").to_pylist()}
    assert set(oracle) == oracle_ids and all(row["response"] == distilled_row(distilled, key)["response"]
                                             for key, row in oracle.items())  # fmt: skip
    teacher = {
        row["id"]: row for row in pq.read_table(run / "train" / "mathematics" / "finescope-t0" / "rows").to_pylist()
    }
    raw = {row["id"]: row for row in pq.read_table(run / "train" / "mathematics" / "undistilled" / "rows").to_pylist()}
    assert set(teacher) == set(raw) and teacher
    for key, row in raw.items():
        assert row["response"] == row["original"] and row["prompt"] == teacher[key]["prompt"]
        assert teacher[key]["response"] == distilled_row(distilled, key)["response"]


def distilled_row(rows: list[dict], key: str) -> dict:
    return next(row for row in rows if row["id"] == key)


def test_evaluations_report_every_arm_on_both_heldout_sets(replication):
    run = replication["root"]
    labels = arm_labels([0], dose=[0.5], alternatives=ALTERNATIVES)
    per_trial = ["pruned", *(label for label in labels if "-t" in label)]
    for part, expected in (("t0", per_trial), ("reference", ["base", "pruned", "unpruned", "undistilled"])):
        for name, documents in (("domain", 5), ("general", 12)):
            results = json.loads((run / "eval" / "mathematics" / part / name / "results.json").read_text())
            assert [m["label"] for m in results["models"]] == expected, (part, name)
            (entry,) = results["perplexity"].values()
            assert entry["documents"] == documents
            assert all(len(r["document_nll"]) == documents for r in entry["results"].values())
            assert bool(results.get("continuation")) == (name == "domain")  # the task on the domain's set
    ratio = json.loads((run / "eval" / "ablation-ratio" / "results.json").read_text())
    assert [m["label"] for m in ratio["models"]] == ["base", "pruned-0.30", "finescope-0.30", "pruned-0.50",
                                                     "finescope-0.50"]  # fmt: skip


def test_report_has_the_tables_tests_and_plots(replication):
    run = replication["root"]
    report = (run / "replication.md").read_text()
    assert report == replication["result"]["report"]
    assert "## mathematics" in report and "random" in report and "oracle" in report
    assert "significant" in report  # each comparison says whether it is
    assert "## Steps" in report and "| finetune/mathematics/oracle-t0 |" in report
    figures = json.loads((run / "replication.json").read_text())
    assert "mathematics" in json.dumps(figures)
    assert json.loads((run / "layout.json").read_text())["kinds"] == KINDS
    for name in ("recovery.png", "ablation-ratio.png"):
        assert (run / name).stat().st_size > 1000, name


def test_rerun_skips_every_step(replication):
    result = run_replication(replication["spec"])
    assert {r["status"] for r in result["steps"].values()} == {"skipped"}
    assert result["report"].split("## Steps")[0] == replication["result"]["report"].split("## Steps")[0]


def _without_sources(value):
    """A figures tree less where each evaluation was read from."""
    if isinstance(value, dict):
        return {key: _without_sources(item) for key, item in value.items() if key not in ("sources", "source")}
    if isinstance(value, list):
        return [_without_sources(item) for item in value]
    return value


def test_each_part_ships_what_the_report_reads_and_a_fresh_root_reports_it(replication, tmp_path):
    run, spec = replication["root"], replication["spec"]
    ship = Path(spec.ship)
    shipped = sorted(p.relative_to(ship).as_posix() for p in ship.rglob("*") if p.is_file())
    evaluations = [f"eval/{part}/{scope}/results.json" for part in ("mathematics/t0", "mathematics/reference")
                   for scope in ("domain", "general")]  # fmt: skip
    evaluations += ["eval/ablation-ratio/results.json", "eval/pilot/r0.30/mathematics/results.json"]
    selections = [f"arms/mathematics/{kind}-t0/selection.json" for kind in KINDS]
    finetunes = [f"finetuned/{p.parent.relative_to(run / 'finetuned').as_posix()}/manifest.json"
                 for p in (run / "finetuned").rglob("manifest.json")]  # fmt: skip
    assert len(finetunes) == len(KINDS) + 3  # every arm, unpruned, undistilled, the ratio ablation's
    # No model, no other file; spec.json binds the ship directory to the spec the parts were made by.
    assert shipped == sorted([*evaluations, *selections, *finetunes, "spec.json"])
    assert json.loads((ship / "spec.json").read_text()) == ship_identity(spec)
    for name in [*evaluations, *selections, *finetunes]:
        assert (ship / name).read_bytes() == (run / name).read_bytes(), name
    steps, layout = build_replication(spec)
    assert ship_parts(spec, steps) == []  # each file already there, byte for byte
    # A fresh machine: a new, empty root, the same ship; the report reads every part from the ship.
    fresh = load_replication_spec(str(tiny_spec(tmp_path, spec.model, ship=spec.ship)))
    steps, layout = build_replication(fresh)
    report = write_replication_report(fresh, steps, layout, {})
    before = json.loads((run / "replication.json").read_text())
    after = json.loads((Path(fresh.root) / "replication.json").read_text())
    assert after["domains"]["mathematics"]["sources"]["domain"] == [
        str(ship / evaluations[2]),
        str(ship / evaluations[0]),
    ]
    assert _without_sources(after) == _without_sources(before) and after["budget"] and "pilot" in after

    def body(text: str) -> str:  # the header's run time counts the steps run under each root
        return text.split("## Steps")[0].split("Recovered share R", 1)[1]

    assert body(report["report"]) == body((run / "replication.md").read_text())
    written = {"layout.json", "replication.json", "replication.md", "recovery.png", "ablation-ratio.png"}
    assert {p.name for p in Path(fresh.root).iterdir()} == written | {"dose-mathematics.png"}  # nothing evaluated
    # Another trial is another part of the same spec; another budget is another spec, refused by the ship.
    (tmp_path / "more").mkdir()
    check_ship(load_replication_spec(str(tiny_spec(tmp_path / "more", spec.model, ship=spec.ship, trials=[0, 1]))))
    (tmp_path / "other").mkdir()
    other = load_replication_spec(str(tiny_spec(tmp_path / "other", spec.model, ship=spec.ship, budget=6)))
    with pytest.raises(ConfigError) as caught:
        write_replication_report(other, *build_replication(other), {})
    assert caught.value.field == "ship" and "differs in budget" in str(caught.value)


# The graph and the spec, without running anything -------------------------------------------------


def _finetunes(names: set[str]) -> set[str]:
    return {name.removeprefix("finetune/") for name in names if name.startswith("finetune/")}


def test_one_trial_of_one_domain_needs_only_that_trial():
    spec = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    steps, _ = build_replication(spec)
    needed = _needed(steps, ["evaluate/mathematics/t1"])
    kinds = ["finescope", "bm25", "minilm", "dense", "oracle", "topic25", "topic50"]
    assert _finetunes(needed) == {"random-t1", *(f"mathematics/{kind}-t1" for kind in kinds)}
    assert {"sae/t1", "curate/t1", "rank/bm25", "rank/minilm", "rank/dense", "prune/0.30",
            "evaluate/mathematics/t1/domain", "evaluate/mathematics/t1/general"} <= needed  # fmt: skip
    assert {name for name in needed if name.split("/")[0] in ("union", "distill")} == {
        "union/random/t1", "distill/random/t1", "union/mathematics/t1", "distill/mathematics/t1"}  # fmt: skip
    assert {name for name in needed if name.startswith("arm/")} == {
        "arm/calibration",
        "arm/mathematics/random-t1",
        *(f"arm/mathematics/{kind}-t1" for kind in kinds),
    }
    for other in (0, 2, 3, 4):
        assert not [name for name in needed if re.search(rf"(?:^|[/-])t{other}(?:$|/)", name)], other
    assert not [name for name in needed if "biology" in name or "history" in name or "pilot" in name]
    # The first trial also runs the references: the unpruned and undistilled fine-tunes on its documents.
    first = _needed(steps, ["evaluate/mathematics/t0", "evaluate/mathematics/reference"])
    assert _finetunes(first) == {"random-t0", "mathematics/unpruned", "mathematics/undistilled",
                                 *(f"mathematics/{kind}-t0" for kind in kinds)}  # fmt: skip


def test_the_pilot_needs_no_curation_and_no_teacher_pass_over_other_arms():
    spec = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    steps, _ = build_replication(spec)
    needed = _needed(steps, ["evaluate/pilot"])
    pilot = {"random-t0", *(f"{d}/oracle-t0" for d in spec.domains)}
    pilot |= {
        f"pilot/r{r}/{arm}" for r in ("0.20", "0.40") for arm in ("random", *(f"{d}/oracle" for d in spec.domains))
    }
    assert _finetunes(needed) == pilot
    assert {name for name in needed if name.startswith("distill/")} == {
        "distill/random/t0", *(f"distill/pilot/{d}" for d in spec.domains)}  # fmt: skip
    union = {s.name: s.config for s in steps if s.name.startswith("union/pilot/")}
    assert {Path(arm).name for config in union.values() for arm in config.arms} == {"oracle-t0"}
    assert not [name for name in needed if name.split("/")[0] in ("sae", "curate", "rank")]
    assert len([name for name in needed if name.startswith("evaluate/")]) == 9


def test_shipped_spec_graph_has_equal_arms_from_one_pruned_model():
    spec = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    steps, layout = build_replication(spec)
    by_name = {s.name: s for s in steps}
    assert spec.trials == [0, 1, 2, 3, 4]
    finetunes = [s for s in steps if s.stage == "finetune"]
    kinds = ["finescope", "bm25", "minilm", "dense", "oracle", "topic25", "topic50"]
    pilot = 2 * (1 + 3)  # ratios 0.2 and 0.4: a random arm and each domain's oracle; 0.3 reuses the main arms
    assert len(finetunes) == 5 + 3 * (len(kinds) * 5 + 2) + pilot  # random is one model for every domain
    assert {s.config.max_steps for s in finetunes} == {25} and len({s.config.lr for s in finetunes}) == 1
    # One pruning at `ratio`, on the calibration draw, for every domain and arm.
    prunes = [s for s in steps if s.stage == "prune"]
    assert [s.name for s in prunes] == ["prune/0.30", "prune/0.20", "prune/0.40"]
    calibration = by_name["arm/calibration"].config
    assert (calibration.kind, calibration.budget, calibration.trial) == ("calibration", 100, spec.split_seed)
    assert {s.config.data for s in prunes} == {str(Path(calibration.out) / "rows")}
    pruned = by_name["prune/0.30"].config.out
    for domain in spec.domains:
        for kind in kinds:
            for t in spec.trials:
                step = by_name[f"finetune/{domain}/{kind}-t{t}"]
                assert step.config.model == pruned and step.config.seed == t
        for t in spec.trials:  # per trial: the pruned model and the trial's arms
            evaluate = by_name[f"evaluate/{domain}/t{t}/domain"].config
            assert [m.split("=")[0] for m in evaluate.models] == ["pruned", *(f"{k}-t{t}" for k in arm_kinds())]
            assert evaluate.continuation and not by_name[f"evaluate/{domain}/t{t}/general"].config.continuation
        assert (
            f"random-t3={by_name['finetune/random-t3'].out}/model"
            in by_name[f"evaluate/{domain}/t3/domain"].config.models
        )
        reference = by_name[f"evaluate/{domain}/reference/general"].config
        assert [m.split("=")[0] for m in reference.models] == ["base", "pruned", "unpruned", "undistilled"]
    # Trials re-seed the SAE and draw the oracle afresh; the alternative curators rank once for every domain.
    assert [by_name[f"sae/t{t}"].config.seed for t in spec.trials] == spec.trials
    assert [by_name[f"arm/biology/oracle-t{t}"].config.trial for t in spec.trials] == spec.trials
    assert [s.name for s in steps if s.stage == "rank"] == ["rank/bm25", "rank/minilm", "rank/dense"]
    assert by_name["rank/dense"].config.layer == 15
    # The teacher rewrites each group's documents once: per trial the random draw and each domain's other
    # arms; the pilot's first-trial oracles apart.
    distills = [s.name for s in steps if s.stage == "distill"]
    assert distills == [*(f"distill/random/t{t}" for t in spec.trials),
                        *(f"distill/pilot/{d}" for d in spec.domains),
                        *(f"distill/{d}/t{t}" for d in spec.domains for t in spec.trials)]  # fmt: skip
    assert set(layout["domains"]) == {"mathematics", "biology", "history"}
    assert set(layout["domains"]["history"]["trials"]) == set(spec.trials)
    assert set(layout["pilot"]) == {0.2, 0.3, 0.4} and set(layout["pilot"][0.2]) == set(spec.domains)


def test_pilot_and_ablations_use_the_calibration_pruning(tmp_path):
    changes = {"pilot_ratios": [0.3, 0.5], "ablation_ratios": [0.5], "ablation_coords": [16], "dose": [0.25, 0.5]}
    spec = load_replication_spec(str(tiny_spec(tmp_path, "smollm2-135m", **changes)))
    steps, layout = build_replication(spec)
    by_name = {s.name: s for s in steps}
    assert [s.name for s in steps if s.stage == "prune"] == ["prune/0.30", "prune/0.50"]  # shared by pilot and ablation
    pilot = by_name["evaluate/pilot/r0.50/mathematics"].config
    assert [m.split("=")[0] for m in pilot.models] == ["base", "pruned", "random", "oracle"]
    assert by_name["finetune/pilot/r0.50/mathematics/oracle"].config.model == by_name["prune/0.50"].out
    assert by_name["finetune/pilot/r0.50/random"].config.data == by_name["train/random-t0"].out + "/rows"
    at_ratio = by_name["evaluate/pilot/r0.30/mathematics"].config.models
    assert f"oracle={by_name['finetune/mathematics/oracle-t0'].out}/model" in at_ratio  # the main arm serves
    assert layout["pilot"][0.5]["mathematics"].endswith("eval/pilot/r0.50/mathematics/results.json")
    # What the report reads beside the evaluations (ROOT/layout.json).
    record = layout_record(spec, layout)
    assert record["labels"] == arm_labels([0], alternatives=ALTERNATIVES) and record["dose"] == {
        "topic25": 0.25,
        "topic50": 0.5,
    }
    assert (
        record["selections"]["mathematics"]["topic25-t0"] == f"{spec.root}/arms/mathematics/topic25-t0/selection.json"
    )
    assert set(record["pilot"]) == {"0.30", "0.50"}
    coords = by_name["finetune/mathematics/coords-k16"].config
    assert coords.model == by_name["prune/0.30"].out
    assert by_name["finetune/mathematics/ratio-0.50"].config.model == by_name["prune/0.50"].out


def test_the_report_says_what_the_pruning_read_of_the_calibration_draw(tmp_path, caplog):
    shipped = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    with caplog.at_level("WARNING", logger="experiments.replication.graph"):
        steps, _ = build_replication(shipped)
    warned = [r.getMessage() for r in caplog.records if r.name == "experiments.replication.graph"]
    assert len(warned) == 1 and "reads the first 64 of the 100 calibration documents" in warned[0]
    assert _calibration_note(shipped, steps) == "calibrated on the first 64 of 100 random pool documents"
    caplog.clear()
    (tmp_path / "all").mkdir()
    with caplog.at_level("WARNING", logger="experiments.replication.graph"):
        spec = load_replication_spec(str(tiny_spec(tmp_path / "all", "smollm2-135m")))  # 8 drawn, 8 read
        assert _calibration_note(spec, build_replication(spec)[0]) == "calibrated on 8 random pool documents"
    assert not caplog.records
    (tmp_path / "magnitude").mkdir()
    spec = load_replication_spec(str(tiny_spec(tmp_path / "magnitude", "smollm2-135m", prune={"method": "magnitude"})))
    assert _calibration_note(spec, build_replication(spec)[0]) == "magnitude pruning, no calibration documents"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"domains": {"mathematics": "Mathematics"}, "curate": {"top_n": 5}}, "curate.top_n"),
        ({"domains": {"mathematics": "Mathematics"}, "finetune": {"max_steps": 5}}, "finetune.max_steps"),
        ({"domains": {"mathematics": ""}}, "domains"),
        ({"domains": {"mathematics": "Mathematics"}, "ablation_ratios": [0.3]}, "ablation_ratios"),
        ({"domains": {"mathematics": "Mathematics"}, "trials": [0, 0]}, "trials"),
        ({"domains": {"mathematics": "Mathematics"}, "ablation_domain": "physics"}, "ablation_domain"),
        ({"domains": {"mathematics": "Mathematics"}, "dose": [0.25, 1.0]}, "dose"),
        ({"domains": {"mathematics": "Mathematics"}, "pilot_ratios": [0.5, 0.5]}, "pilot_ratios"),
        ({"domains": {"mathematics": "Mathematics"}, "alternatives": ["tfidf"]}, "alternatives"),
        ({"domains": {"mathematics": "Mathematics"}, "calibration": 1}, "calibration"),
    ],
)
def test_bad_specs_name_the_field(tmp_path, changes, field):
    with pytest.raises(ConfigError) as error:
        spec = load_replication_spec(str(tiny_spec(tmp_path, "smollm2-135m", **changes)))
        build_replication(spec)
    assert error.value.field == field


def test_a_domain_without_seeds_or_documents_is_refused(tmp_path):
    spec = load_replication_spec(str(tiny_spec(tmp_path, "smollm2-135m", domains={"cooking": "Everyday life"})))
    with pytest.raises(ConfigError, match="have no seeds"):
        spec.check_seeds()
    config = HoldoutConfig(out=str(tmp_path), topics={"mathematics": "Maths"}, pool=10, heldout=5, general=12)
    with pytest.raises(ConfigError, match="labels 0 documents"):
        split_labelled(config)
    config = HoldoutConfig(out=str(tmp_path), topics={"mathematics": TOPIC}, pool=10, heldout=5, general=11)
    with pytest.raises(ConfigError, match="at least the corpus's 12 topics") as error:
        split_labelled(config)
    assert error.value.field == "general_heldout"


def test_holdout_is_disjoint_and_the_pool_caps_each_topic():
    config = HoldoutConfig(out="-", topics={"mathematics": TOPIC, "history": "History"}, pool=500,
                           pool_topic_docs=40, heldout=30, general=50)  # fmt: skip
    sets, pool = split_labelled(config)
    assert [len(sets[name]) for name in ("mathematics", "history", "general")] == [30, 30, 50]
    ids = [row["id"] for rows in sets.values() for row in rows]
    assert len(ids) == len(set(ids)) and not set(ids) & {row["id"] for row in pool}
    topics = [row["meta"]["topic"] for row in pool]
    assert len(pool) == 500 and topics.count(TOPIC) == 40 and topics.count("History") == 40
    again, _ = split_labelled(config)
    assert [row["id"] for row in again["general"]] == [row["id"] for row in sets["general"]]


def test_general_heldout_holds_every_topic_in_proportion_the_domains_included():
    config = HoldoutConfig(out="-", topics={"mathematics": TOPIC, "history": "History"}, pool=500,
                           pool_topic_docs=40, heldout=30, general=120)  # fmt: skip
    sets, pool = split_labelled(config)
    corpus = Counter(row["meta"]["topic"] for row in demo_corpus.load_summaries())
    general = Counter(row["meta"]["topic"] for row in sets["general"])
    assert set(general) == set(corpus) and sum(general.values()) == 120
    assert general[TOPIC] >= 1 and general["History"] >= 1
    total = sum(corpus.values())
    for topic, count in general.items():  # one each, the other 108 in proportion (rounded)
        assert abs(count - (1 + 108 * corpus[topic] / total)) < 1, topic
    general_ids = {row["id"] for row in sets["general"]}
    assert not general_ids & {row["id"] for name in ("mathematics", "history") for row in sets[name]}
    assert not general_ids & {row["id"] for row in pool}


# The arms on a toy labelled pool, no Ray ---------------------------------------------------------------

TOY_TOPIC = "Numbers"
MATH_WORDS = "prime numbers integers proof theorem".split()
OTHER_WORDS = [
    "cat sat on the mat dog ran in the park",
    "heart pumps blood and cells divide in the body",
    "engines and computers and networks of machines",
    "kings and empires and wars of the middle ages",
]


def toy_holdout(tmp_path: Path, topic_docs: int = 8, other_docs: int = 24) -> Path:
    """A holdout output with only a pool: `topic_docs` documents of TOY_TOPIC made of number words, the rest
    from other topics' words; and a seeds file of two number seeds."""
    import random as stdlib_random

    import pyarrow as pa

    rng = stdlib_random.Random(0)
    rows = []
    for i in range(topic_docs):
        rows.append({"id": f"m{i:02d}", "text": " ".join(rng.sample(MATH_WORDS * 3, 8)), "topic": TOY_TOPIC})
    for i in range(other_docs):
        words = OTHER_WORDS[i % len(OTHER_WORDS)].split()
        rows.append({"id": f"o{i:02d}", "text": " ".join(rng.sample(words, len(words))), "topic": f"T{i % 4}"})
    holdout = tmp_path / "data"
    holdout.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), holdout / "pool.parquet")
    seeds = [{"text": "proof theorem prime numbers", "domain": "numbers"},
             {"text": "integers and prime numbers", "domain": "numbers"}]  # fmt: skip
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(row) + "\n" for row in seeds))
    return holdout


def toy_arm(tmp_path: Path, holdout: Path, kind: str, **fields) -> tuple[list[dict], dict]:
    out = tmp_path / "arms" / kind
    config = ArmConfig(out=str(out), kind=kind, holdout=str(holdout), domain="numbers", topic=TOY_TOPIC,
                       label=f"{kind}-t0", budget=8, trial=0, **fields)  # fmt: skip
    run_arm(config)
    return pq.read_table(out / "rows").to_pylist(), json.loads((out / "selection.json").read_text())


def test_each_arms_selection_json_on_a_toy_pool(tmp_path):
    holdout = toy_holdout(tmp_path)  # 8 topic documents: every oracle draw of 8 is all of them
    rows, oracle = toy_arm(tmp_path, holdout, "oracle")
    assert {r["topic"] for r in rows} == {TOY_TOPIC}
    assert oracle == {"arm": "oracle-t0", "domain": "numbers", "trial": 0, "docs": 8, "on_topic": 1.0,
                      "oracle_overlap": 1.0}  # fmt: skip
    rows, random = toy_arm(tmp_path, holdout, "random")
    on_topic = sum(r["topic"] == TOY_TOPIC for r in rows)
    assert random["on_topic"] == random["oracle_overlap"] == on_topic / 8
    for dose, topical in ((0.25, 2), (0.5, 4)):
        rows, chosen = toy_arm(tmp_path / f"d{dose}", holdout, "dose", dose=dose)
        assert len(rows) == 8 and sum(r["topic"] == TOY_TOPIC for r in rows) == topical == round(dose * 8)
        assert chosen["on_topic"] == chosen["oracle_overlap"] == topical / 8
    # A curator's arm: its 8 best-scored documents, 6 of them on the topic.
    import pyarrow as pa

    ids = [f"m{i:02d}" for i in range(6)] + ["o00", "o01"] + [f"m{i:02d}" for i in range(6, 8)]
    curated = pa.table({"id": ids, "domain": ["numbers"] * 10, "score": [1.0 - i / 20 for i in range(10)]})
    (tmp_path / "curate" / "curated").mkdir(parents=True)
    pq.write_table(curated, tmp_path / "curate" / "curated" / "part-0.parquet")
    rows, finescope = toy_arm(tmp_path, holdout, "finescope", curated=str(tmp_path / "curate"))
    assert {r["id"] for r in rows} == set(ids[:8])
    assert finescope["on_topic"] == finescope["oracle_overlap"] == 0.75


def test_a_dose_holds_exactly_its_share_when_the_random_draw_is_mostly_on_topic(tmp_path):
    holdout = toy_holdout(tmp_path, topic_docs=30, other_docs=10)
    rows, chosen = toy_arm(tmp_path, holdout, "dose", dose=0.25)
    assert len(rows) == 8 and sum(r["topic"] == TOY_TOPIC for r in rows) == 2 and chosen["on_topic"] == 0.25


def test_the_calibration_draw_is_not_the_random_arms(tmp_path):
    holdout = toy_holdout(tmp_path, topic_docs=20, other_docs=60)
    random, _ = toy_arm(tmp_path, holdout, "random")
    out = tmp_path / "calibration"
    run_arm(ArmConfig(out=str(out), kind="calibration", holdout=str(holdout), budget=8, trial=0))
    calibration = pq.read_table(out / "rows").column("id").to_pylist()
    assert len(calibration) == 8 and set(calibration) != {r["id"] for r in random}
    assert not (out / "selection.json").exists()


@pytest.mark.parametrize("method", ["bm25", "minilm", "dense"])
def test_alternative_curators_pick_the_topic_documents(tmp_path, tiny_model_dir, method):
    if method == "bm25":
        pytest.importorskip("bm25s", reason="the bench extra")
    if method == "minilm":
        pytest.importorskip("sentence_transformers", reason="the bench extra")
    holdout = toy_holdout(tmp_path)
    ranking = tmp_path / "rank" / method
    counts = rank_pool(RankConfig(out=str(ranking), method=method, holdout=str(holdout),
                                  seeds=str(tmp_path / "seeds.jsonl"), domains=["numbers"], model=tiny_model_dir,
                                  layer=0, max_tokens=32, threads=1))  # fmt: skip
    assert counts == {"documents": 32, "seeds": 2}
    rows, chosen = toy_arm(tmp_path, holdout, method, ranking=str(ranking))
    assert sum(r["topic"] == TOY_TOPIC for r in rows) == 8 and chosen["on_topic"] == 1.0


def test_a_missing_bench_library_names_the_install_command(monkeypatch):
    import importlib.util

    from curation import baselines

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bm25s" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[bench\]'") as error:
        baselines.require("bm25")
    assert error.value.field == "bm25"


def test_the_shipped_spec_asks_at_least_300_continuation_questions_of_every_domain():
    from training.evaluation.evaluate import continuation_questions

    spec = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    steps, _ = build_replication(spec)
    by_name = {s.name: s for s in steps}
    held, _ = split_labelled(by_name["holdout"].config)
    for domain, topic in spec.domains.items():
        evaluate = by_name[f"evaluate/{domain}/t0/domain"].config
        texts = [row["text"] for row in held[domain]]
        built = continuation_questions(evaluate, texts, [row["meta"]["topic"] for row in held[domain]], domain)
        assert len(built.questions) >= 300, (domain, len(built.questions))
        assert {q.topic for q in built.questions} == {topic} and len(texts) == spec.heldout
        # No two questions of a document ask for the same span.
        assert len({(q.doc_id, q.offset) for q in built.questions}) == len(built.questions)
