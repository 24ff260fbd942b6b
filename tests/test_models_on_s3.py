"""A model on S3 through every training stage, run as a user runs the jobs (`python -m jobs.<name>`): the base
model is pruned from an s3:// prefix into another, the pruned model is fine-tuned from there (with the base
model as KD teacher), and both are evaluated from S3. The endpoint comes from --s3-endpoint only, so every
worker that copies a model must have been handed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from core import storage

TEXTS = [f"w{i} w{i + 1} w{i + 2} the cat sat on the mat w{i + 3}" for i in range(40)]


def run_job(name: str, args: list[str], cache: Path, endpoint: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env["FINESCOPE_CACHE"] = str(cache)  # where the workers copy the S3 models to
    for name_ in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        env.pop(name_, None)  # the endpoint reaches the job, and its workers, through --s3-endpoint alone
    command = [sys.executable, "-m", f"jobs.{name}", *args, "--s3-endpoint", endpoint]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=420)


@pytest.mark.timeout(1200)
def test_prune_finetune_and_evaluate_a_model_on_s3(s3_server, s3_bucket, tiny_model_dir, tmp_path):
    base, pruned = f"s3://{s3_bucket}/models/base", f"s3://{s3_bucket}/models/pruned"
    storage.upload_dir(tiny_model_dir, base)
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "domain.parquet")
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    rows = [{"id": f"r{i}", "prompt": f"w{i % 10} w{i % 7}", "response": f"w{i % 10 + 100}"} for i in range(16)]
    pq.write_table(pa.Table.from_pylist(rows), distilled / "part-0.parquet")
    cache = tmp_path / "cache"

    prune = run_job(
        "prune",
        ["--model", base, "--data", str(tmp_path / "domain.parquet"), "--ratio", "0.25", "--method", "magnitude",
         "--channel-multiple", "8", "--out", pruned],
        cache, s3_server,
    )  # fmt: skip
    assert prune.returncode == 0, prune.stderr[-4000:]
    report = storage.read_json(f"{pruned}/prune_report.json")
    assert abs(report["ratio_achieved"] - 0.25) < 0.03
    assert storage.read_json(f"{pruned}/manifest.json")["stage"] == "prune"

    finetuned = tmp_path / "finetuned"
    finetune = run_job(
        "finetune",
        ["--model", pruned, "--teacher", base, "--kd-weight", "0.5", "--data", str(distilled), "--out", str(finetuned),
         "--actors", "1", "--micro-batch", "4", "--max-tokens", "16", "--window-steps", "2", "--warmup-steps", "1",
         "--cpus", "0.5", "--threads", "1", "--log-every", "1"],
        cache, s3_server,
    )  # fmt: skip
    assert finetune.returncode == 0, finetune.stderr[-4000:]
    metrics = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(row["kd"] >= 0 for row in metrics)
    saved = json.loads((finetuned / "model" / "config.json").read_text())
    assert saved["intermediate_size"] == report["sizes_after"]["intermediate_size"]

    evaluation = tmp_path / "eval"
    evaluate = run_job(
        "evaluate",
        ["--models", f"base={base}", f"pruned={pruned}", f"finetuned={finetuned / 'model'}",
         "--ppl", str(tmp_path / "domain.parquet"), "--ppl-max-docs", "8", "--out", str(evaluation)],
        cache, s3_server,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    results = json.loads((evaluation / "results.json").read_text())
    sizes = {row["label"]: row["parameters"] for row in results["models"]}
    assert sizes["base"] == report["params_before"] and sizes["pruned"] == sizes["finetuned"] == report["params_after"]

    # One copy per model per machine, shared by every stage's workers; a tokenizer-only copy of each at most.
    copies = sorted(path.name for path in (cache / "models").iterdir() if path.is_dir())
    full = [name.rsplit("-", 1)[0] for name in copies if not name.endswith("-tokenizer")]
    assert full == ["s3-base", "s3-pruned"], copies
