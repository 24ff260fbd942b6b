"""The split stage on a hand-made curate output: train and held-out sides, and a random control of distinct
documents."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from core.reader import doc_id
from curation.split import SplitConfig, run_split


def _curate_output(root, curated_texts: list[str], other_texts: list[str], copies: int) -> None:
    """A finished curate output whose corpus held every uncurated text in `copies` shards."""
    (root / "curated").mkdir(parents=True)
    (root / "scored").mkdir()
    curated = [{"id": doc_id(t), "text": t, "domain": "maths", "score": 0.9, "source": "s0"} for t in curated_texts]
    pq.write_table(pa.Table.from_pylist(curated), root / "curated" / "part-0.parquet")
    for shard in range(copies):
        rows = [{"id": doc_id(t), "text": t, "source": f"s{shard}"} for t in [*curated_texts, *other_texts]]
        pq.write_table(pa.Table.from_pylist(rows), root / "scored" / f"part-{shard}.parquet")
    (root / "manifest.json").write_text(json.dumps({"stage": "curate", "hash": "h"}))


def test_the_random_control_holds_distinct_documents_when_shards_repeat_them(tmp_path):
    curated = [f"prime number {i}" for i in range(10)]
    others = [f"history of the empire {i}" for i in range(12)]
    _curate_output(tmp_path / "curate", curated, others, copies=3)
    result = run_split(SplitConfig(curated=str(tmp_path / "curate"), domain="maths", out=str(tmp_path / "split")))
    control = pq.read_table(tmp_path / "split" / "random").to_pylist()
    assert len(control) == result["counts"]["train"] == result["counts"]["random"]
    assert len({row["id"] for row in control}) == len(control)  # each document once
    assert {row["text"] for row in control} <= set(others)
    train = pq.read_table(tmp_path / "split" / "train").column("id").to_pylist()
    heldout = pq.read_table(tmp_path / "split" / "heldout").column("id").to_pylist()
    assert sorted(train + heldout) == sorted(doc_id(t) for t in curated) and not set(train) & set(heldout)
