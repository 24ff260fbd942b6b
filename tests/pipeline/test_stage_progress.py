"""Long stages log progress lines while they run: SAE training and curation on local Ray with a tiny model."""

from __future__ import annotations

import logging
import re

import pytest
from helpers import write_corpus

from curation.sae.train import TrainSAEConfig, run_train_sae
from curation.selection.curate import CurateConfig, run_curation

pytestmark = pytest.mark.timeout(600)  # two stages on local Ray; a shared 2-core machine can take minutes


def _lines(caplog, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "core.progress" and r.getMessage().startswith(label)]


def test_sae_training_and_curation_report_progress(ray_local, tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FINESCOPE_PROGRESS_S", "0.2")
    corpus = write_corpus(tmp_path / "corpus")
    glob = str(tmp_path / "corpus" / "*.jsonl.gz")
    with caplog.at_level(logging.INFO, logger="core.progress"):
        sae = run_train_sae(
            TrainSAEConfig(
                corpus=[glob], out=str(tmp_path / "sae"), model=tiny_model_dir, layer=2, coords="all",
                expansion_factor=2, k=8, max_train_tokens=100_000, epochs=2, batch_tokens=128, cpus_per_actor=0.5,
            )
        )  # fmt: skip
        curated = run_curation(
            CurateConfig(
                corpus=[glob], seeds=corpus["seeds"], sae=str(tmp_path / "sae"), out=str(tmp_path / "out"),
                top_n=2, cpus_per_actor=0.5, batch_size=16,
            )
        )  # fmt: skip

    # The corpus holds fewer tokens than the budget: the total becomes what the stream held, twice (2 epochs).
    tokens = sae["counts"]["tokens"]
    sae_lines = _lines(caplog, "sae train: ")
    assert len(sae_lines) >= 2, sae_lines
    steps = sae["counts"]["steps"]
    final = rf"sae train: {tokens:,}/{tokens:,} tokens \(100%\) [\d.,]+ tokens/s, done in \w+, step {steps:,}"
    assert re.fullmatch(final, sae_lines[-1]), sae_lines[-1]
    assert any("/200,000 tokens" in line for line in sae_lines[:-1])  # the budget, before the stream ended

    docs = curated["counts"]["documents"]
    assert docs == corpus["good_rows"]
    encode_lines = _lines(caplog, "curate encode: ")
    assert len(encode_lines) >= 2, encode_lines  # a line while the driver waited in write_parquet, and the last
    assert re.fullmatch(rf"curate encode: {docs:,} docs [\d.,]+ docs/s, done in \w+", encode_lines[-1]), encode_lines
    assert "ETA" not in "".join(encode_lines)  # the corpus's size in documents is unknown
