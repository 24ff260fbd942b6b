"""Stage 1 on local Ray with a tiny model: SAE training, curation, rejects, skip on rerun, S3."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO
from helpers import SEEDS, job_env, write_corpus

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
        scorer="nearest",  # each seed a query, its planted documents its nearest (tests/test_jobs.py: the classifier)
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
        out=str(tmp_path / "thr"), threshold=0.99, cpus=0.5, scorer="nearest",
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


# --- selecting again from the stored codes (jobs.select) -------------------------------------------------


def _reselect_config(curated_run, out, **changes) -> dict:
    settings = {"scored": str(curated_run["root"] / "out"), "seeds": curated_run["config"].seeds, "out": str(out),
                "top_n": 2, "cpus": 0.5}  # fmt: skip
    return {**settings, **changes}


def _curated_rows(out) -> dict[tuple[str, str], dict]:
    return {(row["id"], row["domain"]): row for row in pq.read_table(out / "curated").to_pylist()}


def _sims(out) -> dict[str, np.ndarray]:
    table = pq.read_table(out / "scored", columns=["id", "seed_sims"])
    return dict(zip(table.column("id").to_pylist(), np.stack(table.column("seed_sims").to_numpy(False)), strict=True))


def test_selecting_again_with_the_curate_settings_gives_the_curated_rows(curated_run, tmp_path):
    from curation.selection.reselect import ReselectConfig, run_reselect

    out = tmp_path / "again"
    result = run_reselect(ReselectConfig(**_reselect_config(curated_run, out)))
    curated, again = _curated_rows(curated_run["root"] / "out"), _curated_rows(out)
    assert again.keys() == curated.keys() and len(curated) == len(curated_run["corpus"]["planted"])
    for key, row in curated.items():
        other = again[key]
        assert other["score"] == pytest.approx(row["score"], abs=1e-6)
        for name in ("text", "source", "meta", "nearest_seed", "n_tokens", "top_latents"):
            assert other[name] == row[name], name
        np.testing.assert_allclose(other["latent_contributions"], row["latent_contributions"], atol=1e-6)
    # Every document scored again from its stored code, against the seeds encoded again: the same cosines.
    before, after = _sims(curated_run["root"] / "out"), _sims(out)
    assert after.keys() == before.keys()
    assert max(float(np.abs(after[doc] - before[doc]).max()) for doc in before) <= 1e-6
    counts, source = result["counts"], curated_run["manifest"]["counts"]
    assert result["stage"] == "reselect" and result["driving_latents"] == curated_run["manifest"]["driving_latents"]
    assert {k: counts[k] for k in source} == source  # documents, tokens, rejects (counted where they were read)
    assert "encode" not in result["timings_s"] and set(result["timings_s"]) >= {"seeds", "rescore", "select"}
    report = (out / "report.md").read_text()
    assert "selected from the stored codes of" in report and "## Why these documents" in report
    assert "bad_json" in report and "tokens/s" not in report
    assert run_reselect(ReselectConfig(**_reselect_config(curated_run, out)))["hash"] == result["hash"]  # skipped


def _selected_from_sims(sims: dict[str, np.ndarray], seed_domains: list[str], top_n: int) -> set[str]:
    """The per-seed top-N from the cosines curate stored: what any re-selection with those seeds must pick."""
    ids = sorted(sims)
    matrix = np.stack([sims[doc] for doc in ids])
    return {ids[row] for column in range(len(seed_domains)) for row in np.argsort(-matrix[:, column])[:top_n]}


def test_another_size_rule_or_seeds_select_again_loading_the_model_for_the_seeds_alone(
    curated_run, tiny_model_dir, tmp_path
):
    """Changing top_n, the rule or the seeds (a new domain's included) encodes no corpus document: the only
    model load of each run is the one Ray task that encodes the seeds (FINESCOPE_LOAD_LOG)."""
    from core.placement import LOAD_LOG

    background = next(row for row in pq.read_table(curated_run["root"] / "out" / "scored").to_pylist()
                      if row["text"] not in curated_run["corpus"]["planted"])  # fmt: skip
    seeds = tmp_path / "new-seeds.jsonl"
    seeds.write_text(json.dumps({"domain": "maths", "text": SEEDS[0]["text"]}) + "\n"
                     + json.dumps({"domain": "other", "id": "bg", "text": background["text"]}) + "\n")  # fmt: skip
    runs = {
        "top1": _reselect_config(curated_run, tmp_path / "top1", top_n=1),
        "global": _reselect_config(curated_run, tmp_path / "global", rule="global_topn", top_n=3),
        "new_seeds": _reselect_config(curated_run, tmp_path / "new", seeds=str(seeds), top_n=1),
    }
    code = (
        "import json, sys\nfrom curation.selection.reselect import ReselectConfig, run_reselect\n"
        "for settings in json.loads(sys.argv[1]).values():\n    run_reselect(ReselectConfig(**settings))\n"
    )
    log = tmp_path / "loads.jsonl"
    env = {**job_env(), LOAD_LOG: str(log)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(runs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(loads) == len(runs), loads
    assert all(not row["driver"] and "_encode_seed_vectors" in row["task"] for row in loads), loads
    assert {row["what"] for row in loads} == {tiny_model_dir}
    # What each selected is what its rule picks from the cosines curate stored for the same seeds.
    stored = _sims(curated_run["root"] / "out")
    domains = [seed["domain"] for seed in SEEDS]
    assert {doc for doc, _ in _curated_rows(tmp_path / "top1")} == _selected_from_sims(stored, domains, 1)
    assert len(_curated_rows(tmp_path / "top1")) == len(SEEDS)
    by_domain = {}
    for doc, domain in _curated_rows(tmp_path / "global"):
        by_domain.setdefault(domain, set()).add(doc)
    assert {domain: len(docs) for domain, docs in by_domain.items()} == {"body": 3, "maths": 3}
    # A new domain: its seed is a corpus document, which is then that domain's best match, at cosine 1.
    new = _curated_rows(tmp_path / "new")
    assert {domain for _, domain in new} == {"maths", "other"}
    (other,) = [row for (_, domain), row in new.items() if domain == "other"]
    assert other["id"] == background["id"] and other["nearest_seed"] == "bg" and other["score"] == pytest.approx(1.0)
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert manifest["domains"] == ["maths", "other"] and manifest["counts"]["by_domain"] == {"maths": 1, "other": 1}
    assert "peak tokens in context are not known here" in (tmp_path / "new" / "report.md").read_text()


def test_a_selection_is_read_by_split_and_prune_like_a_curate_output(curated_run, tiny_model_dir, tmp_path):
    from curation.selection.reselect import ReselectConfig, run_reselect
    from training.pruning.prune import DATA_READS

    out = tmp_path / "again"
    run_reselect(ReselectConfig(**_reselect_config(curated_run, out, top_n=1)))
    run_split(SplitConfig(curated=str(out), domain="maths", out=str(tmp_path / "split")))
    split = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert split["counts"]["train"] + split["counts"]["heldout"] == 2 and split["counts"]["random"] >= 1
    files = manifest_inputs(str(out), DATA_READS)
    assert files == _files(out / "curated")
    with pytest.raises(ConfigError) as error:  # its scored/ stays internal to every reader but jobs.select
        manifest_inputs(str(out / "scored"), DATA_READS)
    assert error.value.field == "data"


def test_a_selection_of_nothing_writes_an_empty_set_that_readers_name(curated_run, tiny_model_dir, tmp_path):
    """A threshold no document reaches selects nothing: the output still holds its curated/ set (no rows, the
    curated columns), the report and manifest count 0, and a stage reading it says the selection was empty
    and what to change, not that the path matches no file."""
    from curation.selection.reselect import ReselectConfig, run_reselect
    from training.pruning.prune import PruneConfig, run_pruning

    out = tmp_path / "none"
    result = run_reselect(ReselectConfig(**_reselect_config(curated_run, out, rule="threshold", threshold=1.0)))
    assert result["counts"]["curated_rows"] == 0 and result["counts"]["by_domain"] == {}
    empty = pq.read_table(out / "curated")
    assert empty.num_rows == 0
    assert empty.column_names == pq.read_table(curated_run["root"] / "out" / "curated").column_names
    assert "- curated rows: 0" in (out / "report.md").read_text()
    with pytest.raises(ConfigError) as error:
        run_split(SplitConfig(curated=str(out), domain="maths", out=str(tmp_path / "split")))
    assert error.value.field == "curated" and "selected no document" in str(error.value)
    with pytest.raises(ConfigError) as error:
        run_pruning(PruneConfig(model=str(tiny_model_dir), data=str(out), out=str(tmp_path / "pruned")))
    assert error.value.field == "data" and "selected no document" in str(error.value)
    assert not (tmp_path / "split").exists() and not (tmp_path / "pruned").exists()
    # What the message says to do works: its stored codes are selected again.
    again = run_reselect(ReselectConfig(**_reselect_config(curated_run, tmp_path / "again", scored=str(out))))
    assert again["counts"]["curated_rows"] == len(_curated_rows(tmp_path / "again")) > 0


def manifest_inputs(data: str, reads: dict[str, str]) -> list[str]:
    from core import manifest

    return [info.uri for info in manifest.input_files(data, field="data", reads=reads)]


def test_selecting_from_an_output_without_stored_codes_is_refused(curated_run, tmp_path):
    """A curate output written before the codes were kept (or any other output) is refused at once, naming
    --scored and what to do."""
    import shutil

    from curation.selection.reselect import ReselectConfig, run_reselect

    old = tmp_path / "old"
    shutil.copytree(curated_run["root"] / "out", old)
    for path in (old / "scored").glob("*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["code_latents", "code_values"]), path)
    with pytest.raises(ConfigError) as error:
        run_reselect(ReselectConfig(**_reselect_config(curated_run, tmp_path / "x", scored=str(old))))
    assert error.value.field == "scored" and "jobs.curate" in str(error.value)
    with pytest.raises(ConfigError) as error:
        run_reselect(
            ReselectConfig(**_reselect_config(curated_run, tmp_path / "y", scored=str(curated_run["root"] / "sae")))
        )
    assert error.value.field == "scored" and "`train_sae`" in str(error.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
