"""Placement's parts: the device and dtype a worker resolves, the load log, and the GPU settings of the
shipped GPU pipeline. The pipeline itself runs with those settings on a two-node cluster in
tests/pipeline/test_pipeline_job.py, which asserts where every model was loaded.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import gpu_settings

from core.placement import ACCELERATOR, FORCE_CPU, LOAD_LOG, record_model_load, requested_device, resolve_device


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


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it_natively(tmp_path, monkeypatch):
    from core import placement

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert placement.cpu_flags(str(info)) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert placement.cpu_flags(str(tmp_path / "missing")) == set()
    for flags, expected in (({"avx512f", "avx512_bf16"}, "bfloat16"), ({"asimd", "bf16"}, "bfloat16"),
                            ({"avx2", "avx512f"}, "float32"), (set(), "float32")):  # fmt: skip
        monkeypatch.setattr(placement, "cpu_flags", lambda flags=flags: flags)
        assert placement.resolve_dtype("auto", "cpu") == expected
        assert placement.resolve_dtype("float32", "cpu") == "float32"
        assert placement.resolve_dtype("bfloat16", "cpu") == "bfloat16"
