"""Placement: with the GPU settings of jobs/configs/pipeline-s3.yaml, on a local two-node cluster whose head
has no GPU and whose worker node advertises two, every model load of every stage happens in a Ray worker
on the worker node, and none in the driver. `FINESCOPE_FORCE_CPU=1` lets those GPU workers run on this
machine's CPU (core.placement); `FINESCOPE_LOAD_LOG` records where each model was loaded.

The pipeline runs in a driver process of its own (this file, run as a script), since the test session's
driver is already joined to the session's local Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.placement import ACCELERATOR, FORCE_CPU, LOAD_LOG, record_model_load, requested_device, resolve_device

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sae", "curate", "prune", "distill", "finetune", "evaluate")


def gpu_settings() -> dict[str, dict]:
    """Every GPU setting of the shipped GPU pipeline, by stage; the transformers teacher asks for one too
    (the shipped vLLM teacher's engines ask for theirs through vLLM)."""
    shipped = yaml.safe_load((REPO / "jobs" / "configs" / "pipeline-s3.yaml").read_text())
    settings = {
        stage: {key: value for key, value in shipped.get(stage, {}).items() if "gpu" in key or key == "zero_stage"}
        for stage in STAGES
    }
    settings["distill"]["gpus_per_actor"] = 1
    return settings


def test_every_model_stage_of_the_gpu_pipeline_asks_for_a_gpu():
    settings = gpu_settings()
    assert settings["sae"] == {"gpus_per_actor": 1, "train_gpus": 1}
    assert settings["curate"] == {"gpus_per_actor": 1}
    assert settings["prune"] == {"gpus": 1}
    assert settings["finetune"] == {"zero_stage": 3, "use_gpu": True}
    assert settings["evaluate"] == {"gpus_per_model": 1}


def test_a_worker_given_a_gpu_uses_cuda_or_says_how_to_run_on_cpu(monkeypatch):
    import torch

    monkeypatch.delenv(FORCE_CPU, raising=False)
    assert requested_device(0) == "cpu" and requested_device(0.5) == ACCELERATOR
    assert resolve_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=FORCE_CPU):
            resolve_device(ACCELERATOR)
    monkeypatch.setenv(FORCE_CPU, "1")
    assert resolve_device(ACCELERATOR) == "cpu"


def test_a_load_outside_ray_is_recorded_as_the_drivers(tmp_path, monkeypatch):
    log = tmp_path / "loads.jsonl"
    monkeypatch.setenv(LOAD_LOG, str(log))
    record_model_load("some-model", "cpu")
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    # The test session's driver may have joined the session's local Ray: then the row names its node.
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    assert row == {
        "pid": os.getpid(), "node": node, "driver": True, "task": None, "what": "some-model", "device": "cpu"
    }  # fmt: skip


@pytest.mark.timeout(900)
def test_gpu_pipeline_loads_every_model_on_the_gpu_node_and_none_in_the_driver(tmp_path, tiny_model_dir):
    from helpers import job_env, write_corpus, write_spec

    corpus = write_corpus(tmp_path / "corpus")
    changes = {f"{stage}__{key}": value for stage, keys in gpu_settings().items() for key, value in keys.items()}
    changes["finetune__num_workers"] = 1  # one GPU worker shows where they go
    spec = write_spec(tmp_path, tiny_model_dir, corpus, str(tmp_path / "corpus" / "*.jsonl.gz"), **changes)
    # The random control repeats distillation and fine-tuning; where they run is already shown once.
    spec.write_text(spec.read_text() + "control: none\n")
    log, result = tmp_path / "loads.jsonl", tmp_path / "cluster.json"
    env = {**job_env(), FORCE_CPU: "1", LOAD_LOG: str(log), "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, __file__, str(spec), str(result)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=850,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    cluster = json.loads(result.read_text())
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [row for row in loads if row["driver"] or row["pid"] == cluster["driver_pid"]]
    assert {row["node"] for row in loads} == {cluster["gpu_node"]}
    assert {row["device"] for row in loads} == {"cpu"}
    run_dir = Path(cluster["run"])
    by_what: dict[str, int] = {}
    for row in loads:
        by_what[row["what"]] = by_what.get(row["what"], 0) + 1
    # SAE coordinates, SAE activations, the seeds, curation's encoder, pruning, the teacher and the base
    # model's evaluation each load the base model once (the teacher once per actor).
    assert by_what[tiny_model_dir] >= 7
    assert by_what["sae-trainer"] == 1
    pruned = str(run_dir / "maths" / "pruned-0.30")
    finetuned = [what for what in by_what if what.startswith(str(run_dir)) and what != pruned]
    assert by_what[pruned] >= 2  # fine-tuning (and its export), and the pruned model's evaluation
    assert len(finetuned) == 1  # the fine-tuned model's evaluation
    tasks = {row["task"] for row in loads}
    assert any("EncodeDocuments" in (task or "") for task in tasks)
    assert any("_prune_and_save" in (task or "") for task in tasks)


def _drive(spec_path: str, result_path: str) -> None:
    """The test's driver: a head with no GPU, a worker node advertising two, and the pipeline run on them."""
    from ray.cluster_utils import Cluster

    from core.logs import setup_logging
    from core.runtime import init_ray
    from pipeline import load_spec, run_pipeline

    setup_logging()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    try:
        init_ray(cluster.address)
        spec = load_spec(spec_path)
        run_pipeline(spec)
        Path(result_path).write_text(
            json.dumps({"driver_pid": os.getpid(), "gpu_node": gpu_node.node_id, "run": spec.root})
        )
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
