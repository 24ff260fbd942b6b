"""Finding the dataset inside a stage output (core.manifest.resolve_input / input_files), local and on S3.

The stage tests run the real stages (tests/training/test_distill.py, tests/pipeline/test_pipeline.py);
these cover the rules themselves on small hand-made layouts.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import manifest, storage
from core.errors import ConfigError

READS = {"distill": "distilled"}


def _parquet(path, rows: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(rows)]}), path)


def _distill_output(root, finished: bool = True):
    _parquet(root / "distilled" / "part-0.parquet")
    _parquet(root / "parts" / "part-00000.parquet")
    _parquet(root / "rejects" / "rejects.parquet", rows=1)
    if finished:
        (root / "manifest.json").write_text(json.dumps({"stage": "distill"}))
    return root


def test_an_output_root_resolves_through_its_manifest_and_a_plain_directory_is_itself(tmp_path):
    out = _distill_output(tmp_path / "out")
    files = manifest.input_files(str(out), field="data", reads=READS)
    assert [info.uri for info in files] == [str(out / "distilled" / "part-0.parquet")]
    assert manifest.resolve_input(str(out / "distilled"), field="data", reads=READS) == str(out / "distilled")
    plain = tmp_path / "plain"
    _parquet(plain / "a.parquet")
    assert manifest.resolve_input(str(plain), field="data", reads=READS) == str(plain)


def test_a_hand_made_root_with_only_the_dataset_directory_is_read_through_it(tmp_path):
    _parquet(tmp_path / "run" / "distilled" / "x.parquet")
    resolved = manifest.resolve_input(str(tmp_path / "run"), field="data", reads=READS)
    assert resolved == str(tmp_path / "run" / "distilled")


@pytest.mark.parametrize("inside", ["parts", "rejects", "parts/part-00000.parquet", "*/*.parquet"])
def test_a_path_into_a_stage_outputs_internals_is_refused(tmp_path, inside):
    out = _distill_output(tmp_path / "out")
    with pytest.raises(ConfigError) as error:
        manifest.input_files(f"{out}/{inside}", field="data", reads=READS)
    assert error.value.field == "data" and str(out / "distilled") in str(error.value)


def test_an_unfinished_output_and_another_stages_output_are_refused(tmp_path):
    unfinished = _distill_output(tmp_path / "unfinished", finished=False)
    with pytest.raises(ConfigError) as error:
        manifest.input_files(str(unfinished), field="data", reads=READS)
    assert "manifest.json" in str(error.value) and "parts/, rejects/" in str(error.value)
    split = tmp_path / "split"
    for part in ("train", "heldout", "random"):
        _parquet(split / part / "part-00000.parquet")
    (split / "manifest.json").write_text(json.dumps({"stage": "split"}))
    with pytest.raises(ConfigError) as error:
        manifest.input_files(str(split), field="data", reads=READS)
    message = str(error.value)
    assert "`split`" in message and "`distill` (or its distilled/)" in message and str(split / "heldout") in message


def test_a_scheduled_curation_root_is_refused_naming_its_current_snapshot(tmp_path):
    root = tmp_path / "schedule"
    _parquet(root / "shards" / "abc.parquet")
    _parquet(root / "snapshots" / "v000003" / "curated.parquet")
    (root / "spec.json").write_text("{}")
    (root / "CURRENT").write_text(json.dumps({"version": 3, "path": "snapshots/v000003"}))
    with pytest.raises(ConfigError) as error:
        manifest.input_files(str(root), field="data", reads={"curate": "curated"})
    assert str(root / "snapshots" / "v000003" / "curated.parquet") in str(error.value)
    with pytest.raises(ConfigError):  # its per-shard candidates are no dataset either
        manifest.input_files(str(root / "shards"), field="data", reads={"curate": "curated"})
    snapshot = str(root / "snapshots" / "v000003" / "curated.parquet")
    assert [i.uri for i in manifest.input_files(snapshot, field="data", reads={})] == [snapshot]


def test_on_s3_the_root_resolves_and_parts_are_refused(s3_bucket, tmp_path):
    local = _distill_output(tmp_path / "out")
    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes_atomic(f"s3://{s3_bucket}/out/{path.relative_to(local)}", path.read_bytes())
    root = f"s3://{s3_bucket}/out"
    files = manifest.input_files(root, field="data", reads=READS)
    assert [info.uri for info in files] == [f"{root}/distilled/part-0.parquet"]
    with pytest.raises(ConfigError) as error:
        manifest.input_files(f"{root}/parts", field="data", reads=READS)
    assert f"{root}/distilled" in str(error.value)


def _unfinished_curate(root):
    """A curate output killed before its manifest: curated/ may be partial."""
    _parquet(root / "curated" / "part-0.parquet")
    _parquet(root / "scored" / "part-0.parquet")
    _parquet(root / "rejects" / "part-0.parquet", rows=1)
    return root


@pytest.mark.parametrize("marked", [False, True])
def test_the_dataset_of_an_unfinished_output_is_refused_however_it_is_named(tmp_path, marked):
    root = _unfinished_curate(tmp_path / "run")
    if marked:
        (root / manifest.IN_PROGRESS).write_text(json.dumps({"stage": "curate", "hash": "x"}))
    reads = {"curate": "curated"}
    for name in ("", "/curated", "/curated/part-0.parquet", "/curated/*.parquet", "/*/*.parquet"):
        with pytest.raises(ConfigError) as error:
            manifest.input_files(f"{root}{name}", field="data", reads=reads)
        assert "not finished" in str(error.value), name
        assert f"{root}/curated" not in str(error.value).split("names ")[-1].split(", which")[-1]


def test_the_corpus_is_resolved_like_every_other_input(tmp_path):
    schedule = tmp_path / "schedule"
    _parquet(schedule / "shards" / "abc.parquet")
    _parquet(schedule / "snapshots" / "v000001" / "curated.parquet")
    (schedule / "CURRENT").write_text(json.dumps({"version": 1, "path": "snapshots/v000001"}))
    (schedule / "catalog").mkdir()
    (schedule / "catalog" / "x.json").write_text("{}")
    for corpus in (str(schedule), f"{schedule}/**", f"{schedule}/catalog/x.json"):
        with pytest.raises(ConfigError) as error:
            manifest.corpus_files([corpus])
        assert error.value.field == "corpus", corpus
    curate = _distill_output(tmp_path / "out")  # any finished stage output
    with pytest.raises(ConfigError):
        manifest.corpus_files([f"{curate}/**/*.parquet"])
    assert [info.uri for info in manifest.corpus_files([str(curate / "distilled")])] == [
        str(curate / "distilled" / "part-0.parquet")
    ]


def test_curate_and_sae_training_check_their_corpus(tmp_path, tiny_model_dir):
    from curation.sae.train import TrainSAEConfig
    from curation.sae.train import plan as plan_sae
    from curation.selection.curate import CurateConfig
    from curation.selection.curate import plan as plan_curate

    root = _unfinished_curate(tmp_path / "run")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"text": "a seed", "domain": "d"}) + "\n")
    corpus = [f"{root}/curated/*.parquet"]
    with pytest.raises(ConfigError) as error:
        plan_curate(CurateConfig(corpus=corpus, seeds=str(seeds), sae=str(tmp_path / "sae"), out=str(tmp_path / "o")))
    assert error.value.field == "corpus"
    with pytest.raises(ConfigError) as error:
        plan_sae(TrainSAEConfig(corpus=corpus, model=tiny_model_dir, layer=1, out=str(tmp_path / "o")))
    assert error.value.field == "corpus"


def _curate_output(root, stage: str = "curate"):
    _parquet(root / "curated" / "part-0.parquet")
    _parquet(root / "scored" / "part-0.parquet", rows=3)
    _parquet(root / "rejects" / "rejects.parquet", rows=1)
    (root / "manifest.json").write_text(json.dumps({"stage": stage}))
    return root


@pytest.mark.parametrize("stage", ["curate", "reselect"])
def test_a_curate_outputs_scored_rows_are_read_by_the_reselection_alone(tmp_path, stage):
    from curation.selection.reselect import SCORED_READS

    out = _curate_output(tmp_path / "out", stage)
    scored = [str(out / "scored" / "part-0.parquet")]
    assert [info.uri for info in manifest.input_files(str(out), field="scored", reads=SCORED_READS)] == scored
    named = manifest.input_files(str(out / "scored" / "part-0.parquet"), field="scored", reads=SCORED_READS)
    assert [info.uri for info in named] == scored
    # Every other reader still gets the curated rows, and is refused the scored ones however they are named.
    curated = {"curate": "curated", "reselect": "curated"}
    assert [info.uri for info in manifest.input_files(str(out), field="data", reads=curated)] == [
        str(out / "curated" / "part-0.parquet")
    ]
    for path in (out / "scored", out / "scored" / "part-0.parquet"):
        with pytest.raises(ConfigError) as error:
            manifest.input_files(str(path), field="data", reads=curated)
        assert error.value.field == "data" and "scored" in str(error.value)
    # The reselection reads no other internals of the output either.
    with pytest.raises(ConfigError):
        manifest.input_files(str(out / "rejects"), field="scored", reads=SCORED_READS)
