"""Stage 1 on local Ray with a tiny model: SAE training, curation, rejects, skip on rerun, S3."""

from __future__ import annotations

import json
import logging
import re

import pyarrow.parquet as pq
import pytest
from helpers import write_corpus

from core import storage
from core.errors import ConfigError
from curation.latent_weights import LatentStats
from curation.sae.model import TopKSAE
from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.seeds import load_seeds
from curation.selection.curate import CurateConfig, run_curation
from curation.split import SplitConfig, run_split

pytestmark = pytest.mark.timeout(300)


def _train(corpus_glob: str, seeds: str, model: str, out: str) -> dict:
    return run_train_sae(
        TrainSAEConfig(
            corpus=[corpus_glob], out=out, model=model, layer=2, seeds=seeds, coords="jacobian", num_coords=32,
            expansion_factor=4, k=8, max_train_tokens=1500, epochs=3, batch_tokens=256, cpus=0.5,
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def curated_run(ray_local, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    corpus = write_corpus(root / "corpus")
    sae_manifest = _train(str(root / "corpus" / "*.jsonl.gz"), corpus["seeds"], tiny_model_dir, str(root / "sae"))
    config = CurateConfig(
        corpus=[str(root / "corpus" / "*.jsonl.gz")], seeds=corpus["seeds"], sae=str(root / "sae"),
        out=str(root / "out"), top_n=2, cpus=0.5, batch_size=16,
    )  # fmt: skip
    result = run_curation(config)
    return {"root": root, "corpus": corpus, "config": config, "manifest": result, "sae_manifest": sae_manifest}


def test_sae_directory_is_complete(curated_run):
    sae_dir = curated_run["root"] / "sae"
    sae = TopKSAE.load(sae_dir)
    assert sae.cfg.layer == 2 and len(sae.cfg.coords) == 32 and sae.cfg.coord_selector == "jacobian"
    manifest = json.loads((sae_dir / "manifest.json").read_text())
    assert manifest["counts"]["tokens"] > 0 and 0.0 <= manifest["counts"]["dead_fraction"] <= 1.0
    assert manifest["counts"]["fvu"] < 1.0
    # Rarity statistics, measured after training on the corpus's first documents (all of this small one).
    stats = LatentStats.load(sae_dir)
    assert stats is not None and stats.docs == curated_run["corpus"]["good_rows"] == manifest["counts"]["stats_docs"]
    assert len(stats.fired_in) == sae.cfg.num_latents and 0 < max(stats.fired_in) <= stats.docs


def test_the_manifests_and_report_say_what_auto_dtype_became(curated_run):
    """`dtype: auto` encodes in bf16 on some CPUs and fp32 on others, which select different documents."""
    for recorded in (curated_run["manifest"]["dtype"], curated_run["sae_manifest"]["dtype"]):
        assert recorded["asked"] == "auto" and recorded["dtype"] in ("float32", "bfloat16")
        assert recorded["device"] == "cpu" and "cpu_bf16_flags" in recorded
    report = (curated_run["root"] / "out" / "report.md").read_text()
    assert f"- encode precision: {curated_run['manifest']['dtype']['dtype']} on cpu (auto: " in report


def test_all_coordinates_train_without_measuring_any(curated_run, tiny_model_dir):
    """coords=all, the default, has nothing to measure: no coordinate task loads the model first."""
    root = curated_run["root"]
    manifest = run_train_sae(
        TrainSAEConfig(
            corpus=[str(root / "corpus" / "*.jsonl.gz")], out=str(root / "sae-all"), model=tiny_model_dir, layer=2,
            expansion_factor=2, k=8, max_train_tokens=600, epochs=1, batch_tokens=256, cpus=0.5,
            stats_docs=0,
        )
    )  # fmt: skip
    hidden_size = 64  # the tiny model's (tests/conftest.py)
    assert manifest["coords"] == list(range(hidden_size)) and "coords" not in manifest["timings_s"]
    sae = TopKSAE.load(root / "sae-all")
    assert sae.cfg.coords == list(range(hidden_size)) and sae.cfg.coord_selector == "all"
    assert (
        manifest["counts"]["tokens"] == 600 and 0 < manifest["counts"]["first_step_s"] < manifest["timings_s"]["train"]
    )


def test_planted_documents_are_selected_first(curated_run):
    table = pq.read_table(curated_run["root"] / "out" / "curated").to_pylist()
    planted = curated_run["corpus"]["planted"]
    selected = {(row["text"], row["domain"]) for row in table}
    # Each seed's two nearest documents are the two planted from it, so top_n=2 selects exactly them.
    assert selected == {(text, domain) for text, domain in planted.items()}
    for row in table:
        assert row["score"] > 0.5
        assert set(row) >= {"id", "text", "domain", "score", "nearest_seed", "source", "meta"}
    # A planted document's nearest seed is the one it was made from, named by that seed's id, not its line.
    seeds = load_seeds(curated_run["corpus"]["seeds"])
    made_from = {seed_id: text for seed_id, text in zip(seeds.ids, seeds.texts, strict=True)}
    assert all(row["text"].startswith(made_from[row["nearest_seed"]]) for row in table)


def test_every_row_is_scored_or_rejected(curated_run):
    counts = curated_run["manifest"]["counts"]
    assert counts["documents"] == curated_run["corpus"]["good_rows"]
    assert counts["rejects_by_reason"] == curated_run["corpus"]["bad"]
    assert counts["curated_rows"] == len(curated_run["corpus"]["planted"])
    report = (curated_run["root"] / "out" / "report.md").read_text()
    assert "bad_json" in report and (curated_run["root"] / "out" / "scores.png").stat().st_size > 1000


def test_rerun_with_same_config_is_skipped(curated_run):
    out = curated_run["root"] / "out"
    before = (out / "manifest.json").read_text()
    marker = out / "curated" / "untouched.marker"
    marker.write_text("x")
    again = run_curation(curated_run["config"])
    assert again["hash"] == json.loads(before)["hash"]
    assert marker.exists() and (out / "manifest.json").read_text() == before
    marker.unlink()


def test_threshold_rule_reruns_and_selects_by_cosine_reporting_progress(curated_run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FINESCOPE_PROGRESS_S", "0.2")
    config = CurateConfig(
        corpus=curated_run["config"].corpus, seeds=curated_run["config"].seeds, sae=curated_run["config"].sae,
        out=str(tmp_path / "thr"), threshold=0.99, cpus=0.5,
    )  # fmt: skip
    assert config.rule == "threshold"
    with caplog.at_level(logging.INFO, logger="core.progress"):
        run_curation(config)
    rows = pq.read_table(tmp_path / "thr" / "curated").to_pylist()
    assert all(row["score"] >= 0.99 for row in rows)
    scored = pq.read_table(tmp_path / "thr" / "scored").to_pylist()
    docs = curated_run["corpus"]["good_rows"]
    assert len(scored) == docs
    # The encode actors count batches into a counter the driver reads while it waits in write_parquet.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("curate encode: ")]
    assert len(lines) >= 2, lines
    assert re.fullmatch(rf"curate encode: {docs:,} docs [\d.,]+ docs/s, done in \w+", lines[-1]), lines
    assert "ETA" not in "".join(lines)  # the corpus's size in documents is unknown


def _files(directory) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*") if p.is_file() and not p.name.startswith((".", "_")))


def test_prune_reads_a_curate_output_through_its_manifest(curated_run, tiny_model_dir, tmp_path):
    """`jobs.prune --data <curate --out>` takes its texts from curated/ alone, never from scored/ or rejects/;
    a path into scored/ or rejects/ is refused, naming the curated/ directory to pass."""
    from training.pruning.prune import PruneConfig, run_pruning

    out = curated_run["root"] / "out"
    settings = {"model": tiny_model_dir, "data": str(out), "ratio": 0.3, "channel_multiple": 8, "max_tokens": 32}
    with pytest.raises(ConfigError) as error:  # two domains curated: importance on both mixed serves neither
        run_pruning(PruneConfig(**settings, out=str(tmp_path / "mixed")))
    assert error.value.field == "domain" and "body, maths" in str(error.value)
    run_pruning(PruneConfig(**settings, domain="maths", out=str(tmp_path / "pruned")))
    written = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert [info["uri"] for info in written["inputs"]] == _files(out / "curated")
    assert written["counts"]["docs"] == curated_run["manifest"]["counts"]["by_domain"]["maths"]
    for wrong in ("scored", "rejects"):
        with pytest.raises(ConfigError) as error:
            run_pruning(PruneConfig(model=tiny_model_dir, data=str(out / wrong), out=str(tmp_path / wrong)))
        assert error.value.field == "data" and str(out / "curated") in str(error.value)
        assert not (tmp_path / wrong).exists()


def test_a_split_output_gives_evaluation_its_heldout_and_is_refused_where_ambiguous(
    curated_run, tiny_model_dir, tmp_path
):
    """--ppl <split --out> reads heldout/ only; distill refuses a split root (train/ or random/?) naming
    both; finetune refuses a curate output, which is no distilled set; --ppl refuses it too."""
    from training.distillation import distill
    from training.evaluation import evaluate
    from training.finetuning import finetune

    curate_out = curated_run["root"] / "out"
    split_out = tmp_path / "split"
    run_split(SplitConfig(curated=str(curate_out), domain="maths", out=str(split_out)))
    assert {"train", "heldout", "random", "manifest.json"} <= {p.name for p in split_out.iterdir()}
    checked = evaluate.plan(
        evaluate.EvaluateConfig(models=[tiny_model_dir], out=str(tmp_path / "eval"), ppl=[str(split_out)])
    )
    assert checked.documents["documents"] == pq.read_table(split_out / "heldout").column("text").to_pylist()
    assert [info.uri for info in checked.inputs if "split" in info.uri] == _files(split_out / "heldout")
    with pytest.raises(ConfigError) as error:
        distill.plan(distill.DistillConfig(data=str(split_out), out=str(tmp_path / "d"), teacher=tiny_model_dir))
    assert error.value.field == "data"
    assert str(split_out / "train") in str(error.value) and str(split_out / "random") in str(error.value)
    with pytest.raises(ConfigError) as error:
        finetune.plan(finetune.FinetuneConfig(model=tiny_model_dir, data=str(curate_out), out=str(tmp_path / "f")))
    assert error.value.field == "data" and "`curate`" in str(error.value) and "`distill`" in str(error.value)
    with pytest.raises(ConfigError) as error:
        evaluate.plan(evaluate.EvaluateConfig(models=[tiny_model_dir], out=str(tmp_path / "e"), ppl=[str(curate_out)]))
    assert error.value.field == "ppl" and "heldout/" in str(error.value)


def test_s3_round_trip(ray_local, tiny_model_dir, s3_bucket, tmp_path):
    """Corpus, SAE and curated output all on moto's S3 server."""
    local = write_corpus(tmp_path / "corpus", bad_rows=False)
    for path in sorted((tmp_path / "corpus").glob("*.jsonl.gz")):
        storage.write_bytes_atomic(f"s3://{s3_bucket}/corpus/{path.name}", path.read_bytes())
    storage.write_bytes_atomic(f"s3://{s3_bucket}/seeds.jsonl", (tmp_path / "seeds.jsonl").read_bytes())
    corpus = f"s3://{s3_bucket}/corpus/*.jsonl.gz"
    _train(corpus, f"s3://{s3_bucket}/seeds.jsonl", tiny_model_dir, f"s3://{s3_bucket}/sae")
    assert storage.exists(f"s3://{s3_bucket}/sae/sae.safetensors")
    result = run_curation(
        CurateConfig(
            corpus=[corpus], seeds=f"s3://{s3_bucket}/seeds.jsonl", sae=f"s3://{s3_bucket}/sae",
            out=f"s3://{s3_bucket}/curated", top_n=2, cpus=0.5, batch_size=16,
        )
    )  # fmt: skip
    table = storage.read_parquet(f"s3://{s3_bucket}/curated/curated")
    assert {(r["text"], r["domain"]) for r in table.to_pylist()} == set(local["planted"].items())
    assert result["counts"]["documents"] == local["good_rows"]
    assert storage.exists(f"s3://{s3_bucket}/curated/manifest.json")
    assert storage.exists(f"s3://{s3_bucket}/curated/report.md")
