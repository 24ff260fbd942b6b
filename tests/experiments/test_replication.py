"""The replication job on a tiny Llama and a small slice of the packaged labelled corpus: held-out sets that
no arm can train on, arms of equal budget and steps, one teacher pass for all arms, the evaluations, the
report, the skip on rerun; and the shipped spec's graph, and bad specs, without running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO

from core.errors import ConfigError
from experiments.replication import arm_labels, build_replication, load_replication_spec, run_replication
from experiments.replication.data import HoldoutConfig, split_labelled

pytestmark = pytest.mark.timeout(1200)

TOPIC = "Mathematics"


def tiny_spec(root: Path, model: str, **changes) -> Path:
    spec = {
        "root": str(root / "run"), "model": model, "seeds": str(REPO / "jobs" / "seeds" / "wikipedia-topics.jsonl"),
        "domains": {"mathematics": TOPIC}, "pool": 80, "pool_topic_docs": 20, "heldout": 5, "general_heldout": 7,
        "budget": 8, "epochs": 1, "trials": [0, 1], "ratio": 0.3, "teacher": model, "ablation_ratios": [0.5],
        "ablation_coords": [16],
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
    assert len(general) == 7
    pool = pq.read_table(run / "data" / "pool.parquet")
    assert pool.num_rows == 80 and sum(t == TOPIC for t in pool.column("topic").to_pylist()) == 20
    held_texts = {row["text"] for row in domain + general}
    assert not held_texts & set(pool.column("text").to_pylist())
    for arm in (run / "arms").rglob("rows"):
        assert not held_texts & set(pq.read_table(arm).column("text").to_pylist()), arm


def test_arms_have_the_same_budget_and_steps(replication):
    run = replication["root"]
    arms = {p.parent.relative_to(run / "arms").as_posix(): pq.read_table(p) for p in (run / "arms").rglob("rows")}
    assert set(arms) == {"random-t0", "random-t1", "mathematics/finescope-t0", "mathematics/finescope-t1",
                         "mathematics/oracle", "mathematics/finescope-k16"}  # fmt: skip
    assert {table.num_rows for table in arms.values()} == {8}
    assert set(arms["mathematics/oracle"].column("topic").to_pylist()) == {TOPIC}
    assert set(arms["random-t0"].column("id").to_pylist()) != set(arms["random-t1"].column("id").to_pylist())
    # FineScope's arm is the curator's best 8 for the domain, in the pool.
    curated = pq.read_table(run / "curate" / "t0" / "curated").to_pylist()
    best = sorted((r for r in curated if r["domain"] == "mathematics"), key=lambda r: (-r["score"], r["id"]))[:8]
    assert set(arms["mathematics/finescope-t0"].column("id").to_pylist()) == {r["id"] for r in best}
    # Every fine-tune ran the same number of optimizer steps, from the same pruned model where pruned.
    finetunes = {p.parent.relative_to(run / "finetuned").as_posix(): json.loads(p.read_text())
                 for p in (run / "finetuned").rglob("manifest.json")}  # fmt: skip
    assert len(finetunes) == 2 + 2 + 1 + 1 + 1 + 1 + 1  # finescope, random, oracle, unpruned, undistilled, ablations
    assert {m["counts"]["steps"] for m in finetunes.values()} == {4}  # 8 documents / micro-batch 2, one worker
    pruned = str(run / "pruned" / "mathematics-0.30")
    for name in ("finescope-t0", "finescope-t1", "random-t0", "random-t1", "oracle", "undistilled", "coords-k16"):
        assert finetunes[f"mathematics/{name}"]["model"] == pruned, name
    assert finetunes["mathematics/unpruned"]["model"] == replication["spec"].model
    assert finetunes["mathematics/ratio-0.50"]["model"] == str(run / "pruned" / "mathematics-0.50")


def test_the_teacher_rewrites_each_document_once_for_every_arm(replication):
    run = replication["root"]
    arms = ("finescope-t0", "finescope-t1", "oracle")
    arm_ids = set().union(*(_ids(run / "arms" / "mathematics" / arm / "rows") for arm in arms))
    assert sorted(_ids(run / "union" / "mathematics" / "rows")) == sorted(arm_ids)  # each document once
    distilled = pq.read_table(run / "distill" / "mathematics" / "distilled").to_pylist()
    assert {row["id"] for row in distilled} <= arm_ids
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
    for name, documents in (("domain", 5), ("general", 7)):
        results = json.loads((run / "eval" / "mathematics" / name / "results.json").read_text())
        assert [m["label"] for m in results["models"]] == arm_labels([0, 1])
        (entry,) = results["perplexity"].values()
        assert entry["documents"] == documents
        assert all(len(r["document_nll"]) == documents for r in entry["results"].values())
    ratio = json.loads((run / "eval" / "ablation-ratio" / "results.json").read_text())
    assert [m["label"] for m in ratio["models"]] == ["base", "pruned-0.30", "finescope-0.30", "pruned-0.50",
                                                     "finescope-0.50"]  # fmt: skip
    coords = json.loads((run / "eval" / "ablation-coords" / "results.json").read_text())
    assert [m["label"] for m in coords["models"]] == ["base", "pruned", "finescope-k16", "finescope-kall"]


def test_report_has_the_tables_tests_and_plots(replication):
    run = replication["root"]
    report = (run / "replication.md").read_text()
    assert report == replication["result"]["report"]
    assert "## mathematics" in report and "random" in report and "oracle" in report
    assert "significant" in report  # each comparison says whether it is
    assert "## Steps" in report and "| finetune/mathematics/oracle |" in report
    figures = json.loads((run / "replication.json").read_text())
    assert "mathematics" in json.dumps(figures)
    for name in ("recovery.png", "ablation-ratio.png", "ablation-coords.png"):
        assert (run / name).stat().st_size > 1000, name


def test_rerun_skips_every_step(replication):
    result = run_replication(replication["spec"])
    assert {r["status"] for r in result["steps"].values()} == {"skipped"}
    assert result["report"].split("## Steps")[0] == replication["result"]["report"].split("## Steps")[0]


# The graph and the spec, without running anything -------------------------------------------------


def test_shipped_spec_graph_has_equal_arms():
    spec = load_replication_spec(str(REPO / "jobs" / "configs" / "replication.yaml"))
    steps, layout = build_replication(spec)
    by_name = {s.name: s for s in steps}
    finetunes = [s for s in steps if s.stage == "finetune"]
    assert len(finetunes) == 3 * (3 + 3 + 3) + 3 + 3  # per domain 9; ratio and coordinates ablations 3 each
    assert {s.config.max_steps for s in finetunes} == {37} and len({s.config.lr for s in finetunes}) == 1
    # The teacher rewrites each group's documents once: the random arms, each domain's, the K ablation's.
    assert [s.name for s in steps if s.stage == "distill"] == [
        "distill/random",
        "distill/mathematics",
        "distill/biology",
        "distill/history",
        "distill/coords",
    ]
    for domain in spec.domains:
        models = {by_name[f"finetune/{domain}/{arm}"].config.model for arm in ("finescope-t0", "random-t1", "oracle")}
        assert models == {by_name[f"prune/{domain}/0.30"].config.out}
    seeds = [by_name[f"sae/t{t}"].config.seed for t in spec.trials]
    assert seeds == [0, 1, 2] and by_name["sae/k48"].config.num_coords == 48
    assert set(layout["domains"]) == {"mathematics", "biology", "history"}
    evaluate = by_name["evaluate/biology/domain"].config
    assert [m.split("=")[0] for m in evaluate.models] == arm_labels(spec.trials)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"domains": {"mathematics": "Mathematics"}, "curate": {"top_n": 5}}, "curate.top_n"),
        ({"domains": {"mathematics": "Mathematics"}, "finetune": {"max_steps": 5}}, "finetune.max_steps"),
        ({"domains": {"mathematics": ""}}, "domains"),
        ({"domains": {"mathematics": "Mathematics"}, "ablation_ratios": [0.3]}, "ablation_ratios"),
        ({"domains": {"mathematics": "Mathematics"}, "trials": [0, 0]}, "trials"),
        ({"domains": {"mathematics": "Mathematics"}, "ablation_domain": "physics"}, "ablation_domain"),
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
    config = HoldoutConfig(out=str(tmp_path), topics={"mathematics": "Maths"}, pool=10, heldout=5, general=5)
    with pytest.raises(ConfigError, match="labels 0 documents"):
        split_labelled(config)


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
