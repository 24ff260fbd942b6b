"""Determinism: the same config (seed included) and the same inputs give the same SAE and the same dataset.

The end-to-end test runs the jobs as separate processes, as a user does: the autouse seeding in
conftest.py reaches only this test process, so any unseeded draw or any dependence on the order in which
Ray's tasks finish shows up as a difference between the two runs.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO
from helpers import job_env, write_corpus

from curation.sae.model import SAEConfig, TopKSAE, train_sae
from curation.sae.replay import replay_batches

SAE_FLAGS = [
    "--layer", "2", "--coords", "jacobian", "--num-coords", "16", "--expansion-factor", "4", "--k", "8",
    "--max-train-tokens", "800", "--epochs", "2", "--batch-tokens", "128", "--cpus", "0.5",
]  # fmt: skip
# A top-N larger than the planted documents, so the selection reaches into background documents whose
# rank depends on the SAE's details.
CURATE_FLAGS = ["--top-n", "12", "--cpus", "0.5", "--batch-size", "16"]


def run_job(args: list[str], timeout: int = 400) -> None:
    """`python -m JOB ARGS` in its own process group, so a job that overruns takes its local Ray down with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{args[0]} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"


def train_and_curate(root: Path, corpus: dict, glob: str, model: str) -> tuple[str, list[tuple[str, str]]]:
    """One full run in fresh processes: (sha256 of sae.safetensors, sorted (id, domain) of the curated rows)."""
    sae_dir, out = root / "sae", root / "curated"
    run_job(["jobs.train_sae", "--corpus", glob, "--model", model, "--seeds", corpus["seeds"],
             "--out", str(sae_dir), *SAE_FLAGS])  # fmt: skip
    run_job(["jobs.curate", "--corpus", glob, "--seeds", corpus["seeds"], "--sae", str(sae_dir),
             "--out", str(out), *CURATE_FLAGS])  # fmt: skip
    digest = hashlib.sha256((sae_dir / "sae.safetensors").read_bytes()).hexdigest()
    rows = pq.read_table(out / "curated", columns=["id", "domain"]).to_pylist()
    return digest, sorted((row["id"], row["domain"]) for row in rows)


@pytest.mark.timeout(1200)
def test_two_runs_in_separate_processes_give_the_same_sae_and_dataset(tmp_path, tiny_model_dir):
    corpus = write_corpus(tmp_path / "corpus")
    glob = str(tmp_path / "corpus" / "*.jsonl.gz")
    first = train_and_curate(tmp_path / "run-1", corpus, glob, tiny_model_dir)
    second = train_and_curate(tmp_path / "run-2", corpus, glob, tiny_model_dir)
    assert first[0] == second[0], "sae.safetensors differs between two runs of the same config"
    assert len(first[1]) > len(corpus["planted"])  # the selection goes past the planted documents
    assert first[1] == second[1]


def _rows(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 8, generator=generator) for _ in range(12)]


def test_train_sae_depends_on_its_seed_not_on_the_global_generator():
    cfg = SAEConfig(d_in=8, expansion_factor=2, k=2)
    torch.manual_seed(1)
    first, _ = train_sae(iter(_rows(0)), cfg, normalizer_tokens=128, seed=5)
    torch.manual_seed(2)
    second, _ = train_sae(iter(_rows(0)), cfg, normalizer_tokens=128, seed=5)
    other, _ = train_sae(iter(_rows(0)), cfg, normalizer_tokens=128, seed=6)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.W_dec, other.W_dec)


def test_sae_init_is_the_same_on_every_device_and_seeded():
    cfg = SAEConfig(d_in=8, expansion_factor=2, k=2)
    torch.manual_seed(3)
    first = TopKSAE(cfg, seed=11)
    torch.manual_seed(4)
    second = TopKSAE(cfg, seed=11)
    assert torch.equal(first.W_dec, second.W_dec) and torch.equal(first.W_enc, second.W_enc)
    assert not torch.equal(first.W_dec, TopKSAE(cfg, seed=12).W_dec)


def test_epoch_replay_order_depends_on_its_seed_only():
    batches = [torch.arange(10, dtype=torch.float32).reshape(5, 2) + 10 * i for i in range(3)]

    def replay(seed: int) -> torch.Tensor:
        return torch.cat(list(replay_batches(iter(batches), epochs=3, batch_tokens=4, seed=seed)))

    torch.manual_seed(1)
    first = replay(7)
    torch.manual_seed(2)
    assert torch.equal(first, replay(7))
    assert first.shape == (45, 2)
    assert torch.equal(first[:15], torch.cat(batches))  # the first epoch is the stream as it came
    assert not torch.equal(first[15:], replay(8)[15:])


def test_epoch_replay_reports_tokens_of_the_whole_budget_and_steps():
    """SAE training's progress: the budget until the stream ends, then exactly what the epochs replay."""
    import re

    from core.progress import Progress

    batches = [torch.zeros(5, 2) for _ in range(3)]
    clock = iter(float(t) for t in range(1000))
    lines: list[str] = []
    progress = Progress("sae train", 1000 * 3, "tokens", interval=1, clock=lambda: next(clock), emit=lines.append)
    with progress:
        replayed = list(replay_batches(iter(batches), epochs=3, batch_tokens=4, seed=0, progress=progress))
    assert sum(batch.shape[0] for batch in replayed) == 45
    assert any("/3,000 tokens" in line for line in lines[:-1])  # the budget, before the stream ended
    assert re.fullmatch(r"sae train: 45/45 tokens \(100%\) [\d.,]+ tokens/s, done in \w+, step 11", lines[-1]), lines
